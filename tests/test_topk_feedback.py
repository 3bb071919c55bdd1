"""Error feedback: the exact invariant step by step, tracking of the accumulated gradient, DGC options, config."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmgrad.core.errors import ConfigError, LocalProtocolError
from training.topk import ErrorFeedback, TopKConfig, k_for_density, topk_abs, warmup_density
from training.topk.build import load_extension

IMPLEMENTATIONS = ("native", "reference")


@pytest.fixture(scope="module", autouse=True)
def native() -> None:
    load_extension()


def run_and_check_invariant(ef: ErrorFeedback, grads: list[torch.Tensor]) -> None:
    momentum = ef.config.momentum
    for grad in grads:
        old_residual = ef.residual.clone()
        if momentum is None:
            added = grad
        else:
            assert ef.velocity is not None
            added = ef.velocity.clone().mul_(momentum).add_(grad)
        k = ef.k
        indices, values = ef.compress(grad)
        assert indices.shape == (k,) and values.shape == (k,) and values.dtype == torch.float32
        assert bool((ef.residual[indices] == 0).all())
        if ef.velocity is not None:
            assert bool((ef.velocity[indices] == 0).all())
        rebuilt = ef.residual.clone()
        rebuilt[indices] += values
        assert torch.equal(rebuilt, old_residual + added)  # exact: sent + new residual == old residual + added


@settings(max_examples=60, deadline=None)
@given(
    numel=st.integers(1, 5000),
    density=st.floats(0.0005, 1.0),
    momentum=st.one_of(st.none(), st.floats(0.0, 0.99)),
    warmup_steps=st.integers(0, 10),
    steps=st.integers(1, 25),
    scale=st.sampled_from([1e-6, 1.0, 1e4]),
    seed=st.integers(0, 2**31 - 1),
    implementation=st.sampled_from(IMPLEMENTATIONS),
)
def test_invariant_holds_exactly_every_step(
    numel: int,
    density: float,
    momentum: float | None,
    warmup_steps: int,
    steps: int,
    scale: float,
    seed: int,
    implementation: str,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(numel, generator=gen) * scale for _ in range(steps)]
    ef = ErrorFeedback(numel, density, momentum=momentum, warmup_steps=warmup_steps, implementation=implementation)  # type: ignore[arg-type]
    run_and_check_invariant(ef, grads)


def test_invariant_on_the_threaded_sampled_path() -> None:
    gen = torch.Generator().manual_seed(2)
    n = 2_200_000
    grads = [torch.randn(n, generator=gen) for _ in range(3)]
    run_and_check_invariant(ErrorFeedback(n, 0.01), grads)
    run_and_check_invariant(ErrorFeedback(n, 0.001, momentum=0.9), grads)


@pytest.mark.parametrize("momentum", [None, 0.9])
def test_native_matches_reference(momentum: float | None) -> None:
    gen = torch.Generator().manual_seed(4)
    native = ErrorFeedback(50_000, 0.01, momentum=momentum, warmup_steps=4, implementation="native")
    reference = ErrorFeedback(50_000, 0.01, momentum=momentum, warmup_steps=4, implementation="reference")
    for _ in range(8):
        grad = torch.randn(50_000, generator=gen)
        got, want = native.compress(grad), reference.compress(grad)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert torch.equal(native.residual, reference.residual)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def test_feedback_tracks_the_accumulated_gradient_and_plain_topk_drifts() -> None:
    gen = torch.Generator().manual_seed(9)
    n, steps, density = 10_000, 300, 0.01
    signal = torch.randn(n, generator=gen) * 0.2  # a steady direction under much larger per-step noise
    ef = ErrorFeedback(n, density)
    k = k_for_density(n, density)
    true_sum = torch.zeros(n)
    sent_ef = torch.zeros(n)
    sent_plain = torch.zeros(n)
    for _ in range(steps):
        grad = signal + torch.randn(n, generator=gen)
        true_sum += grad
        indices, values = ef.compress(grad)
        sent_ef[indices] += values
        plain_indices, plain_values = topk_abs(grad, k)
        sent_plain[plain_indices] += plain_values
    torch.testing.assert_close(sent_ef + ef.residual, true_sum, rtol=0, atol=1e-3)
    assert cosine(sent_ef, true_sum) > 0.95
    assert cosine(sent_plain, true_sum) < 0.8
    assert cosine(sent_ef, true_sum) - cosine(sent_plain, true_sum) > 0.2


def test_warmup_follows_dgc_schedule() -> None:
    densities = [warmup_density(step, 0.001, 100) for step in (0, 24, 25, 50, 75, 99, 100, 10_000)]
    assert densities == [0.25, 0.25, 0.0625, 0.015625, 0.00390625, 0.00390625, 0.001, 0.001]
    assert warmup_density(0, 0.5, 100) == 0.5  # never below the target
    assert warmup_density(0, 0.01, 0) == 0.01
    ef = ErrorFeedback(10_000, 0.001, warmup_steps=8)
    ks = []
    for _ in range(10):
        ks.append(ef.k)
        ef.compress(torch.randn(10_000))
    assert ks == [2500, 2500, 625, 625, 156, 156, 39, 39, 10, 10]


def test_absorb_puts_undelivered_mass_back() -> None:
    ef = ErrorFeedback(1000, 0.05)
    grad = torch.randn(1000)
    indices, values = ef.compress(grad)
    ef.absorb(indices, values)
    assert torch.equal(ef.residual, grad)


def test_any_float_gradient_shape_and_dtype() -> None:
    ef = ErrorFeedback(600, 0.1)
    grad = torch.randn(20, 30, dtype=torch.bfloat16)
    indices, values = ef.compress(grad.t())
    assert torch.equal(values, grad.t().reshape(-1).float()[indices])


def test_misuse_and_bad_config_are_rejected() -> None:
    ef = ErrorFeedback(100, 0.1)
    with pytest.raises(LocalProtocolError):
        ef.compress(torch.randn(101))
    for kwargs, field in (
        ({"numel": 0, "density": 0.1}, "numel"),
        ({"numel": 10, "density": 0.0}, "density"),
        ({"numel": 10, "density": 1.5}, "density"),
        ({"numel": 10, "density": 0.1, "momentum": 1.0}, "momentum"),
        ({"numel": 10, "density": 0.1, "warmup_steps": -1}, "warmup_steps"),
    ):
        with pytest.raises(ConfigError) as info:
            ErrorFeedback(**kwargs)  # type: ignore[arg-type]
        assert info.value.field == field
    with pytest.raises(ConfigError):
        TopKConfig(density=float("nan"))
    assert k_for_density(100, 0.01) == 1 and k_for_density(10, 1e-9) == 1 and k_for_density(10, 1.0) == 10


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("momentum", [None, 0.9])
def test_cuda_invariant_and_agreement_with_reference(momentum: float | None) -> None:
    gen = torch.Generator(device="cuda").manual_seed(6)
    n = 3_000_000
    grads = [torch.randn(n, generator=gen, device="cuda") for _ in range(4)]
    native = ErrorFeedback(n, 0.01, momentum=momentum, device="cuda")
    run_and_check_invariant(native, grads)
    reference = ErrorFeedback(n, 0.01, momentum=momentum, device="cuda", implementation="reference")
    run_and_check_invariant(reference, grads)
    torch.testing.assert_close(native.residual, reference.residual, rtol=1e-6, atol=1e-6)

"""The native `topk_abs` operator against the pure-torch reference: sizes, dtypes, views, edge values, tracing."""

from __future__ import annotations

import pytest
import torch

from swarmgrad.core.errors import ConfigError, LocalProtocolError
from training.topk import reference_topk_abs, topk_abs
from training.topk.ops import Implementation

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


pytestmark = pytest.mark.usefixtures("native_topk")


def assert_valid_topk(x: torch.Tensor, k: int, indices: torch.Tensor, values: torch.Tensor) -> None:
    """Exactly k distinct ascending indices, the signed values at them, and the same magnitudes as the reference
    (any choice among ties is valid)."""
    flat = x.reshape(-1)
    assert indices.dtype == torch.int64 and indices.shape == (k,)
    assert values.dtype == x.dtype and values.shape == (k,)
    if k:
        assert bool((indices[1:] > indices[:-1]).all())
        assert 0 <= int(indices[0]) and int(indices[-1]) < flat.numel()
    torch.testing.assert_close(values, flat[indices], rtol=0, atol=0, equal_nan=True)
    _, ref_values = reference_topk_abs(x, k)
    got = torch.sort(values.abs().float()).values
    want = torch.sort(ref_values.abs().float()).values
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 7, 100, 4097, 32768, 32769, 100_000, 2_500_000])
def test_matches_reference_on_random_inputs(n: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=gen).to(dtype)
    for k in sorted({0, 1, max(1, n // 1000), max(1, n // 100), n // 3, n}):
        indices, values = topk_abs(x, k)
        assert_valid_topk(x, k, indices, values)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_views_and_shapes(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(300, 500, generator=gen).to(dtype)
    for view in (base.t(), base[::2, 1::3], base.unsqueeze(0).expand(2, 300, 500)):
        assert not view.is_contiguous()
        for k in (0, 1, 17, view.numel() // 50, view.numel()):
            indices, values = topk_abs(view, k)
            assert_valid_topk(view, k, indices, values)


def test_native_ties_take_lowest_indices_and_count_is_exact() -> None:
    for n in (10, 50_000, 3_000_000):
        x = torch.full((n,), -2.5)
        for k in (1, n // 100, n // 2, n):
            indices, values = topk_abs(x, k)
            assert torch.equal(indices, torch.arange(k))
            assert bool((values == -2.5).all())
    zeros_then_ties = torch.zeros(200_000)
    zeros_then_ties[::400] = 1.0  # 500 nonzero, ask for 2000: all of them plus 1500 zeros
    indices, values = topk_abs(zeros_then_ties, 2000)
    assert_valid_topk(zeros_then_ties, 2000, indices, values)
    assert int((values == 1.0).sum()) == 500


@pytest.mark.parametrize("n", [1000, 8192, 8193, 40_000])
def test_ties_go_to_the_lowest_indices_on_both_sides_of_the_direct_selection(n: int) -> None:
    """Up to 8,192 candidates the kernel selects directly, above through histograms: the same exact answer, the k
    first in (magnitude descending, index ascending) order, whatever the path."""
    gen = torch.Generator().manual_seed(n)
    x = torch.tensor([0.0, 1.0, -1.0, 2.0, -2.0])[torch.randint(0, 5, (n,), generator=gen)]
    for k in (1, n // 100, n // 3, n - 1):
        order = sorted(range(n), key=lambda i: (-abs(float(x[i])), i))[:k]
        indices, values = topk_abs(x, k)
        assert indices.tolist() == sorted(order)
        assert torch.equal(values, x[indices])


def test_mostly_zero_and_skewed_inputs_take_the_radix_path_correctly() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.zeros(1_000_000)
    x[torch.randperm(1_000_000, generator=gen)[:3000]] = torch.randn(3000, generator=gen)
    for k in (1000, 3000, 10_000, 600_000):
        assert_valid_topk(x, k, *topk_abs(x, k))
    spiky = torch.randn(1_000_000, generator=gen) * 1e-3
    spiky[-5000:] = 1e6  # all large values at the end: a sample sees few of them
    assert_valid_topk(spiky, 4000, *topk_abs(spiky, 4000))


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_ranks_above_inf_above_numbers(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(100_000, generator=gen).to(dtype)
    x[10] = float("nan")
    x[20] = float("-inf")
    x[30] = float("inf")
    x[40] = -float("nan")
    indices, values = topk_abs(x, 4)
    assert indices.tolist() == [10, 20, 30, 40]
    assert bool(values[0].isnan()) and bool(values[3].isnan())
    assert values[1].item() == float("-inf") and values[2].item() == float("inf")
    indices, _ = topk_abs(x, 2)
    assert indices.tolist() == [10, 40]
    assert_valid_topk(x, 1000, *topk_abs(x, 1000))


def test_signed_zero_and_subnormals() -> None:
    x = torch.tensor([0.0, -0.0, 1e-45, -1e-44, 0.0])
    indices, values = topk_abs(x, 2)
    assert indices.tolist() == [2, 3]
    assert values.tolist() == [x[2].item(), x[3].item()]


def test_empty_tensor() -> None:
    for dtype in DTYPES:
        indices, values = topk_abs(torch.empty(0, dtype=dtype), 0)
        assert indices.shape == (0,) and values.shape == (0,) and values.dtype == dtype


@pytest.mark.parametrize("implementation", ["native", "reference"])
def test_bad_arguments_are_rejected(implementation: Implementation) -> None:
    for x, k, message in (
        (torch.randn(10), 11, "k must be in"),
        (torch.randn(10), -1, "k must be in"),
        (torch.arange(10), 1, "float32, float16 or bfloat16"),
        (torch.randn(10, dtype=torch.float64), 1, "float32, float16 or bfloat16"),
    ):
        with pytest.raises(LocalProtocolError, match=message):
            topk_abs(x, k, implementation=implementation)
        with pytest.raises(RuntimeError, match=message):  # the op's own TORCH_CHECKs
            torch.ops.swarmgrad.topk_abs(x, k)


def test_reference_fallback_is_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(1000)
    monkeypatch.setenv("SWARMGRAD_TOPK_FALLBACK", "reference")
    assert torch.equal(topk_abs(x, 10)[0], reference_topk_abs(x, 10)[0])
    monkeypatch.setenv("SWARMGRAD_TOPK_FALLBACK", "yes please")
    with pytest.raises(ConfigError, match="SWARMGRAD_TOPK_FALLBACK"):
        topk_abs(x, 10)
    monkeypatch.delenv("SWARMGRAD_TOPK_FALLBACK")
    assert torch.equal(topk_abs(x, 10, implementation="reference")[1], reference_topk_abs(x, 10)[1])
    with pytest.raises(ConfigError, match="implementation"):
        topk_abs(x, 10, implementation="fast")  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(7)
    for n, k in ((1, 1), (1000, 10), (50_000, 500), (40_000, 0)):
        x = torch.randn(n, generator=gen).to(dtype)
        torch.library.opcheck(torch.ops.swarmgrad.topk_abs.default, (x, k))


def test_works_under_torch_compile() -> None:
    def compress(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        indices, values = torch.ops.swarmgrad.topk_abs(x * 2.0, 16)
        return indices, values + 1.0

    compiled = torch.compile(compress, backend="aot_eager", fullgraph=True)
    x = torch.randn(4096)
    indices, values = compiled(x)
    ref_indices, ref_values = reference_topk_abs(x * 2.0, 16)
    assert torch.equal(indices, ref_indices)
    assert torch.equal(values, ref_values + 1.0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_reference(dtype: torch.dtype) -> None:
    gen = torch.Generator(device="cuda").manual_seed(11)
    for n in (1, 100, 4097, 1_000_000, 10_000_000):
        x = torch.randn(n, generator=gen, device="cuda").to(dtype)
        for k in sorted({0, 1, max(1, n // 1000), max(1, n // 100), n // 3, n}):
            indices, values = topk_abs(x, k)
            assert indices.device == x.device and values.device == x.device
            assert_valid_topk(x, k, indices, values)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_edge_values_and_views() -> None:
    x = torch.full((2_000_000,), 3.0, device="cuda")
    indices, _ = topk_abs(x, 1000)
    assert indices.shape == (1000,) and bool((indices[1:] > indices[:-1]).all())
    y = torch.randn(1000, 3000, device="cuda")
    y[5, 7] = float("nan")
    y[9, 9] = float("-inf")
    view = y.t()
    indices, values = topk_abs(view, 2)
    assert indices.tolist() == [7 * 1000 + 5, 9 * 1000 + 9]
    assert bool(values[0].isnan()) and values[1].item() == float("-inf")
    assert_valid_topk(view, 3000, *topk_abs(view, 3000))
    assert topk_abs(torch.empty(0, device="cuda"), 0)[0].shape == (0,)
    torch.library.opcheck(torch.ops.swarmgrad.topk_abs.default, (torch.randn(100_000, device="cuda"), 100))

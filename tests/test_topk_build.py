"""The native kernels: built ahead of time by `setup.py` (with nothing but the `ninja` package, no system ninja),
used at load without a compile while the sources match; the JIT path for development: cache keyed by torch version
and sources, stale lock recovery, and a clear error (never a silent fallback) when the kernels cannot be built."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.topk import build
from training.topk.build import build_key, cache_dir, prebuilt_library

REPO = Path(__file__).resolve().parent.parent


def run_python(code: str, cache: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "SWARMGRAD_CACHE_DIR": str(cache), **env}
    environ.pop("SWARMGRAD_TOPK_FALLBACK", None)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=environ, capture_output=True, text=True, timeout=240, check=False
    )


JIT = {"SWARMGRAD_TOPK_BUILD": "jit"}
LOAD_AND_RUN = (
    "import logging, torch\nlogging.basicConfig(level=logging.INFO)\nfrom training.topk.build import load_extension\n"
    "load_extension()\nprint(torch.ops.swarmgrad.topk_abs(torch.tensor([1.0, -3.0, 2.0]), 1)[0].tolist())"
)


def test_the_library_built_at_install_is_loaded_without_a_compile(tmp_path: Path) -> None:
    assert prebuilt_library() is not None, "the install (make setup) builds training/topk/_C*.so"
    result = run_python(LOAD_AND_RUN, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[1]" and "built at install" in result.stderr
    assert not (tmp_path / "topk").exists()  # nothing was compiled into the JIT cache


def test_a_library_built_from_other_sources_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    installed = prebuilt_library()
    assert installed is not None
    copy = tmp_path / installed.name
    shutil.copy(installed, copy)
    (tmp_path / "_C.sources.sha256").write_text("0" * 64 + " cpu\n")
    monkeypatch.setattr(build, "prebuilt_library", lambda: copy)
    with caplog.at_level(logging.WARNING, logger="training.topk.build"):
        assert build._load_prebuilt() is None
    assert "built from other sources" in caplog.text


@pytest.mark.slow
@pytest.mark.long  # a full build, 13-30 s: make test-long (every `make setup` builds the kernels too)
def test_setup_builds_the_kernels_with_no_system_ninja_on_path(tmp_path: Path) -> None:
    """PATH holds only the compiler and binutils: ninja comes from the `ninja` package."""
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("c++", "g++", "gcc", "cc", "as", "ld"):
        found = shutil.which(tool)
        assert found is not None, f"{tool} is needed to build"
        (tools / tool).symlink_to(Path(found).resolve())
    assert shutil.which("ninja", path=str(tools)) is None
    built = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
         "--build-temp", str(tmp_path / "tmp")],
        cwd=REPO, env={**os.environ, "PATH": str(tools)}, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    (library,) = (tmp_path / "lib" / "training" / "topk").glob("_C*.so")
    code = f"import torch\ntorch.ops.load_library({str(library)!r})\n" + LOAD_AND_RUN.split("load_extension()\n")[1]
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, check=False)
    assert loaded.returncode == 0 and loaded.stdout.strip() == "[1]", loaded.stderr[-2000:]


def test_build_key_names_torch_and_python() -> None:
    key = build_key(with_cuda=False)
    assert torch.__version__.replace(".", "_").replace("+", "_") in key
    assert f"py{sys.version_info.major}{sys.version_info.minor}" in key
    assert f"_cuda_{build.sources_hash(with_cuda=True)[:12]}" in build_key(with_cuda=True)
    assert key.endswith(build.sources_hash(with_cuda=False)[:12])  # two checkouts with other sources: two caches


@pytest.mark.long  # a full build, 12-28 s: make test-long
def test_stale_lock_from_a_killed_build_is_cleared(tmp_path: Path) -> None:
    # make sure a finished JIT build exists to copy (warm after the first run on a machine)
    warm = run_python("from training.topk.build import load_extension\nload_extension()", cache_dir().parent, **JIT)
    assert warm.returncode == 0, warm.stderr
    name = build_key(with_cuda=False)
    shutil.copytree(cache_dir() / name, tmp_path / "topk" / name, symlinks=True)
    stale = tmp_path / "topk" / name / "lock"
    stale.write_text("")
    code = (
        "import torch\nfrom training.topk.build import load_extension\nload_extension()\n"
        "print(torch.ops.swarmgrad.topk_abs(torch.tensor([1.0, -3.0, 2.0]), 1)[0].tolist())"
    )
    result = run_python(code, tmp_path, **JIT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[1]"
    assert not stale.exists()


def test_failed_build_is_a_clear_error_that_says_how_to_recover(tmp_path: Path) -> None:
    code = (
        "from training.topk import ExtensionUnavailable, topk_abs\nimport torch\n"
        "try:\n    topk_abs(torch.ones(4), 1)\nexcept ExtensionUnavailable as exc:\n    print('UNAVAILABLE', exc)\n"
        "print(topk_abs(torch.tensor([1.0, -3.0]), 1, implementation='reference')[0].tolist())"
    )
    result = run_python(code, tmp_path, CXX="/nonexistent/c++", **JIT)
    assert result.returncode == 0, result.stderr
    assert "UNAVAILABLE" in result.stdout
    assert "SWARMGRAD_TOPK_FALLBACK=reference" in result.stdout
    assert "load_extension" in result.stdout  # the command that retries the build
    assert result.stdout.strip().endswith("[1]")  # the explicit reference still works

"""The build-on-first-use loader: cache keyed by torch version, stale lock recovery, and a clear error (never a
silent fallback) when the kernels cannot be built."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from training.topk.build import build_key, cache_dir, load_extension

REPO = Path(__file__).resolve().parent.parent


def run_python(code: str, cache: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "SWARMGRAD_CACHE_DIR": str(cache), **env}
    environ.pop("SWARMGRAD_TOPK_FALLBACK", None)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=environ, capture_output=True, text=True, timeout=240, check=False
    )


def test_build_key_names_torch_and_python() -> None:
    key = build_key(with_cuda=False)
    assert torch.__version__.replace(".", "_").replace("+", "_") in key
    assert f"py{sys.version_info.major}{sys.version_info.minor}" in key
    assert build_key(with_cuda=True) == key + "_cuda"


def test_stale_lock_from_a_killed_build_is_cleared(tmp_path: Path) -> None:
    load_extension()  # make sure a finished build exists to copy (a warm load, not a second compile)
    name = build_key(with_cuda=False)
    shutil.copytree(cache_dir() / name, tmp_path / "topk" / name, symlinks=True)
    stale = tmp_path / "topk" / name / "lock"
    stale.write_text("")
    code = (
        "import torch\nfrom training.topk.build import load_extension\nload_extension()\n"
        "print(torch.ops.swarmgrad.topk_abs(torch.tensor([1.0, -3.0, 2.0]), 1)[0].tolist())"
    )
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[1]"
    assert not stale.exists()


def test_failed_build_is_a_clear_error_that_says_how_to_recover(tmp_path: Path) -> None:
    code = (
        "from training.topk import ExtensionUnavailable, topk_abs\nimport torch\n"
        "try:\n    topk_abs(torch.ones(4), 1)\nexcept ExtensionUnavailable as exc:\n    print('UNAVAILABLE', exc)\n"
        "print(topk_abs(torch.tensor([1.0, -3.0]), 1, implementation='reference')[0].tolist())"
    )
    result = run_python(code, tmp_path, CXX="/nonexistent/c++")
    assert result.returncode == 0, result.stderr
    assert "UNAVAILABLE" in result.stdout
    assert "SWARMGRAD_TOPK_FALLBACK=reference" in result.stdout
    assert "load_extension" in result.stdout  # the command that retries the build
    assert result.stdout.strip().endswith("[1]")  # the explicit reference still works

"""Loader of the native top-k kernels (`csrc/`), and the fake kernels that trace them.

The kernels are built ahead of time, at install (`setup.py`: `training/topk/_C*.so`, against the installed torch).
`load_extension()` loads that library with `torch.ops.load_library` when it is there, its sources' hash still
matches the sources, and it loads into the running torch; otherwise (a development checkout whose C++ changed, a
torch upgraded after the install, `SWARMGRAD_TOPK_BUILD=jit`) it compiles them on first use with torch's JIT
builder, logging why. Either way it registers the fake (meta) kernels so the ops work under `torch.compile`. It
must not pick an implementation for the user: falling back to the pure-torch reference is the caller's explicit
choice (see `ops.py`). It runs once, before the first round, never inside a protocol step.

A JIT build goes to `$SWARMGRAD_CACHE_DIR/topk/<key>` (default `~/.cache/swarmgrad`), where the key names the
torch version, the Python version, whether the CUDA kernels are included and the sources' content hash (so two
checkouts on one machine do not invalidate each other's build); torch's own cache ignores the torch version. The
`ninja` package (a dependency) drives the compile: its directory goes first on PATH, so no system ninja is
needed. A compile killed midway leaves torch's `lock` file behind and every later build would wait on it
forever: builds through this loader hold an exclusive `flock` on a file of their own, so a `lock` file found while
holding it is stale and is removed. Cold CPU build: ~16-25 s here (2 busy cores); warm load: ~0.3 s.
"""

from __future__ import annotations

import fcntl
import importlib.machinery
import logging
import os
import sys
import time
from pathlib import Path

import ninja
import torch

from swarmgrad.core.errors import SwarmgradError
from training.topk.sources import CPU_SOURCES, CSRC, CUDA_SOURCES, SOURCES_HASH_FILE, sources_hash

logger = logging.getLogger(__name__)

BUILD_ENV = "SWARMGRAD_TOPK_BUILD"
"""`jit` always compiles from the sources (development); unset or empty uses the library built at install."""
BUILD_COMMAND = 'python -c "from training.topk.build import load_extension; load_extension()"'

_state: dict[str, bool] = {"loaded": False, "cuda": False}


class ExtensionUnavailable(SwarmgradError):
    """The native top-k kernels could not be built or loaded, or lack the device asked for."""


def cache_dir() -> Path:
    """Where builds go: `$SWARMGRAD_CACHE_DIR/topk` or `~/.cache/swarmgrad/topk`, one folder per build key."""
    root = os.environ.get("SWARMGRAD_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "swarmgrad"
    return base / "topk"


def build_key(with_cuda: bool) -> str:
    """A name unique to the torch build, the Python and the sources that the library is compiled from."""
    torch_version = torch.__version__.replace(".", "_").replace("+", "_")
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    return f"swarmgrad_topk_{torch_version}_{python}{'_cuda' if with_cuda else ''}_{sources_hash(with_cuda)[:12]}"


def prebuilt_library() -> Path | None:
    """The library built at install, if there is one (beside this module)."""
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = here / f"_C{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _load_prebuilt() -> bool | None:
    """Load the install-time library if it is usable (say why not otherwise): whether it includes the CUDA kernels,
    or None when it was not loaded."""
    mode = os.environ.get(BUILD_ENV, "")
    if mode not in ("", "jit"):
        raise ExtensionUnavailable(f"{BUILD_ENV} must be unset, empty or 'jit', got {mode!r}")
    library = prebuilt_library()
    if mode == "jit" or library is None:
        return None
    try:
        built_from, variant = (library.parent / SOURCES_HASH_FILE).read_text().split()
    except (FileNotFoundError, ValueError):
        built_from, variant = "", ""
    if variant not in ("cpu", "cuda") or built_from != sources_hash(with_cuda=variant == "cuda"):
        logger.warning("the native top-k library %s was built from other sources: building from source", library)
        return None
    try:
        torch.ops.load_library(str(library))
    except OSError as exc:  # built against another torch
        logger.warning("cannot load the native top-k library %s (%s): building from source", library, exc)
        return None
    return variant == "cuda" and torch.cuda.is_available()


def _cuda_buildable() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and torch.cuda.is_available() and CUDA_HOME is not None


def load_extension() -> None:
    """Build (first time only) and load the native kernels; idempotent. Raises `ExtensionUnavailable`."""
    if _state["loaded"]:
        return
    from torch.utils import cpp_extension

    started = time.perf_counter()
    prebuilt_cuda = _load_prebuilt()
    if prebuilt_cuda is not None:
        logger.info("loaded the native top-k kernels built at install in %.1f s", time.perf_counter() - started)
        _register_fakes()
        _state["loaded"] = True
        _state["cuda"] = prebuilt_cuda
        return
    with_cuda = _cuda_buildable()
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    name = build_key(with_cuda)
    build_dir = cache_dir() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    sources = [str(CSRC / s) for s in CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())]
    with open(build_dir / "swarmgrad.flock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        stale = build_dir / "lock"
        if stale.exists():
            logger.warning("removing stale build lock %s left by an interrupted build", stale)
            stale.unlink()
        try:
            cpp_extension.load(
                name=name,
                sources=sources,
                build_directory=str(build_dir),
                extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off"],
                extra_ldflags=["-fopenmp"],
                extra_cuda_cflags=["-O3"],
                extra_include_paths=[str(CSRC)],
                with_cuda=with_cuda,
                is_python_module=False,
                verbose=False,
            )
        except (RuntimeError, OSError, ImportError) as exc:
            raise ExtensionUnavailable(
                f"could not build the native top-k kernels in {build_dir}: {exc}. They build on first use with a C++ "
                f"compiler (g++ with OpenMP); to retry and see the compiler output run {BUILD_COMMAND}, or opt into "
                "the pure-torch reference with SWARMGRAD_TOPK_FALLBACK=reference."
            ) from exc
    logger.info("loaded native top-k kernels %s in %.1f s", name, time.perf_counter() - started)
    _register_fakes()
    _state["loaded"] = True
    _state["cuda"] = with_cuda


def has_cuda_kernels() -> bool:
    """Whether the loaded library includes the CUDA kernels."""
    return _state["cuda"]


def _register_fakes() -> None:
    @torch.library.register_fake("swarmgrad::topk_abs")
    def _topk_abs_fake(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch._check(0 <= k <= x.numel(), lambda: f"swarmgrad::topk_abs: k must be in [0, {x.numel()}], got {k}")
        return x.new_empty((k,), dtype=torch.int64), x.new_empty((k,))

"""The native top-k kernels' sources and their content hash: shared by the ahead-of-time build (`setup.py`) and
the loader (`training.topk.build`), which uses a prebuilt library only while the sources still hash to it. Imports
nothing but the standard library, so `setup.py` can read it before anything is installed."""

from __future__ import annotations

import hashlib
from pathlib import Path

CSRC = Path(__file__).resolve().parent / "csrc"
CPU_SOURCES = ("ops.cpp", "topk_cpu.cpp")
CUDA_SOURCES = ("topk_cuda.cu",)
HEADERS = ("topk.h",)
SOURCES_HASH_FILE = "_C.sources.sha256"


def sources_hash(with_cuda: bool) -> str:
    """SHA-256 over the names and bytes of the sources and headers a build compiles (the CUDA file only when
    included), in a fixed order."""
    digest = hashlib.sha256()
    for name in CPU_SOURCES + (CUDA_SOURCES if with_cuda else ()) + HEADERS:
        digest.update(name.encode() + b"\0" + (CSRC / name).read_bytes() + b"\0")
    return digest.hexdigest()

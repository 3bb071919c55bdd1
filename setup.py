"""Builds the native top-k kernels ahead of time, at install, against the installed torch.

Everything else about the package is in pyproject.toml. torch must be installed first and the build run without
isolation (`pip install --no-build-isolation ...`, as the Makefile, CI and the Dockerfile do): an isolated build would
fetch its own torch, by default the multi-GB CUDA wheel, and the library must match the torch it runs with anyway.
The `ninja` package from PyPI drives the compile (its directory goes first on PATH, so no system ninja is needed).
Next to the library goes `_C.sources.sha256`, the hash of the sources it was built from and `cpu` or `cuda`:
`training.topk.build` uses the library only while the sources still hash to it.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import ninja
import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

# the sources module alone (the package itself imports what is not installed yet)
_SOURCES_PY = Path(__file__).resolve().parent / "training" / "topk" / "sources.py"
_spec = importlib.util.spec_from_file_location("_topk_sources", _SOURCES_PY)
assert _spec is not None and _spec.loader is not None
_sources = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_sources)
CPU_SOURCES, CSRC, CUDA_SOURCES = _sources.CPU_SOURCES, _sources.CSRC, _sources.CUDA_SOURCES
SOURCES_HASH_FILE, sources_hash = _sources.SOURCES_HASH_FILE, _sources.sources_hash

os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
WITH_CUDA = torch.version.cuda is not None and CUDA_HOME is not None
CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]
root = Path(__file__).resolve().parent
sources = [str((CSRC / name).relative_to(root)) for name in CPU_SOURCES + (CUDA_SOURCES if WITH_CUDA else ())]
include = [str(CSRC.relative_to(root))]
if WITH_CUDA:
    extension = CUDAExtension(
        "training.topk._C",
        sources,
        include_dirs=include,
        extra_compile_args={"cxx": CFLAGS, "nvcc": ["-O3"]},
        extra_link_args=["-fopenmp"],
    )
else:
    extension = CppExtension(
        "training.topk._C", sources, include_dirs=include, extra_compile_args=CFLAGS, extra_link_args=["-fopenmp"]
    )


class BuildWithSourcesHash(BuildExtension):
    """torch's build, then the sources' hash written beside the library."""

    def run(self) -> None:
        super().run()
        library = Path(self.get_ext_fullpath(extension.name))
        variant = "cuda" if WITH_CUDA else "cpu"
        (library.parent / SOURCES_HASH_FILE).write_text(f"{sources_hash(with_cuda=WITH_CUDA)} {variant}\n")


setup(ext_modules=[extension], cmdclass={"build_ext": BuildWithSourcesHash})

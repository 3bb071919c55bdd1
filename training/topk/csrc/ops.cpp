// Registration of the swarmgrad top-k operators (schemas and CPU kernels). The CUDA kernels register themselves
// from topk_cuda.cu, which is compiled only where torch has CUDA. No Python module init: the library is loaded
// with torch.ops.load_library, and the fake (meta) kernels live in training/topk/ops.py.
#include <torch/library.h>

#include "topk.h"

TORCH_LIBRARY(swarmgrad, m) {
  m.def("topk_abs(Tensor x, int k) -> (Tensor indices, Tensor values)");
}

TORCH_LIBRARY_IMPL(swarmgrad, CPU, m) {
  m.impl("topk_abs", &swarmgrad_topk::topk_abs_cpu);
}

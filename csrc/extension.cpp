// The Python module deit_fast._C. Importing it registers every op in csrc/ (TORCH_LIBRARY blocks in each op's file)
// under torch.ops.deit_fast_cuda; the module itself only reports how it was built.
#include <cuda.h>
#include <torch/extension.h>
#include <torch/version.h>

#ifndef DEIT_FAST_CUDA_ARCHS
#define DEIT_FAST_CUDA_ARCHS "unknown"
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build_info", []() {
    pybind11::dict info;
    info["cuda_archs"] = DEIT_FAST_CUDA_ARCHS;
    info["cuda_version"] = CUDA_VERSION;
    info["torch_version"] = TORCH_VERSION;
    return info;
  });
}

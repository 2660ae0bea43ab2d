// Shared helpers for deit_fast's CUDA sources. This header compiles with a plain host C++ compiler too, so the
// per-element math of each op (the *_math.cuh headers) can be run and tested on a machine without a GPU.
#pragma once

#if defined(__CUDACC__)
#define DF_HD __host__ __device__ __forceinline__
#else
#define DF_HD inline
#endif

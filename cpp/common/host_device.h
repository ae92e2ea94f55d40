// JSK_HD marks helpers that run on the host and the device: CUDA kernels and plain C++ (the
// handlers, and the host tests that check kernel logic without a GPU) include the same code.
#pragma once

#ifdef __CUDACC__
#define JSK_HD __host__ __device__ __forceinline__
#else
#define JSK_HD inline
#endif

// Portability macros for the torch-free math headers: the same inline functions
// are compiled by the host compiler for the CPU kernels and by nvcc for the CUDA ones.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FC_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FC_HOST_DEVICE inline
#endif

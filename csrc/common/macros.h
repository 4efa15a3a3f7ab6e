// Portability macros shared by the CPU and CUDA kernels. Torch-free.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MAPOPT_HOST_DEVICE __host__ __device__
#else
#define MAPOPT_HOST_DEVICE
#endif

// Every math helper in csrc/common is an inline template callable from host and device code.
#define MAPOPT_INLINE MAPOPT_HOST_DEVICE inline

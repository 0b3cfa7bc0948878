// LUSSCORE_HOST_DEVICE marks the ATen-free kernel math shared by the CPU and CUDA kernels.
#pragma once

#ifdef __CUDACC__
#define LUSSCORE_HOST_DEVICE __host__ __device__
#else
#define LUSSCORE_HOST_DEVICE
#endif

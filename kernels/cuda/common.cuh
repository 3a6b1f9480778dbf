// Shared by every zoo kernel: index types, the dtype instantiation macro and a deterministic
// block sum. Compiled by NVRTC (kernels/cuda/options.txt) with every source that includes it.
#pragma once

typedef unsigned long long u64;
typedef long long i64;

// The threads of every block of the reducing kernels (a power of two).
#define ZOO_BLOCK 256

// The sum of `v` over the block (`ZOO_BLOCK` threads), in a fixed order, so that a result does
// not depend on timing. Every thread gets the sum; `scratch` holds `ZOO_BLOCK` doubles.
__device__ __forceinline__ double block_sum(double v, double* scratch) {
    scratch[threadIdx.x] = v;
    __syncthreads();
    for (unsigned s = ZOO_BLOCK / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            scratch[threadIdx.x] += scratch[threadIdx.x + s];
        }
        __syncthreads();
    }
    double total = scratch[0];
    __syncthreads();
    return total;
}

// The global index of this thread in a one-dimensional launch, and the grid's stride.
__device__ __forceinline__ u64 thread_index() {
    return (u64)blockIdx.x * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ u64 grid_stride() {
    return (u64)gridDim.x * blockDim.x;
}

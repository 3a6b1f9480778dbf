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

// The inference engine's per-channel output transforms (EpilogueOp in
// kernels/src/packed/gpu.rs): `ops` ops, each of kind kinds[k] reading its per-channel
// parameters at params[offsets[k] + c], applied in order with the CPU engine's arithmetic (a
// multiply, then an add, each rounded: --fmad=false keeps them apart).
#define OP_AFFINE 0  // v * mul + add: mul at offset, add at offset + channels
#define OP_SCALE 1   // v * mul
#define OP_ADD 2     // v + add
#define OP_RELU 3    // max(v, 0)
#define OP_PRELU 4   // v where v > 0, else alpha * v

__device__ __forceinline__ float channel_ops(float v, int c, int channels, int ops,
                                             const int* kinds, const int* offsets,
                                             const float* params) {
    for (int k = 0; k < ops; ++k) {
        const float* at = params + offsets[k];
        switch (kinds[k]) {
            case OP_AFFINE:
                v = v * at[c] + at[channels + c];
                break;
            case OP_SCALE:
                v = v * at[c];
                break;
            case OP_ADD:
                v = v + at[c];
                break;
            case OP_RELU:
                v = fmaxf(v, 0.0f);
                break;
            case OP_PRELU:
                v = v <= 0.0f ? v * at[c] : v;
                break;
        }
    }
    return v;
}

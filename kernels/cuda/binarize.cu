// The elementwise binarizers of kernels/src/sign.rs: Larq's sign (+1 where x >= 0), the
// straight-through mask 1{|x| <= clip}, and LAB's strict threshold with its tanh surrogate.
// One thread per element (grid-stride loops); `n` elements, contiguous.
#include "common.cuh"

template <typename T>
__device__ void sign(const T* x, T* out, u64 n) {
    for (u64 i = thread_index(); i < n; i += grid_stride()) {
        out[i] = x[i] >= T(0) ? T(1) : T(-1);
    }
}

template <typename T>
__device__ void ste_mask(const T* x, const T* grad, T* out, u64 n, double clip) {
    for (u64 i = thread_index(); i < n; i += grid_stride()) {
        out[i] = fabs((double)x[i]) <= clip ? grad[i] : T(0);
    }
}

template <typename T>
__device__ void lab_sign(const T* d, T* out, u64 n) {
    for (u64 i = thread_index(); i < n; i += grid_stride()) {
        out[i] = d[i] > T(0) ? T(1) : T(-1);
    }
}

// grad * (1 - tanh(d / 2)^2) / 2, in double as the CPU op computes it.
template <typename T>
__device__ void lab_sign_backward(const T* d, const T* grad, T* out, u64 n) {
    for (u64 i = thread_index(); i < n; i += grid_stride()) {
        double t = tanh((double)d[i] * 0.5);
        out[i] = (T)((double)grad[i] * 0.5 * (1.0 - t * t));
    }
}

#define ZOO_BINARIZE(T, S)                                                                     \
    extern "C" __global__ void sign_##S(const T* x, T* out, u64 n) { sign(x, out, n); }        \
    extern "C" __global__ void ste_mask_##S(const T* x, const T* g, T* out, u64 n,            \
                                            double clip) {                                     \
        ste_mask(x, g, out, n, clip);                                                          \
    }                                                                                          \
    extern "C" __global__ void lab_sign_##S(const T* d, T* out, u64 n) { lab_sign(d, out, n); } \
    extern "C" __global__ void lab_sign_backward_##S(const T* d, const T* g, T* out, u64 n) {  \
        lab_sign_backward(d, g, out, n);                                                       \
    }

ZOO_BINARIZE(float, f32)
ZOO_BINARIZE(double, f64)

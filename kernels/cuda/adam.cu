// The fused Adam update of kernels/src/adam.rs, in place, each element computed in double as
// the CPU op computes it. `mv` holds the first moments, then the second: `2n` values.
#include "common.cuh"

#define ZOO_ADAM_BETA1 0.9
#define ZOO_ADAM_BETA2 0.999
#define ZOO_ADAM_EPSILON 1e-7

// m = b1 m + (1 - b1) g', v = b2 v + (1 - b2) g'^2, with g' = g + 2 l2 w.
template <typename T>
__device__ void adam_moments(T* mv, const T* g, const T* w, u64 n, double l2) {
    for (u64 i = thread_index(); i < n; i += grid_stride()) {
        double gi = (double)g[i] + 2.0 * l2 * (double)w[i];
        mv[i] = (T)(ZOO_ADAM_BETA1 * (double)mv[i] + (1.0 - ZOO_ADAM_BETA1) * gi);
        mv[n + i] = (T)(ZOO_ADAM_BETA2 * (double)mv[n + i] + (1.0 - ZOO_ADAM_BETA2) * gi * gi);
    }
}

// w = clamp(decay w - alpha m / (sqrt(v) + eps), -clip, clip).
template <typename T>
__device__ void adam_weights(T* w, const T* mv, u64 n, double alpha, double decay, double clip) {
    for (u64 i = thread_index(); i < n; i += grid_stride()) {
        double step = alpha * (double)mv[i] / (sqrt((double)mv[n + i]) + ZOO_ADAM_EPSILON);
        double u = decay * (double)w[i] - step;
        w[i] = (T)(u < -clip ? -clip : (u > clip ? clip : u));  // NaN stays NaN
    }
}

#define ZOO_ADAM(T, S)                                                                         \
    extern "C" __global__ void adam_moments_##S(T* mv, const T* g, const T* w, u64 n,          \
                                                double l2) {                                   \
        adam_moments(mv, g, w, n, l2);                                                         \
    }                                                                                          \
    extern "C" __global__ void adam_weights_##S(T* w, const T* mv, u64 n, double alpha,        \
                                                double decay, double clip) {                   \
        adam_weights(w, mv, n, alpha, decay, clip);                                            \
    }

ZOO_ADAM(float, f32)
ZOO_ADAM(double, f64)

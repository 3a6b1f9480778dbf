// Batch normalisation in training mode on the GPU (kernels/src/batch_norm.rs), over an
// N x C x H x W input: per-channel batch mean and biased variance (two passes, in doubles),
// y = x * scale + shift with scale = gamma / sqrt(var + eps) and shift = beta - mean * scale
// (both computed in doubles and rounded to T, as on the CPU), and the backward pass
// dx = gamma / std * (g - mean(g) - x_hat * mean(g x_hat)), dgamma = sum(g x_hat),
// dbeta = sum(g).
//
// Reductions are deterministic: a grid of (parts, channels) blocks sums a fixed share of each
// channel's N*H*W values (`partial_*`, element j of the channel in `parts` interleaved strides
// of ZOO_BLOCK), then `finish` adds each channel's parts in order. Statistics live on the GPU
// as doubles: stats[0..C) the means, stats[C..2C) the variances.
#include "common.cuh"

struct Norm {
    i64 n, c, plane;  // input N x C x (H*W)
    i64 parts;        // blocks per channel in the partial sums
};

// Element j (0 <= j < n * plane) of channel ch.
__device__ __forceinline__ i64 element(const Norm& d, i64 ch, i64 j) {
    return ((j / d.plane) * d.c + ch) * d.plane + j % d.plane;
}

// Partial sums over one block's share of channel blockIdx.y: of x (squared deviations from
// stats' mean when `centered`), into partial[ch * parts + part].
template <typename T>
__device__ void partial_moments(Norm d, const T* x, const double* stats, int centered,
                                double* partial) {
    __shared__ double scratch[ZOO_BLOCK];
    const i64 ch = blockIdx.y, part = blockIdx.x, count = d.n * d.plane;
    const double mean = centered ? stats[ch] : 0.0;
    double acc = 0.0;
    for (i64 j = part * ZOO_BLOCK + threadIdx.x; j < count; j += d.parts * ZOO_BLOCK) {
        double v = (double)x[element(d, ch, j)];
        acc += centered ? (v - mean) * (v - mean) : v;
    }
    double total = block_sum(acc, scratch);
    if (threadIdx.x == 0) {
        partial[ch * d.parts + part] = total;
    }
}

// Partial sums of g and of g * x_hat, into partial[ch * parts + part] and
// partial[(c + ch) * parts + part].
template <typename T>
__device__ void partial_grads(Norm d, const T* x, const T* g, const double* stats, double eps,
                              double* partial) {
    __shared__ double scratch[ZOO_BLOCK];
    const i64 ch = blockIdx.y, part = blockIdx.x, count = d.n * d.plane;
    const double mean = stats[ch], inv_std = 1.0 / sqrt(stats[d.c + ch] + eps);
    double sum_g = 0.0, sum_gx = 0.0;
    for (i64 j = part * ZOO_BLOCK + threadIdx.x; j < count; j += d.parts * ZOO_BLOCK) {
        i64 at = element(d, ch, j);
        double gv = (double)g[at];
        sum_g += gv;
        sum_gx += gv * ((double)x[at] - mean) * inv_std;
    }
    sum_g = block_sum(sum_g, scratch);
    sum_gx = block_sum(sum_gx, scratch);
    if (threadIdx.x == 0) {
        partial[ch * d.parts + part] = sum_g;
        partial[(d.c + ch) * d.parts + part] = sum_gx;
    }
}

// out[slot] = (sum of partial[slot * parts ..][..parts], in order) / divisor, for every slot.
extern "C" __global__ void batch_norm_finish(Norm d, const double* partial, i64 slots,
                                             double divisor, double* out) {
    for (u64 s = thread_index(); s < (u64)slots; s += grid_stride()) {
        double total = 0.0;
        for (i64 p = 0; p < d.parts; ++p) {
            total += partial[s * d.parts + p];
        }
        out[s] = total / divisor;
    }
}

template <typename T>
__device__ void normalize(Norm d, const T* x, const T* gamma, const T* beta,
                          const double* stats, double eps, T* y) {
    const u64 total = (u64)(d.n * d.c * d.plane);
    for (u64 i = thread_index(); i < total; i += grid_stride()) {
        i64 ch = ((i64)i / d.plane) % d.c;
        double scale = (double)gamma[ch] / sqrt(stats[d.c + ch] + eps);
        double shift = (double)beta[ch] - stats[ch] * scale;
        y[i] = x[i] * (T)scale + (T)shift;
    }
}

// out = [dx (N*C*H*W)..., dgamma (C)..., dbeta (C)...]; sums = [sum_g (C)..., sum_gx (C)...].
template <typename T>
__device__ void grad_input(Norm d, const T* x, const T* gamma, const T* g, const double* stats,
                           const double* sums, double eps, T* out) {
    const u64 total = (u64)(d.n * d.c * d.plane);
    const double count = (double)(d.n * d.plane);
    for (u64 i = thread_index(); i < total + (u64)d.c; i += grid_stride()) {
        if (i >= total) {
            i64 ch = (i64)(i - total);
            out[total + ch] = (T)sums[d.c + ch];
            out[total + d.c + ch] = (T)sums[ch];
            continue;
        }
        i64 ch = ((i64)i / d.plane) % d.c;
        double inv_std = 1.0 / sqrt(stats[d.c + ch] + eps);
        double k = (double)gamma[ch] * inv_std;
        double mean_g = sums[ch] / count, mean_gx = sums[d.c + ch] / count;
        double x_hat = ((double)x[i] - stats[ch]) * inv_std;
        out[i] = (T)(k * ((double)g[i] - mean_g - x_hat * mean_gx));
    }
}

#define ZOO_BATCH_NORM(T, S)                                                                   \
    extern "C" __global__ void batch_norm_moments_##S(Norm d, const T* x, const double* stats, \
                                                      int centered, double* partial) {         \
        partial_moments(d, x, stats, centered, partial);                                       \
    }                                                                                          \
    extern "C" __global__ void batch_norm_grad_sums_##S(Norm d, const T* x, const T* g,        \
                                                        const double* stats, double eps,       \
                                                        double* partial) {                     \
        partial_grads(d, x, g, stats, eps, partial);                                           \
    }                                                                                          \
    extern "C" __global__ void batch_norm_normalize_##S(Norm d, const T* x, const T* gamma,    \
                                                        const T* beta, const double* stats,    \
                                                        double eps, T* y) {                    \
        normalize(d, x, gamma, beta, stats, eps, y);                                           \
    }                                                                                          \
    extern "C" __global__ void batch_norm_grad_input_##S(                                      \
        Norm d, const T* x, const T* gamma, const T* g, const double* stats,                   \
        const double* sums, double eps, T* out) {                                              \
        grad_input(d, x, gamma, g, stats, sums, eps, out);                                     \
    }

ZOO_BATCH_NORM(float, f32)
ZOO_BATCH_NORM(double, f64)

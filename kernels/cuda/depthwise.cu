// Depthwise 2D convolution on the GPU (kernels/src/depthwise.rs): VALID over an already padded
// N x C x H x W input, kernel C x 1 x kh x kw, strides (sy, sx); output N x C x OH x OW.
//
// Forward: one thread per output element, taps summed in row-major order (the CPU's order).
// Input gradient: one thread per input element, summing over the outputs whose window holds
// it (no atomics; deterministic). Kernel gradient: one block per (channel, tap), the block's
// threads summing over images and outputs in doubles, reduced in a fixed order.
#include "common.cuh"

struct Depthwise {
    i64 n, c, h, w;  // input
    i64 kh, kw;      // kernel
    i64 sy, sx;      // strides
    i64 oh, ow;      // output
};

template <typename T>
__device__ void forward(Depthwise d, const T* x, const T* k, T* out) {
    const u64 total = (u64)(d.n * d.c * d.oh * d.ow);
    for (u64 i = thread_index(); i < total; i += grid_stride()) {
        i64 ox = (i64)i % d.ow, oy = ((i64)i / d.ow) % d.oh, plane = (i64)i / (d.ow * d.oh);
        const T* src = x + plane * d.h * d.w + oy * d.sy * d.w + ox * d.sx;
        const T* taps = k + (plane % d.c) * d.kh * d.kw;
        T acc = T(0);
        for (i64 ti = 0; ti < d.kh; ++ti) {
            for (i64 tj = 0; tj < d.kw; ++tj) {
                acc = acc + taps[ti * d.kw + tj] * src[ti * d.w + tj];
            }
        }
        out[i] = acc;
    }
}

template <typename T>
__device__ void grad_input(Depthwise d, const T* g, const T* k, T* dx) {
    const u64 total = (u64)(d.n * d.c * d.h * d.w);
    for (u64 i = thread_index(); i < total; i += grid_stride()) {
        i64 xx = (i64)i % d.w, y = ((i64)i / d.w) % d.h, plane = (i64)i / (d.w * d.h);
        const T* grad = g + plane * d.oh * d.ow;
        const T* taps = k + (plane % d.c) * d.kh * d.kw;
        T acc = T(0);
        for (i64 ti = 0; ti < d.kh; ++ti) {
            i64 sy = y - ti;  // the window start that reads (y, xx) through tap row ti
            if (sy < 0 || sy % d.sy != 0 || sy / d.sy >= d.oh) {
                continue;
            }
            for (i64 tj = 0; tj < d.kw; ++tj) {
                i64 sx = xx - tj;
                if (sx < 0 || sx % d.sx != 0 || sx / d.sx >= d.ow) {
                    continue;
                }
                acc = acc + taps[ti * d.kw + tj] * grad[(sy / d.sy) * d.ow + sx / d.sx];
            }
        }
        dx[i] = acc;
    }
}

// Launched with one block of ZOO_BLOCK threads per (channel, tap).
template <typename T>
__device__ void grad_kernel(Depthwise d, const T* x, const T* g, T* dk) {
    __shared__ double scratch[ZOO_BLOCK];
    const i64 taps = d.kh * d.kw;
    const i64 ch = blockIdx.x / taps, t = blockIdx.x % taps;
    const i64 ti = t / d.kw, tj = t % d.kw;
    const i64 outputs = d.oh * d.ow, count = d.n * outputs;
    double acc = 0.0;
    for (i64 j = threadIdx.x; j < count; j += blockDim.x) {
        i64 img = j / outputs, o = j % outputs;
        i64 oy = o / d.ow, ox = o % d.ow;
        i64 plane = img * d.c + ch;
        T xv = x[plane * d.h * d.w + (oy * d.sy + ti) * d.w + ox * d.sx + tj];
        acc += (double)(xv * g[plane * outputs + o]);
    }
    double total = block_sum(acc, scratch);
    if (threadIdx.x == 0) {
        dk[blockIdx.x] = (T)total;
    }
}

#define ZOO_DEPTHWISE(T, S)                                                                    \
    extern "C" __global__ void depthwise_forward_##S(Depthwise d, const T* x, const T* k,      \
                                                     T* out) {                                 \
        forward(d, x, k, out);                                                                 \
    }                                                                                          \
    extern "C" __global__ void depthwise_grad_input_##S(Depthwise d, const T* g, const T* k,   \
                                                        T* dx) {                               \
        grad_input(d, g, k, dx);                                                               \
    }                                                                                          \
    extern "C" __global__ void depthwise_grad_kernel_##S(Depthwise d, const T* x, const T* g,  \
                                                         T* dk) {                              \
        grad_kernel(d, x, g, dk);                                                              \
    }

ZOO_DEPTHWISE(float, f32)
ZOO_DEPTHWISE(double, f64)

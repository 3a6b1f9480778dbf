// The inference engine's full-precision layers on the GPU (kernels/src/packed/cuda/float.rs),
// between its binary ones (packed.cu): the stem and transition convolutions, depthwise
// convolution and the blur, pooling, the dense head, per-channel transforms, channel
// concatenation, and the NCHW -> NHWC transpose of the input. Maps are batches of NHWC f32
// maps; every kernel computes one output value per thread (grid-stride loops) and applies the
// engine's output transform (`channel_ops` of common.cuh) and a residual where it has one, as
// the CPU engine (zoo/src/engine/float.rs) does: ops first, then the residual added.
#include "common.cuh"

// The float sums are the CPU engine's, in its order: convolutions and the dense layer fused
// multiply-adds over (tap row, tap column, channel) from zero (its AVX2 / AVX-512 GEMM and
// direct kernels), depthwise convolutions a rounded product then a rounded sum per tap inside the
// image, so that the outputs, and the signs the next binary layer takes of them, are the CPU's.

// A window op on n images of h x w x c: output oh x ow x oc, kernel kh x kw, strides, and the
// padding on top and left (the rest only shapes the output).
struct WindowShape {
    i64 n;
    int h, w, c;
    int oh, ow, oc;
    int kh, kw, sy, sx, top, left;
};

// The output value `i` of a window op: its image, row, column and channel.
struct OutputAt {
    i64 img;
    int oy, ox, o;
};

__device__ __forceinline__ OutputAt output_at(WindowShape s, u64 i) {
    OutputAt at;
    at.o = (int)(i % s.oc);
    const u64 p = i / s.oc;
    at.ox = (int)(p % s.ow);
    at.oy = (int)((p / s.ow) % s.oh);
    at.img = (i64)(p / ((u64)s.ow * s.oh));
    return at;
}

// The value of input pixel (y, x) of image `img` at channel `c`; callers check the bounds.
__device__ __forceinline__ const float* pixel(WindowShape s, const float* x, i64 img, int y,
                                              int xx) {
    return x + ((img * s.h + y) * s.w + xx) * s.c;
}

// The per-channel ops of an output value `v` of channel `o` (of `channels`), then residual[i].
__device__ __forceinline__ float finish(float v, u64 i, int o, int channels, int ops,
                                        const int* kinds, const int* offsets,
                                        const float* params, const float* residual) {
    v = channel_ops(v, o, channels, ops, kinds, offsets, params);
    return residual ? v + residual[i] : v;
}

// Convolution with weight [kh][kw][c][oc]; taps in the padding read pad_value; residual may be
// null.
extern "C" __global__ void float_conv(WindowShape s, float pad_value, const float* x,
                                      const float* weight, int ops, const int* kinds,
                                      const int* offsets, const float* params,
                                      const float* residual, float* out) {
    const u64 total = (u64)s.n * s.oh * s.ow * s.oc;
    for (u64 i = thread_index(); i < total; i += grid_stride()) {
        const OutputAt at = output_at(s, i);
        float acc = 0.0f;
        for (int ky = 0; ky < s.kh; ++ky) {
            const int y = at.oy * s.sy - s.top + ky;
            for (int kx = 0; kx < s.kw; ++kx) {
                const int xx = at.ox * s.sx - s.left + kx;
                const float* w = weight + (i64)(ky * s.kw + kx) * s.c * s.oc + at.o;
                if (y >= 0 && y < s.h && xx >= 0 && xx < s.w) {
                    const float* px = pixel(s, x, at.img, y, xx);
                    for (int c = 0; c < s.c; ++c) {
                        acc = fmaf(px[c], __ldg(w + (i64)c * s.oc), acc);
                    }
                } else if (pad_value != 0.0f) {
                    for (int c = 0; c < s.c; ++c) {
                        acc = fmaf(pad_value, __ldg(w + (i64)c * s.oc), acc);
                    }
                }
            }
        }
        out[i] = finish(acc, i, at.o, s.oc, ops, kinds, offsets, params, residual);
    }
}

// Depthwise convolution with zero padding, weight [kh][kw][oc]: output channel o reads input
// channel o / multiplier.
extern "C" __global__ void depthwise_conv(WindowShape s, int multiplier, const float* x,
                                          const float* weight, int ops, const int* kinds,
                                          const int* offsets, const float* params,
                                          const float* residual, float* out) {
    const u64 total = (u64)s.n * s.oh * s.ow * s.oc;
    for (u64 i = thread_index(); i < total; i += grid_stride()) {
        const OutputAt at = output_at(s, i);
        const int c = at.o / multiplier;
        float acc = 0.0f;
        for (int ky = 0; ky < s.kh; ++ky) {
            const int y = at.oy * s.sy - s.top + ky;
            if (y < 0 || y >= s.h) {
                continue;
            }
            for (int kx = 0; kx < s.kw; ++kx) {
                const int xx = at.ox * s.sx - s.left + kx;
                if (xx < 0 || xx >= s.w) {
                    continue;
                }
                // A product, then a sum, each rounded: the CPU's depthwise arithmetic.
                acc = acc + pixel(s, x, at.img, y, xx)[c] * weight[(ky * s.kw + kx) * s.oc + at.o];
            }
        }
        out[i] = finish(acc, i, at.o, s.oc, ops, kinds, offsets, params, residual);
    }
}

#define POOL_MAX 0       // the maximum of the taps inside the image (padding never wins)
#define POOL_MAX_RELU 1  // the maximum of the taps and 0: the pool of the map's ReLU
#define POOL_AVG 2       // the mean of the taps inside the image

// Pooling over the taps inside the image, in row-major order (oc == c).
extern "C" __global__ void float_pool(WindowShape s, int mode, const float* x, float* out) {
    const u64 total = (u64)s.n * s.oh * s.ow * s.oc;
    for (u64 i = thread_index(); i < total; i += grid_stride()) {
        const OutputAt at = output_at(s, i);
        float acc = mode == POOL_MAX ? __int_as_float(0xff800000) : 0.0f;  // -inf
        int count = 0;
        for (int ky = 0; ky < s.kh; ++ky) {
            const int y = at.oy * s.sy - s.top + ky;
            if (y < 0 || y >= s.h) {
                continue;
            }
            for (int kx = 0; kx < s.kw; ++kx) {
                const int xx = at.ox * s.sx - s.left + kx;
                if (xx < 0 || xx >= s.w) {
                    continue;
                }
                const float v = pixel(s, x, at.img, y, xx)[at.o];
                acc = mode == POOL_AVG ? acc + v : (v > acc ? v : acc);
                ++count;
            }
        }
        out[i] = mode == POOL_AVG ? acc / (float)count : acc;
    }
}

// The mean over each image's `pixels` pixels of each of `c` channels, summed in f64 in pixel
// order as the CPU does: out [n][c].
extern "C" __global__ void global_avg_pool(i64 n, i64 pixels, int c, const float* x,
                                           float* out) {
    const u64 total = (u64)n * c;
    for (u64 i = thread_index(); i < total; i += grid_stride()) {
        const int ch = (int)(i % c);
        const float* img = x + (i64)(i / c) * pixels * c;
        double sum = 0.0;
        for (i64 p = 0; p < pixels; ++p) {
            sum += (double)img[p * c + ch];
        }
        out[i] = (float)(sum / (double)pixels);
    }
}

// A fully connected layer: x [n][features], weight [features][units], out [n][units].
extern "C" __global__ void dense(i64 n, int features, int units, const float* x,
                                 const float* weight, int ops, const int* kinds,
                                 const int* offsets, const float* params, float* out) {
    const u64 total = (u64)n * units;
    for (u64 i = thread_index(); i < total; i += grid_stride()) {
        const int u = (int)(i % units);
        const float* row = x + (i64)(i / units) * features;
        float acc = 0.0f;
        for (int f = 0; f < features; ++f) {
            acc = fmaf(row[f], __ldg(weight + (i64)f * units + u), acc);
        }
        out[i] = finish(acc, i, u, units, ops, kinds, offsets, params, nullptr);
    }
}

// The ops on `values` values of `channels` channels each pixel, then the residual (may be
// null); out may be x.
extern "C" __global__ void channel_transform(u64 values, int channels, const float* x, int ops,
                                             const int* kinds, const int* offsets,
                                             const float* params, const float* residual,
                                             float* out) {
    for (u64 i = thread_index(); i < values; i += grid_stride()) {
        out[i] = finish(x[i], i, (int)(i % channels), channels, ops, kinds, offsets, params,
                        residual);
    }
}

// Copies `pixels` pixels of `from` channels into channels offset.. of maps of `to` channels.
extern "C" __global__ void copy_channels(i64 pixels, int from, int to, int offset,
                                         const float* src, float* dst) {
    const u64 total = (u64)pixels * from;
    for (u64 i = thread_index(); i < total; i += grid_stride()) {
        const i64 p = (i64)(i / from);
        dst[p * to + offset + (int)(i % from)] = src[i];
    }
}

// n images from NCHW (the models' input layout) to NHWC.
extern "C" __global__ void nchw_to_nhwc(i64 n, int c, int h, int w, const float* x,
                                        float* out) {
    const u64 total = (u64)n * c * h * w;
    for (u64 i = thread_index(); i < total; i += grid_stride()) {
        const int ch = (int)(i % c);
        const u64 p = i / c;
        const int xx = (int)(p % w), y = (int)((p / w) % h);
        const i64 img = (i64)(p / ((u64)w * h));
        out[i] = x[((img * c + ch) * h + y) * w + xx];
    }
}

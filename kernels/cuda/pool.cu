// Max and average pooling with explicit padding and TensorFlow's gradients, on the GPU: the
// passes of kernels/src/pool.rs with the same semantics. Padded cells never count: a max
// window takes the largest in-image value (its first maximum in row-major order gets the
// gradient), an average window divides by its in-image cells.
//
// Forward: one thread per output element. Backward: one thread per input element, summing
// over the windows that hold it in output order (no atomics; deterministic).
#include "common.cuh"

struct Pool {
    i64 planes, h, w;     // N*C planes of H x W
    i64 kh, kw, sy, sx;   // window and stride
    i64 top, left;        // padding before the image
    i64 oh, ow;           // output
    int max;              // 1: max pooling, 0: average

    // The in-image rows [*y0, *y1) and columns [*x0, *x1) of output (oy, ox)'s window.
    __device__ void window(i64 oy, i64 ox, i64* y0, i64* y1, i64* x0, i64* x1) const {
        i64 ys = oy * sy - top, xs = ox * sx - left;
        *y0 = ys < 0 ? 0 : ys;
        *y1 = ys + kh < h ? ys + kh : h;
        *x0 = xs < 0 ? 0 : xs;
        *x1 = xs + kw < w ? xs + kw : w;
    }
};

template <typename T>
__device__ void forward(Pool p, const T* x, T* out) {
    const u64 total = (u64)(p.planes * p.oh * p.ow);
    for (u64 i = thread_index(); i < total; i += grid_stride()) {
        i64 ox = (i64)i % p.ow, oy = ((i64)i / p.ow) % p.oh, plane = (i64)i / (p.ow * p.oh);
        const T* src = x + plane * p.h * p.w;
        i64 y0, y1, x0, x1;
        p.window(oy, ox, &y0, &y1, &x0, &x1);
        i64 count = (y1 > y0 && x1 > x0) ? (y1 - y0) * (x1 - x0) : 0;
        if (p.max) {
            // A window entirely in the padding sees only -inf, as in TensorFlow.
            T best = -(T)1.0 / (T)0.0;
            bool first = true;
            for (i64 y = y0; y < y1; ++y) {
                for (i64 xx = x0; xx < x1; ++xx) {
                    T v = src[y * p.w + xx];
                    if (first || !(best >= v)) {
                        best = v;
                    }
                    first = false;
                }
            }
            out[i] = best;
        } else if (count == 0) {
            out[i] = T(0);
        } else {
            double sum = 0.0;
            for (i64 y = y0; y < y1; ++y) {
                for (i64 xx = x0; xx < x1; ++xx) {
                    sum += (double)src[y * p.w + xx];
                }
            }
            out[i] = (T)(sum / (double)count);
        }
    }
}

// The outputs [*lo, *hi) along one axis whose windows hold input index `v`.
__device__ __forceinline__ void holders(i64 v, i64 pad, i64 k, i64 s, i64 outputs, i64* lo,
                                        i64* hi) {
    i64 first = v + pad - k + 1;  // the smallest window start that still holds v
    *lo = first <= 0 ? 0 : (first + s - 1) / s;
    i64 last = (v + pad) / s;
    *hi = last + 1 < outputs ? last + 1 : outputs;
}

template <typename T>
__device__ void backward(Pool p, const T* x, const T* grad, T* dx) {
    const u64 total = (u64)(p.planes * p.h * p.w);
    for (u64 i = thread_index(); i < total; i += grid_stride()) {
        i64 xx = (i64)i % p.w, y = ((i64)i / p.w) % p.h, plane = (i64)i / (p.w * p.h);
        const T* src = x + plane * p.h * p.w;
        const T* g = grad + plane * p.oh * p.ow;
        i64 oy0, oy1, ox0, ox1;
        holders(y, p.top, p.kh, p.sy, p.oh, &oy0, &oy1);
        holders(xx, p.left, p.kw, p.sx, p.ow, &ox0, &ox1);
        T acc = T(0);
        for (i64 oy = oy0; oy < oy1; ++oy) {
            for (i64 ox = ox0; ox < ox1; ++ox) {
                i64 y0, y1, x0, x1;
                p.window(oy, ox, &y0, &y1, &x0, &x1);
                T go = g[oy * p.ow + ox];
                if (p.max) {
                    // Does the window's first maximum (row-major) sit at (y, xx)?
                    i64 at = -1;
                    T best = T(0);
                    for (i64 wy = y0; wy < y1; ++wy) {
                        for (i64 wx = x0; wx < x1; ++wx) {
                            T v = src[wy * p.w + wx];
                            if (at < 0 || v > best) {
                                at = wy * p.w + wx;
                                best = v;
                            }
                        }
                    }
                    if (at == y * p.w + xx) {
                        acc = acc + go;
                    }
                } else {
                    i64 count = (y1 - y0) * (x1 - x0);
                    acc = acc + (T)((double)go / (double)count);
                }
            }
        }
        dx[i] = acc;
    }
}

#define ZOO_POOL(T, S)                                                                         \
    extern "C" __global__ void pool_forward_##S(Pool p, const T* x, T* out) {                  \
        forward(p, x, out);                                                                    \
    }                                                                                          \
    extern "C" __global__ void pool_backward_##S(Pool p, const T* x, const T* grad, T* dx) {   \
        backward(p, x, grad, dx);                                                              \
    }

ZOO_POOL(float, f32)
ZOO_POOL(double, f64)

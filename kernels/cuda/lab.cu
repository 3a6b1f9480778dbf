// LAB (the Learnable Activation Binarizer) on the GPU: the forward and backward passes of
// kernels/src/lab.rs, with the same semantics.
//
// `x` is N x C x H x W. The parameters travel as one vector: the 2C x 3 x 3 depthwise kernel
// (map j reads input channel j / 2 with taps params[9j .. 9j + 9]), the 2C biases
// (params[18C + j]) and beta (params[20C]). With y_j the 3x3 SAME zero-padded correlation of map
// j plus its bias, output channel c compares the maps (a0, a1) of its pairing: 0 (channel) pairs
// maps 2c and 2c + 1, 1 (official) pairs maps c and C + c. The output is +1 where
// beta*y_a1 - beta*y_a0 > 0 and -1 elsewhere; the backward pass is that of tanh(d / 2).
//
// Taps are summed in row-major order from zero, each product rounded before its addition
// (NVRTC runs with --fmad=false), as the CPU op sums them: the decisions are the CPU's.
//
// The backward pass runs in four launches, all deterministic (fixed partitions and reduction
// trees, no atomics):
//   1. lab_map_grads: per output element, the gradients of its two maps (stored by side in
//      the output's layout), and per (channel, slice) partial sums of the bias and beta
//      gradients;
//   2. lab_input_grad: per input element, the sum over the two maps it feeds and their taps;
//   3. lab_kernel_grads: per (map, slice), partial sums of the nine tap gradients;
//   4. lab_finish: one block sums the slices into the kernel, bias and beta gradients.
// The partial sums are doubles, `slices` per row, rows: 18C tap rows (map j, tap t at 9j + t),
// then C bias rows (the sum of dy_a1 over channel c), then C beta rows.
#include "common.cuh"

struct Lab {
    i64 n, c, h, w;
    int pairing;

    __device__ i64 plane() const { return h * w; }
    // The map on side `side` of output channel `ch`.
    __device__ i64 map(i64 ch, int side) const {
        return pairing == 0 ? 2 * ch + side : ch + side * c;
    }
    // The output channel whose pair holds map `a`, and its side.
    __device__ void owner(i64 a, i64* ch, int* side) const {
        if (pairing == 0) {
            *ch = a / 2;
            *side = (int)(a % 2);
        } else if (a < c) {
            *ch = a;
            *side = 0;
        } else {
            *ch = a - c;
            *side = 1;
        }
    }
};

// The bias-free 3x3 sum of map `a` at pixel (y, x) of image `img`.
template <typename T>
__device__ __forceinline__ T tap_sum(const Lab& d, const T* x, const T* params, i64 img, i64 a,
                                     i64 y, i64 xx) {
    const T* plane = x + (img * d.c + a / 2) * d.plane();
    const T* k = params + 9 * a;
    T acc = T(0);
    for (int i = 0; i < 3; ++i) {
        i64 yy = y + i - 1;
        for (int j = 0; j < 3; ++j) {
            i64 xj = xx + j - 1;
            T v = (yy >= 0 && yy < d.h && xj >= 0 && xj < d.w) ? plane[yy * d.w + xj] : T(0);
            acc = acc + k[3 * i + j] * v;
        }
    }
    return acc;
}

// Both maps of output element `idx`: y0 = y_a0, y1 = y_a1, biases included.
template <typename T>
__device__ __forceinline__ void pair(const Lab& d, const T* x, const T* params, i64 idx, T* y0,
                                     T* y1) {
    i64 p = idx % d.plane();
    i64 ch = (idx / d.plane()) % d.c;
    i64 img = idx / (d.plane() * d.c);
    i64 a0 = d.map(ch, 0), a1 = d.map(ch, 1);
    const T* bias = params + 18 * d.c;
    *y0 = tap_sum(d, x, params, img, a0, p / d.w, p % d.w) + bias[a0];
    *y1 = tap_sum(d, x, params, img, a1, p / d.w, p % d.w) + bias[a1];
}

template <typename T>
__device__ void forward(Lab d, const T* x, const T* params, T* out) {
    const T beta = params[20 * d.c];
    const u64 total = (u64)(d.n * d.c * d.plane());
    for (u64 i = thread_index(); i < total; i += grid_stride()) {
        T y0, y1;
        pair(d, x, params, (i64)i, &y0, &y1);
        T diff = beta * y1 - beta * y0;
        out[i] = diff > T(0) ? T(1) : T(-1);
    }
}

// Launch: grid (slices, C), ZOO_BLOCK threads. Block (s, c) takes the pixels m = s*B + t,
// s*B + t + slices*B, ... of the N*H*W pixels of channel c.
template <typename T>
__device__ void map_grads(Lab d, const T* x, const T* params, const T* g, T* dy0, T* dy1,
                          double* partial) {
    __shared__ double scratch[ZOO_BLOCK];
    const T beta = params[20 * d.c];
    const i64 ch = blockIdx.y, slices = gridDim.x;
    const i64 pixels = d.n * d.plane();
    double db1 = 0.0, dbeta = 0.0;
    for (i64 m = (i64)blockIdx.x * ZOO_BLOCK + threadIdx.x; m < pixels; m += slices * ZOO_BLOCK) {
        i64 idx = ((m / d.plane()) * d.c + ch) * d.plane() + m % d.plane();
        T y0, y1;
        pair(d, x, params, idx, &y0, &y1);
        T diff = beta * y1 - beta * y0;
        // (1 - tanh(d/2)^2) / 2 = 2e / (1 + e)^2 with e = exp(-|d|), as the CPU op computes it.
        T e = exp(-fabs(diff));
        T slope = T(2) * e / ((T(1) + e) * (T(1) + e));
        T gd = g[idx] * slope;
        T dy = beta * gd;
        dy0[idx] = -dy;
        dy1[idx] = dy;
        db1 += (double)dy;
        dbeta += (double)(gd * (y1 - y0));
    }
    db1 = block_sum(db1, scratch);
    dbeta = block_sum(dbeta, scratch);
    if (threadIdx.x == 0) {
        partial[(18 * d.c + ch) * slices + blockIdx.x] = db1;
        partial[(19 * d.c + ch) * slices + blockIdx.x] = dbeta;
    }
}

// The gradient of input element (img, k, y, x): both maps 2k + q it feeds, every tap that
// reaches it.
template <typename T>
__device__ void input_grad(Lab d, const T* params, const T* dy0, const T* dy1, T* dx) {
    const u64 total = (u64)(d.n * d.c * d.plane());
    for (u64 i = thread_index(); i < total; i += grid_stride()) {
        i64 p = (i64)i % d.plane();
        i64 k = ((i64)i / d.plane()) % d.c;
        i64 img = (i64)i / (d.plane() * d.c);
        i64 y = p / d.w, xx = p % d.w;
        T acc = T(0);
        for (int q = 0; q < 2; ++q) {
            i64 a = 2 * k + q, ch;
            int side;
            d.owner(a, &ch, &side);
            const T* dy = (side == 0 ? dy0 : dy1) + (img * d.c + ch) * d.plane();
            const T* kern = params + 9 * a;
            for (int ti = 0; ti < 3; ++ti) {
                i64 oy = y - ti + 1;
                if (oy < 0 || oy >= d.h) continue;
                for (int tj = 0; tj < 3; ++tj) {
                    i64 ox = xx - tj + 1;
                    if (ox < 0 || ox >= d.w) continue;
                    acc = acc + kern[3 * ti + tj] * dy[oy * d.w + ox];
                }
            }
        }
        dx[i] = acc;
    }
}

// Launch: grid (slices, 2C), ZOO_BLOCK threads. Block (s, a) sums, over its pixels of map a,
// dy_a times the input under each tap.
template <typename T>
__device__ void kernel_grads(Lab d, const T* x, const T* dy0, const T* dy1, double* partial) {
    __shared__ double scratch[ZOO_BLOCK];
    const i64 a = blockIdx.y, slices = gridDim.x;
    i64 ch;
    int side;
    d.owner(a, &ch, &side);
    const T* dys = side == 0 ? dy0 : dy1;
    const i64 pixels = d.n * d.plane();
    double acc[9] = {0, 0, 0, 0, 0, 0, 0, 0, 0};
    for (i64 m = (i64)blockIdx.x * ZOO_BLOCK + threadIdx.x; m < pixels; m += slices * ZOO_BLOCK) {
        i64 img = m / d.plane(), p = m % d.plane();
        i64 y = p / d.w, xx = p % d.w;
        T g = dys[(img * d.c + ch) * d.plane() + p];
        const T* plane = x + (img * d.c + a / 2) * d.plane();
        for (int i = 0; i < 3; ++i) {
            i64 yy = y + i - 1;
            if (yy < 0 || yy >= d.h) continue;
            for (int j = 0; j < 3; ++j) {
                i64 xj = xx + j - 1;
                if (xj < 0 || xj >= d.w) continue;
                acc[3 * i + j] += (double)(g * plane[yy * d.w + xj]);
            }
        }
    }
    for (int t = 0; t < 9; ++t) {
        double total = block_sum(acc[t], scratch);
        if (threadIdx.x == 0) {
            partial[(9 * a + t) * slices + blockIdx.x] = total;
        }
    }
}

// Launch: one block of ZOO_BLOCK threads. Writes the 18C kernel gradients, the 2C bias
// gradients and the beta gradient (`out`, 20C + 1 values) from the partial sums.
template <typename T>
__device__ void finish(Lab d, const double* partial, i64 slices, T* out) {
    __shared__ double scratch[ZOO_BLOCK];
    double dbeta = 0.0;
    for (i64 r = threadIdx.x; r < 20 * d.c; r += ZOO_BLOCK) {
        double s = 0.0;
        for (i64 k = 0; k < slices; ++k) {
            s += partial[r * slices + k];
        }
        if (r < 18 * d.c) {
            out[r] = (T)s;
        } else if (r < 19 * d.c) {
            i64 ch = r - 18 * d.c;
            out[18 * d.c + d.map(ch, 0)] = (T)(-s);
            out[18 * d.c + d.map(ch, 1)] = (T)s;
        } else {
            dbeta += s;
        }
    }
    dbeta = block_sum(dbeta, scratch);
    if (threadIdx.x == 0) {
        out[20 * d.c] = (T)dbeta;
    }
}

#define ZOO_LAB(T, S)                                                                          \
    extern "C" __global__ void lab_forward_##S(Lab d, const T* x, const T* params, T* out) {   \
        forward(d, x, params, out);                                                            \
    }                                                                                          \
    extern "C" __global__ void lab_map_grads_##S(Lab d, const T* x, const T* params,           \
                                                 const T* g, T* dy0, T* dy1,                   \
                                                 double* partial) {                            \
        map_grads(d, x, params, g, dy0, dy1, partial);                                         \
    }                                                                                          \
    extern "C" __global__ void lab_input_grad_##S(Lab d, const T* params, const T* dy0,        \
                                                  const T* dy1, T* dx) {                       \
        input_grad(d, params, dy0, dy1, dx);                                                   \
    }                                                                                          \
    extern "C" __global__ void lab_kernel_grads_##S(Lab d, const T* x, const T* dy0,           \
                                                    const T* dy1, double* partial) {           \
        kernel_grads(d, x, dy0, dy1, partial);                                                 \
    }                                                                                          \
    extern "C" __global__ void lab_finish_##S(Lab d, const double* partial, i64 slices,        \
                                              T* out) {                                        \
        finish(d, partial, slices, out);                                                       \
    }

ZOO_LAB(float, f32)
ZOO_LAB(double, f64)

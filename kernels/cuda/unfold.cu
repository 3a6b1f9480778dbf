// im2col ("unfold") and its adjoint col2im ("fold") on the GPU (kernels/src/unfold.rs): the
// windows of an already padded N x C x H x W input under a kh x kw window moved by (sy, sx),
// VALID, K = C * kh * kw values each in (c, i, j) order, P = OH * OW windows per image, laid out
// as rows ((N * P) x K, `groups` = 0) or as columns (groups x K x (N / groups * P): each group
// of consecutive images a K x (images * P) matrix whose column (n, oy, ox) holds that window).
// Unfold may read the input padded (`top`, `left`: where the H x W input lies in the padded
// map the windows move over; outside it, `pad_value`) and as Larq's signs (`signs`: +1 where
// x >= 0, else -1); fold writes an unpadded image (top = left = 0).
//
// Unfold: one thread per patch value, in the patch matrix's order (writes are consecutive; with
// columns, so are the reads of a window row). Fold: one thread per input value, summing the
// patch values that read it in (oy, ox) order (no atomics; deterministic).
#include "common.cuh"

struct Unfold {
    i64 n, c, h, w;  // input
    i64 kh, kw;      // window
    i64 sy, sx;      // strides
    i64 oh, ow;      // output
    i64 groups;      // 0: rows; else columns in this many groups of images
    i64 top, left;   // padding before the input (unfold only)
    i64 signs;       // 1: windows read the input's signs (unfold only)
    double pad_value;
};

// Where value `col` of the window of image `img` at output (oy, ox) lies in the patch matrix.
__device__ __forceinline__ i64 patch_index(const Unfold& u, i64 img, i64 oy, i64 ox, i64 col) {
    const i64 k = u.c * u.kh * u.kw;
    if (u.groups == 0) {
        return ((img * u.oh + oy) * u.ow + ox) * k + col;
    }
    const i64 per = u.n / u.groups, m = per * u.oh * u.ow;
    return (img / per * k + col) * m + ((img % per) * u.oh + oy) * u.ow + ox;
}

template <typename T>
__device__ void unfold(Unfold u, const T* x, T* cols) {
    const i64 k = u.c * u.kh * u.kw, pixels = u.oh * u.ow;
    const u64 total = (u64)(u.n * pixels * k);
    for (u64 i = thread_index(); i < total; i += grid_stride()) {
        i64 img, p, col;
        if (u.groups == 0) {
            col = (i64)i % k;
            p = ((i64)i / k) % pixels;
            img = (i64)i / (k * pixels);
        } else {
            const i64 per = u.n / u.groups, m = per * pixels;
            const i64 at = (i64)i % m;
            col = ((i64)i / m) % k;
            img = (i64)i / (m * k) * per + at / pixels;
            p = at % pixels;
        }
        i64 oy = p / u.ow, ox = p % u.ow;
        i64 tj = col % u.kw, ti = (col / u.kw) % u.kh, ch = col / (u.kw * u.kh);
        i64 y = oy * u.sy + ti - u.top, xx = ox * u.sx + tj - u.left;
        T v = (T)u.pad_value;
        if (y >= 0 && y < u.h && xx >= 0 && xx < u.w) {
            v = x[((img * u.c + ch) * u.h + y) * u.w + xx];
            if (u.signs) {
                v = v >= T(0) ? T(1) : T(-1);
            }
        }
        cols[i] = v;
    }
}

template <typename T>
__device__ void fold(Unfold u, const T* cols, T* x) {
    const u64 total = (u64)(u.n * u.c * u.h * u.w);
    for (u64 i = thread_index(); i < total; i += grid_stride()) {
        i64 xx = (i64)i % u.w, y = ((i64)i / u.w) % u.h;
        i64 ch = ((i64)i / (u.w * u.h)) % u.c, img = (i64)i / (u.w * u.h * u.c);
        T acc = T(0);
        // The windows that hold (y, xx): output rows oy with 0 <= y - oy * sy < kh.
        i64 oy_first = y < u.kh ? 0 : (y - u.kh) / u.sy + 1;
        i64 ox_first = xx < u.kw ? 0 : (xx - u.kw) / u.sx + 1;
        for (i64 oy = oy_first; oy <= y / u.sy && oy < u.oh; ++oy) {
            i64 ti = y - oy * u.sy;
            for (i64 ox = ox_first; ox <= xx / u.sx && ox < u.ow; ++ox) {
                i64 tj = xx - ox * u.sx;
                acc = acc + cols[patch_index(u, img, oy, ox, (ch * u.kh + ti) * u.kw + tj)];
            }
        }
        x[i] = acc;
    }
}

#define ZOO_UNFOLD(T, S)                                                                       \
    extern "C" __global__ void unfold_##S(Unfold u, const T* x, T* cols) {                     \
        unfold(u, x, cols);                                                                    \
    }                                                                                          \
    extern "C" __global__ void fold_##S(Unfold u, const T* cols, T* x) {                       \
        fold(u, cols, x);                                                                      \
    }

ZOO_UNFOLD(float, f32)
ZOO_UNFOLD(double, f64)

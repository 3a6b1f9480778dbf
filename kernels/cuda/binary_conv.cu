// The training-time binary convolution's forward pass on the GPU (kernels/src/binary_conv.rs):
// conv(pad(sign(x), pad_value), sign(w)), VALID after the padding, strided, exact.
//
// Signs are packed 32 channels to a word, bit 1 for -1 (x < 0) and 0 for +1 (x >= 0, ±0 and
// NaN), as the CPU's packed kernels pack them; the bits past the last channel are 0 in both
// operands. Over a word, the dot product of the signs is `valid - 2 popc(a ^ b)`, and over all
// channels `C - 2 * (mismatches)`. A tap that reads padding adds `pad_value * sum_c sign(w)`.
//
// Launches: pack_input (one thread per (n, word, y, x)), pack_weights (one per (o, tap)),
// then conv_forward (one thread per output element; a warp's threads share the output channel,
// so their weight reads are broadcasts).
#include "common.cuh"

struct Conv {
    i64 n, c, h, w;   // input
    i64 o, kh, kw;    // kernel
    i64 sy, sx;       // strides
    i64 top, left;    // padding before the image
    i64 oh, ow;       // output
    int pad_one;      // 1: the padding holds +1; 0: zeros

    __device__ i64 words() const { return (c + 31) / 32; }
};

// Input signs: x (N x C x H x W) -> bits (N x H x W x words).
template <typename T>
__device__ void pack_input(Conv g, const T* x, unsigned* bits) {
    const i64 plane = g.h * g.w, words = g.words();
    const u64 total = (u64)(g.n * words * plane);
    for (u64 i = thread_index(); i < total; i += grid_stride()) {
        i64 p = (i64)i % plane;
        i64 q = ((i64)i / plane) % words;
        i64 img = (i64)i / (plane * words);
        unsigned word = 0;
        for (int b = 0; b < 32; ++b) {
            i64 ch = 32 * q + b;
            if (ch < g.c && x[(img * g.c + ch) * plane + p] < T(0)) {
                word |= 1u << b;
            }
        }
        bits[(img * plane + p) * words + q] = word;
    }
}

// Kernel signs: w (O x C x kh x kw) -> bits (O x kh*kw x words), and per (o, tap) the sum of
// the signs over the channels (what a padded tap contributes when the padding is +1).
template <typename T>
__device__ void pack_weights(Conv g, const T* w, unsigned* bits, int* tap_sums) {
    const i64 taps = g.kh * g.kw, words = g.words();
    const u64 total = (u64)(g.o * taps);
    for (u64 i = thread_index(); i < total; i += grid_stride()) {
        i64 t = (i64)i % taps, oc = (i64)i / taps;
        int negatives = 0;
        for (i64 q = 0; q < words; ++q) {
            unsigned word = 0;
            for (int b = 0; b < 32; ++b) {
                i64 ch = 32 * q + b;
                if (ch < g.c && w[(oc * g.c + ch) * taps + t] < T(0)) {
                    word |= 1u << b;
                    ++negatives;
                }
            }
            bits[(oc * taps + t) * words + q] = word;
        }
        tap_sums[i] = (int)g.c - 2 * negatives;
    }
}

// One output element per thread, NCHW order.
template <typename T>
__device__ void conv_forward(Conv g, const unsigned* xbits, const unsigned* wbits,
                             const int* tap_sums, T* out) {
    const i64 taps = g.kh * g.kw, words = g.words();
    const u64 total = (u64)(g.n * g.o * g.oh * g.ow);
    for (u64 i = thread_index(); i < total; i += grid_stride()) {
        i64 ox = (i64)i % g.ow;
        i64 oy = ((i64)i / g.ow) % g.oh;
        i64 oc = ((i64)i / (g.ow * g.oh)) % g.o;
        i64 img = (i64)i / (g.ow * g.oh * g.o);
        i64 acc = 0;
        for (i64 ti = 0; ti < g.kh; ++ti) {
            i64 y = oy * g.sy + ti - g.top;
            for (i64 tj = 0; tj < g.kw; ++tj) {
                i64 x = ox * g.sx + tj - g.left;
                i64 t = ti * g.kw + tj;
                if (y < 0 || y >= g.h || x < 0 || x >= g.w) {
                    acc += g.pad_one ? tap_sums[oc * taps + t] : 0;
                    continue;
                }
                const unsigned* a = xbits + ((img * g.h + y) * g.w + x) * words;
                const unsigned* b = wbits + (oc * taps + t) * words;
                int mismatches = 0;
                for (i64 q = 0; q < words; ++q) {
                    mismatches += __popc(a[q] ^ b[q]);
                }
                acc += g.c - 2 * mismatches;
            }
        }
        out[i] = (T)acc;
    }
}

#define ZOO_BINARY_CONV(T, S)                                                                  \
    extern "C" __global__ void pack_input_##S(Conv g, const T* x, unsigned* bits) {            \
        pack_input(g, x, bits);                                                                \
    }                                                                                          \
    extern "C" __global__ void pack_weights_##S(Conv g, const T* w, unsigned* bits,            \
                                                int* tap_sums) {                               \
        pack_weights(g, w, bits, tap_sums);                                                    \
    }                                                                                          \
    extern "C" __global__ void conv_forward_##S(Conv g, const unsigned* xbits,                 \
                                                const unsigned* wbits, const int* tap_sums,    \
                                                T* out) {                                      \
        conv_forward(g, xbits, wbits, tap_sums, out);                                          \
    }

ZOO_BINARY_CONV(float, f32)
ZOO_BINARY_CONV(double, f64)

// The bit-packed inference engine's binary layers on the GPU (kernels/src/packed/cuda.rs), on
// the bits of the CPU's packed kernels (kernels/src/packed/mod.rs): bit 1 means -1, bit 0 +1;
// a batch of NHWC maps, each pixel's channels in `words` u32 words (channel c in word c / 32,
// bit c % 32: a CPU map's u64 words read as pairs of u32), `words` even, unused bits 0.
//
// - pack_signs: Larq's sign of float NHWC maps (bit 1 where x < 0), a warp per 32 channels of a
//   pixel, the word from one ballot;
// - lab_pack_folded / lab_pack_paired: LAB's 3x3 depthwise score, thresholded (bit 0 only
//   where the score is > 0) and packed, in the CPU's order of f32 operations (fused
//   multiply-adds, taps row-major, taps outside the image skipped), so the bits are the CPU's;
// - binary_conv_mma: the exact integer ±1 convolution on binary tensor cores
//   (mma.m16n8k256 with AND + popcount, sm_80 and later) as an implicit GEMM: rows are output
//   pixels, columns output channels, the reduction runs over (tap, word) in 256-bit chunks;
//   binary_conv_popc the same on CUDA cores (XOR + popcount), for any GPU;
// - dots_epilogue: the per-channel transforms of the dots and a residual, as floats and/or
//   packed signs (binary_conv_mma_epilogue: the tensor-core convolution with it fused);
// - max_pool_bits: max pooling of ±1 maps, the AND of the taps inside the image.
#include "common.cuh"

#define FULL_MASK 0xffffffffu

// ---------------------------------------------------------------------------------------
// Packing.

// One warp per (pixel, word) of `pixels` pixels of `words` words: lane l decides channel
// 32 q + l with `negative(p, c)`, called only for channels below `channels`; the word is the
// warp's ballot, so the words past ceil(channels / 32) are 0.
template <typename Negative>
__device__ __forceinline__ void pack_by_warps(i64 pixels, int channels, int words,
                                              unsigned* bits, Negative negative) {
    const int lane = threadIdx.x & 31;
    const u64 warps = grid_stride() / 32;
    const u64 total = (u64)pixels * words;
    for (u64 i = thread_index() / 32; i < total; i += warps) {
        const i64 p = (i64)(i / words);
        const int c = 32 * (int)(i % words) + lane;
        const unsigned word = __ballot_sync(FULL_MASK, c < channels && negative(p, c));
        if (lane == 0) {
            bits[i] = word;
        }
    }
}

// x: [pixels][channels] floats -> bits: [pixels][words].
extern "C" __global__ void pack_signs(const float* x, unsigned* bits, i64 pixels, int channels,
                                      int words) {
    pack_by_warps(pixels, channels, words, bits,
                  [=](i64 p, int c) { return x[p * channels + c] < 0.0f; });
}

// The shape of LAB's input and output maps: n images of h x w pixels, c channels, `words` u32
// words per output pixel.
struct LabMap {
    i64 n;
    int h, w, c, words;
};

// LAB's score of channel `c` at pixel (img, y, x), folded form:
// acc = bias[c]; for each tap inside the image, acc = fma(kernel[t][c], x[p + t][c], acc).
__device__ __forceinline__ float lab_score_folded(LabMap m, const float* x, const float* kernel,
                                                  const float* bias, i64 img, int y, int xx,
                                                  int c) {
    float acc = bias[c];
    for (int ky = 0; ky < 3; ++ky) {
        const int sy = y + ky - 1;
        if (sy < 0 || sy >= m.h) {
            continue;
        }
        for (int kx = 0; kx < 3; ++kx) {
            const int sx = xx + kx - 1;
            if (sx < 0 || sx >= m.w) {
                continue;
            }
            const float v = x[((img * m.h + sy) * m.w + sx) * m.c + c];
            acc = fmaf(kernel[(3 * ky + kx) * m.c + c], v, acc);
        }
    }
    return acc;
}

// The paired form: acc = fma(pos[t][c], x[p + t][pos_source[c]], acc), then
// acc = fma(-neg[t][c], x[p + t][neg_source[c]], acc), per tap.
__device__ __forceinline__ float lab_score_paired(LabMap m, const float* x, const float* pos,
                                                  const int* pos_source, const float* neg,
                                                  const int* neg_source, const float* bias,
                                                  i64 img, int y, int xx, int c) {
    const int ps = pos_source[c], ns = neg_source[c];
    float acc = bias[c];
    for (int ky = 0; ky < 3; ++ky) {
        const int sy = y + ky - 1;
        if (sy < 0 || sy >= m.h) {
            continue;
        }
        for (int kx = 0; kx < 3; ++kx) {
            const int sx = xx + kx - 1;
            if (sx < 0 || sx >= m.w) {
                continue;
            }
            const float* px = x + ((img * m.h + sy) * m.w + sx) * m.c;
            const int t = 3 * ky + kx;
            acc = fmaf(pos[t * m.c + c], px[ps], acc);
            acc = fmaf(-neg[t * m.c + c], px[ns], acc);
        }
    }
    return acc;
}

// Bit 1 unless the score is > 0 (ties and NaN give -1), one warp per (pixel, word).
extern "C" __global__ void lab_pack_folded(LabMap m, const float* x, const float* kernel,
                                           const float* bias, unsigned* bits) {
    pack_by_warps(m.n * m.h * m.w, m.c, m.words, bits, [=](i64 p, int c) {
        const int xx = (int)(p % m.w), y = (int)((p / m.w) % m.h);
        const i64 img = p / ((i64)m.w * m.h);
        return !(lab_score_folded(m, x, kernel, bias, img, y, xx, c) > 0.0f);
    });
}

extern "C" __global__ void lab_pack_paired(LabMap m, const float* x, const float* pos,
                                           const int* pos_source, const float* neg,
                                           const int* neg_source, const float* bias,
                                           unsigned* bits) {
    pack_by_warps(m.n * m.h * m.w, m.c, m.words, bits, [=](i64 p, int c) {
        const int xx = (int)(p % m.w), y = (int)((p / m.w) % m.h);
        const i64 img = p / ((i64)m.w * m.h);
        return !(lab_score_paired(m, x, pos, pos_source, neg, neg_source, bias, img, y, xx, c) >
                 0.0f);
    });
}

// ---------------------------------------------------------------------------------------
// Binary convolution on binary tensor cores.
//
// For output pixel m and output channel o, with a_t, b_t the bits of tap t of m's window and
// of filter o, and the padded taps read as +1 (bits 0):
//   dot_one = sum_t (C - 2 popc(a_t ^ b_t)) = C taps - 2 (popc(a) + popc(b) - 2 popc(a & b)),
// which is the convolution with +1 padding. The tensor cores give popc(a & b); popc(a) is
// summed from the same fragments; popc(b) per filter comes with the weights. With zero
// padding, each tap outside the image contributes C - 2 popc(b_t) = tap_sums[o][t] to dot_one
// and nothing to the convolution, so it is subtracted.
//
// Weights: [o_padded][chunks * 8] u32, word k = t * words + q of filter o (zeros past
// taps * words and for the padded filters), o_padded a multiple of the block's 32 columns.

struct BinaryConvShape {
    i64 n;              // images
    int h, w, words;    // input rows, columns, u32 words per pixel
    int channels;       // input channels (the bits in use)
    int out_channels;   // filters
    int kh, kw, sy, sx, top, left;
    int oh, ow;
    int pad_one;        // 1: the padding holds +1; 0: zeros
    int chunks;         // 256-bit chunks of the reduction: ceil(kh kw words / 8)
};

// The warps of a block; each computes 16 output pixels x 32 output channels.
#define MMA_WARPS 4

// D = popc(A & B) + C for a 16 x 256 bit tile of A (rows) and a 256 x 8 bit tile of B. Binary
// tensor cores with AND exist from compute capability 8.0; the host runs binary_conv_popc on
// older GPUs, where this traps.
__device__ __forceinline__ void mma_and_popc(int* d, const unsigned* a, const unsigned* b) {
#if __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    __trap();
#endif
}

// One output pixel's window: its image and top-left corner in the input (which may lie in the
// padding), and whether it is a pixel at all (rows past the last pixel compute zeros).
struct Window {
    i64 img;
    int y0, x0;
    bool valid;
};

__device__ __forceinline__ Window window_of(BinaryConvShape s, i64 m) {
    Window win;
    const i64 pixels = s.n * s.oh * s.ow;
    win.valid = m < pixels;
    const i64 mm = win.valid ? m : 0;
    const int ox = (int)(mm % s.ow), oy = (int)((mm / s.ow) % s.oh);
    win.img = mm / ((i64)s.ow * s.oh);
    win.y0 = oy * s.sy - s.top;
    win.x0 = ox * s.sx - s.left;
    return win;
}

// Word k = t * words + q of the reduction: tap t's offset in the window and the word q of the
// pixel, or `real` false past the reduction.
struct ReductionWord {
    int dy, dx, q;
    bool real;
};

__device__ __forceinline__ ReductionWord reduction_word(BinaryConvShape s, int k) {
    ReductionWord r;
    const int t = k / s.words;
    r.real = t < s.kh * s.kw;
    r.q = k - t * s.words;
    r.dy = t / s.kw;
    r.dx = t - r.dy * s.kw;
    return r;
}

// The input word of `word` in the window: 0 in the padding, past the reduction and for rows
// that are no pixel.
__device__ __forceinline__ unsigned window_word(BinaryConvShape s, const unsigned* in, Window win,
                                                ReductionWord word) {
    const int y = win.y0 + word.dy, x = win.x0 + word.dx;
    if (!win.valid || !word.real || y < 0 || y >= s.h || x < 0 || x >= s.w) {
        return 0;
    }
    return __ldg(in + ((win.img * s.h + y) * s.w + x) * s.words + word.q);
}

// Zero padding: the sum over the window's taps outside the image of tap_sums[o][t].
__device__ __forceinline__ int outside_taps(BinaryConvShape s, Window win, const int* tap_sums,
                                            int o) {
    if (win.y0 >= 0 && win.x0 >= 0 && win.y0 + s.kh <= s.h && win.x0 + s.kw <= s.w) {
        return 0;
    }
    int sum = 0;
    for (int ky = 0; ky < s.kh; ++ky) {
        for (int kx = 0; kx < s.kw; ++kx) {
            const int y = win.y0 + ky, x = win.x0 + kx;
            if (y < 0 || y >= s.h || x < 0 || x >= s.w) {
                sum += tap_sums[o * s.kh * s.kw + ky * s.kw + kx];
            }
        }
    }
    return sum;
}

// The output transform (`dots_epilogue`'s): how many pixels and channels, the ops, whether a
// residual is added and what is written.
struct Epilogue {
    i64 pixels;
    int channels, words;  // output channels; u32 words per pixel of `bits`
    int ops;              // the number of ops
    int residual;         // 1: add residual[i] after the ops
    int write_values;     // 1: write the floats to `values`
    int write_signs;      // 1: write Larq's signs of the floats to `bits`
};

// One warp's tile of the convolution: 16 output pixels from m0 x 32 output channels from n0.
// The thread holds dot[j][i] for row group + 8 (i >> 1) (rows[i >> 1]) and output channel
// n0 + 8 j + 2 member + (i & 1), as the tensor cores' accumulators are laid out.
struct MmaTile {
    i64 m0;
    int n0;
    Window rows[2];
    int dot[4][4];
};

// Block (blockIdx.x, blockIdx.y), warp `warp`: the tile's exact dots.
__device__ __forceinline__ MmaTile mma_tile(BinaryConvShape s, const unsigned* in,
                                            const unsigned* weights, const int* filter_popc,
                                            const int* tap_sums) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int group = lane >> 2, member = lane & 3;
    MmaTile t;
    t.m0 = ((i64)blockIdx.x * MMA_WARPS + warp) * 16;
    t.n0 = blockIdx.y * 32;
    const int k8 = s.chunks * 8;

    // This thread's rows of A: group and group + 8 of the warp's 16 pixels.
    t.rows[0] = window_of(s, t.m0 + group);
    t.rows[1] = window_of(s, t.m0 + group + 8);
    int acc[4][4] = {};
    int popc_a[2] = {0, 0};
    for (int chunk = 0; chunk < s.chunks; ++chunk) {
        const int k = chunk * 8 + member;
        const ReductionWord low = reduction_word(s, k), high = reduction_word(s, k + 4);
        // a0, a2: row `group`, words k and k + 4; a1, a3: row `group + 8`.
        unsigned a[4];
        a[0] = window_word(s, in, t.rows[0], low);
        a[1] = window_word(s, in, t.rows[1], low);
        a[2] = window_word(s, in, t.rows[0], high);
        a[3] = window_word(s, in, t.rows[1], high);
        popc_a[0] += __popc(a[0]) + __popc(a[2]);
        popc_a[1] += __popc(a[1]) + __popc(a[3]);
        // The warp reconverged after the gathers: `mma.sync.aligned` needs all 32 lanes.
        __syncwarp();
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            // b0, b1: words k and k + 4 of filter n0 + 8 j + group.
            const unsigned* filter = weights + (i64)(t.n0 + 8 * j + group) * k8;
            const unsigned b[2] = {__ldg(filter + k), __ldg(filter + k + 4)};
            mma_and_popc(acc[j], a, b);
        }
    }
    // popc(a) of each row over the four members of its group.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        popc_a[r] += __shfl_xor_sync(FULL_MASK, popc_a[r], 1);
        popc_a[r] += __shfl_xor_sync(FULL_MASK, popc_a[r], 2);
    }
    const int k_bits = s.channels * s.kh * s.kw;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int r = i >> 1;
            const int o = min(t.n0 + 8 * j + 2 * member + (i & 1), s.out_channels - 1);
            int dot = k_bits - 2 * (popc_a[r] + filter_popc[o] - 2 * acc[j][i]);
            if (!s.pad_one && t.rows[r].valid) {
                dot -= outside_taps(s, t.rows[r], tap_sums, o);
            }
            t.dot[j][i] = dot;
        }
    }
    return t;
}

// Grid: (ceil(pixels / (16 MMA_WARPS)), o_padded / 32); block: 32 MMA_WARPS threads. Writes
// dots: [pixels][out_channels] (pixel-major, as the CPU's rows of dots).
extern "C" __global__ void __launch_bounds__(32 * MMA_WARPS)
    binary_conv_mma(BinaryConvShape s, const unsigned* in, const unsigned* weights,
                    const int* filter_popc, const int* tap_sums, int* dots) {
    const MmaTile t = mma_tile(s, in, weights, filter_popc, tap_sums);
    const int lane = threadIdx.x & 31, group = lane >> 2, member = lane & 3;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int r = i >> 1;
            const int o = t.n0 + 8 * j + 2 * member + (i & 1);
            if (t.rows[r].valid && o < s.out_channels) {
                dots[(t.m0 + group + 8 * r) * s.out_channels + o] = t.dot[j][i];
            }
        }
    }
}

// binary_conv_mma with `dots_epilogue` fused: the tile's dots transformed in registers, the
// residual added, the floats written and/or their signs, one u32 word per pixel and warp (its
// 32 output channels from n0 = 32 blockIdx.y are word blockIdx.y of the pixel), gathered from
// the four members of each row's group.
extern "C" __global__ void __launch_bounds__(32 * MMA_WARPS)
    binary_conv_mma_epilogue(BinaryConvShape s, const unsigned* in, const unsigned* weights,
                             const int* filter_popc, const int* tap_sums, Epilogue e,
                             const int* kinds, const int* offsets, const float* params,
                             const float* residual, float* values, unsigned* bits) {
    const MmaTile t = mma_tile(s, in, weights, filter_popc, tap_sums);
    const int lane = threadIdx.x & 31, group = lane >> 2, member = lane & 3;
    unsigned word[2] = {0u, 0u};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int r = i >> 1;
            const int column = 8 * j + 2 * member + (i & 1);
            const int o = t.n0 + column;
            if (!t.rows[r].valid || o >= s.out_channels) {
                continue;
            }
            const i64 at = (t.m0 + group + 8 * r) * s.out_channels + o;
            float v = channel_ops((float)t.dot[j][i], o, e.channels, e.ops, kinds, offsets,
                                  params);
            if (e.residual) {
                v = v + residual[at];
            }
            if (e.write_values) {
                values[at] = v;
            }
            word[r] |= (unsigned)(v < 0.0f) << column;
        }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        word[r] |= __shfl_xor_sync(FULL_MASK, word[r], 1);
        word[r] |= __shfl_xor_sync(FULL_MASK, word[r], 2);
        if (e.write_signs && member == 0 && t.rows[r].valid) {
            unsigned* pixel = bits + (t.m0 + group + 8 * r) * e.words;
            pixel[blockIdx.y] = word[r];
            // With an odd number of 32-channel words the pixel's last word has no warp: 0.
            if (blockIdx.y + 1 == gridDim.y && gridDim.y < e.words) {
                pixel[gridDim.y] = 0u;
            }
        }
    }
}

// The same dots on CUDA cores: one thread per (pixel, filter), filters fastest (a warp's
// threads read the same input words), XOR and popcount per tap inside the image; a tap in the
// padding adds tap_sums[o][t] with +1 padding and nothing with zeros. Any compute capability.
extern "C" __global__ void binary_conv_popc(BinaryConvShape s, const unsigned* in,
                                            const unsigned* weights, const int* tap_sums,
                                            int* dots) {
    const int taps = s.kh * s.kw, k8 = s.chunks * 8;
    const u64 total = (u64)s.n * s.oh * s.ow * s.out_channels;
    for (u64 i = thread_index(); i < total; i += grid_stride()) {
        const int o = (int)(i % s.out_channels);
        const Window win = window_of(s, (i64)(i / s.out_channels));
        const unsigned* filter = weights + (i64)o * k8;
        int dot = 0;
        for (int t = 0; t < taps; ++t) {
            const int y = win.y0 + t / s.kw, x = win.x0 + t % s.kw;
            if (y < 0 || y >= s.h || x < 0 || x >= s.w) {
                dot += s.pad_one ? tap_sums[o * taps + t] : 0;
                continue;
            }
            const unsigned* a = in + ((win.img * s.h + y) * s.w + x) * s.words;
            const unsigned* b = filter + t * s.words;
            int mismatches = 0;
            for (int q = 0; q < s.words; ++q) {
                mismatches += __popc(__ldg(a + q) ^ __ldg(b + q));
            }
            dot += s.channels - 2 * mismatches;
        }
        dots[i] = dot;
    }
}

// ---------------------------------------------------------------------------------------
// Max pooling on bits.

struct PoolShape {
    i64 n;
    int h, w, channels, words;
    int kh, kw, sy, sx, top, left;
    int oh, ow;
};

// One thread per output word: the AND of the window's taps inside the image (a window with
// none gives -1 on every channel: all the word's bits in use).
extern "C" __global__ void max_pool_bits(PoolShape s, const unsigned* in, unsigned* out) {
    const u64 total = (u64)s.n * s.oh * s.ow * s.words;
    for (u64 i = thread_index(); i < total; i += grid_stride()) {
        const int q = (int)(i % s.words);
        const i64 p = (i64)(i / s.words);
        const int ox = (int)(p % s.ow), oy = (int)((p / s.ow) % s.oh);
        const i64 img = p / ((i64)s.ow * s.oh);
        const int y0 = max(oy * s.sy - s.top, 0), y1 = min(oy * s.sy - s.top + s.kh, s.h);
        const int x0 = max(ox * s.sx - s.left, 0), x1 = min(ox * s.sx - s.left + s.kw, s.w);
        const int used = min(max(s.channels - 32 * q, 0), 32);
        unsigned word = used == 32 ? FULL_MASK : (1u << used) - 1u;
        for (int y = y0; y < y1; ++y) {
            for (int x = x0; x < x1; ++x) {
                word &= in[((img * s.h + y) * s.w + x) * s.words + q];
            }
        }
        out[i] = word;
    }
}

// ---------------------------------------------------------------------------------------
// The output transform of a binary convolution: per-channel ops on its dots, then a residual,
// written as floats and/or as packed signs for a binarized next layer (the popcount path's; the
// tensor cores' runs fused in binary_conv_mma_epilogue).

// One warp per (pixel, word of 32 output channels).
extern "C" __global__ void dots_epilogue(Epilogue e, const int* dots, const int* kinds,
                                         const int* offsets, const float* params,
                                         const float* residual, float* values,
                                         unsigned* bits) {
    const int lane = threadIdx.x & 31;
    const u64 warps = grid_stride() / 32;
    const u64 total = (u64)e.pixels * e.words;
    for (u64 w = thread_index() / 32; w < total; w += warps) {
        const i64 p = (i64)(w / e.words);
        const int q = (int)(w % e.words);
        const int c = 32 * q + lane;
        bool negative = false;
        if (c < e.channels) {
            const i64 i = p * e.channels + c;
            float v = channel_ops((float)dots[i], c, e.channels, e.ops, kinds, offsets, params);
            if (e.residual) {
                v = v + residual[i];
            }
            if (e.write_values) {
                values[i] = v;
            }
            negative = v < 0.0f;
        }
        const unsigned word = __ballot_sync(FULL_MASK, negative);
        if (e.write_signs && lane == 0) {
            bits[w] = word;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Packed signs as floats: -1 where the bit is 1, else +1, for a float layer that reads them.

extern "C" __global__ void unpack_signs(i64 pixels, int channels, int words,
                                        const unsigned* bits, float* out) {
    const u64 total = (u64)pixels * channels;
    for (u64 i = thread_index(); i < total; i += grid_stride()) {
        const int c = (int)(i % channels);
        const unsigned word = bits[(i64)(i / channels) * words + c / 32];
        out[i] = (word >> (c % 32)) & 1u ? -1.0f : 1.0f;
    }
}

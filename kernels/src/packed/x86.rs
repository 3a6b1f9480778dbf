//! x86-64 kernels: AVX2 and AVX-512 (VPOPCNTDQ) convolution tiles, AVX2 sign packing.
//!
//! Both convolution kernels hold `LANES` filters per vector (the plan's transposed weights,
//! `[block][word][lane]`), broadcast one input word to every lane, XOR and count. AVX-512 counts
//! with `vpopcntq`; AVX2 with the nibble table (`vpshufb`), summing byte counts for up to 31
//! words (at most 8 per byte each) before widening them with `vpsadbw`.

use super::conv::Plan;
use std::arch::x86_64::*;

/// `super::pack_scalar` (Larq's sign, bit 1 where `x < 0`) 8 values at a time.
///
/// # Safety
/// The CPU must support AVX2; `out` must hold `ceil(channels / 64)` words per pixel of `x`.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn pack_avx2(x: &[f32], channels: usize, out: &mut [u64]) {
    let words = super::words_for(channels);
    if channels == 0 {
        return;
    }
    let zero = _mm256_setzero_ps();
    for (px, ws) in x.chunks_exact(channels).zip(out.chunks_exact_mut(words)) {
        for (chunk, w) in px.chunks(64).zip(ws.iter_mut()) {
            let mut word = 0u64;
            let groups = chunk.len() / 8;
            for g in 0..groups {
                // SAFETY: 8 values from 8 g lie in the chunk.
                let v = unsafe { _mm256_loadu_ps(chunk.as_ptr().add(8 * g)) };
                let negative = _mm256_cmp_ps::<_CMP_LT_OQ>(v, zero);
                word |= u64::from(_mm256_movemask_ps(negative) as u32) << (8 * g);
            }
            for (i, &v) in chunk.iter().enumerate().skip(8 * groups) {
                word |= u64::from(v < 0.0) << i;
            }
            *w = word;
        }
    }
}

/// Output pixels per AVX-512 tile.
const AVX512_PIXELS: usize = 4;
/// Blocks of 8 filters per AVX-512 tile.
const AVX512_BLOCKS: usize = 4;

/// The AVX-512 row kernel, for the output `channels` (starting at a multiple of 8).
///
/// # Safety
/// The CPU must support AVX-512 F, VL and VPOPCNTDQ; the plan's weights must be laid out in
/// blocks of 8 filters.
#[target_feature(enable = "avx512f,avx512vl,avx512vpopcntdq")]
pub(super) unsafe fn avx512_row(
    plan: &Plan,
    oy: usize,
    dots: &mut [i32],
    channels: std::ops::Range<usize>,
) {
    assert_eq!(dots.len(), plan.ow * plan.oc);
    assert_eq!(plan.weights.len(), plan.oc.div_ceil(8) * plan.len * 8);
    plan.for_each_tile(
        channels,
        8,
        AVX512_PIXELS,
        AVX512_BLOCKS,
        |ox, np, b, nb| {
            macro_rules! tile {
            ($($p:literal, $b:literal);*) => {
                match (np, nb) {
                    // SAFETY: the tile lies inside the row (see `avx512_tile`).
                    $(($p, $b) => unsafe { avx512_tile::<$p, $b>(plan, oy, ox, b, dots) },)*
                    _ => unreachable!(),
                }
            };
        }
            tile!(1, 1; 1, 2; 1, 3; 1, 4; 2, 1; 2, 2; 2, 3; 2, 4;
              3, 1; 3, 2; 3, 3; 3, 4; 4, 1; 4, 2; 4, 3; 4, 4)
        },
    );
}

/// Output pixels `ox..ox + P` times the filters of blocks `b..b + B` (8 each).
///
/// # Safety
/// AVX-512 F, VL and VPOPCNTDQ; `ox + P <= ow`, `b + B <= ceil(oc / 8)`, `dots` holds the row.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx512vpopcntdq")]
unsafe fn avx512_tile<const P: usize, const B: usize>(
    plan: &Plan,
    oy: usize,
    ox: usize,
    b: usize,
    dots: &mut [i32],
) {
    let (seg, len, row_stride) = (plan.seg, plan.len, plan.row_stride);
    let pstride = plan.sx * plan.words;
    // The last patch word read is that of pixel ox + P - 1, row kh - 1, word seg - 1: inside
    // the padded input since that pixel's window fits it.
    let x = unsafe { plan.padded.as_ptr().add(plan.patch_offset(oy, ox)) };
    let w = unsafe { plan.weights.as_ptr().add(b * len * 8) };
    let mut acc = [[_mm512_setzero_si512(); B]; P];
    for ky in 0..plan.kh {
        let xr = unsafe { x.add(ky * row_stride) };
        let wr = unsafe { w.add(ky * seg * 8) };
        for j in 0..seg {
            let wv: [__m512i; B] = std::array::from_fn(|f| unsafe {
                _mm512_loadu_si512(wr.add(f * len * 8 + j * 8) as *const __m512i)
            });
            for (p, acc) in acc.iter_mut().enumerate() {
                let xv = _mm512_set1_epi64(unsafe { *xr.add(p * pstride + j) } as i64);
                for (a, &wv) in acc.iter_mut().zip(&wv) {
                    *a = _mm512_add_epi64(*a, _mm512_popcnt_epi64(_mm512_xor_si512(xv, wv)));
                }
            }
        }
    }
    let total = _mm256_set1_epi32(plan.total);
    let oc = plan.oc;
    let last = oc - (b + B - 1) * 8;
    let mask: __mmask8 = if last >= 8 { 0xff } else { (1u8 << last) - 1 };
    assert!(dots.len() >= (ox + P - 1) * oc + (b + B - 1) * 8 + last.min(8));
    for (p, acc) in acc.iter().enumerate() {
        for (f, &a) in acc.iter().enumerate() {
            let d = _mm256_sub_epi32(total, _mm256_slli_epi32::<1>(_mm512_cvtepi64_epi32(a)));
            let dst = unsafe { dots.as_mut_ptr().add((ox + p) * oc + (b + f) * 8) };
            if f + 1 == B {
                unsafe { _mm256_mask_storeu_epi32(dst, mask, d) };
            } else {
                unsafe { _mm256_storeu_si256(dst as *mut __m256i, d) };
            }
        }
    }
}

/// Output pixels per AVX2 tile.
const AVX2_PIXELS: usize = 3;
/// Blocks of 4 filters per AVX2 tile.
const AVX2_BLOCKS: usize = 2;

/// The AVX2 row kernel, for the output `channels` (starting at a multiple of 4).
///
/// # Safety
/// The CPU must support AVX2; the plan's weights must be laid out in blocks of 4 filters.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn avx2_row(
    plan: &Plan,
    oy: usize,
    dots: &mut [i32],
    channels: std::ops::Range<usize>,
) {
    assert_eq!(dots.len(), plan.ow * plan.oc);
    assert_eq!(plan.weights.len(), plan.oc.div_ceil(4) * plan.len * 4);
    plan.for_each_tile(channels, 4, AVX2_PIXELS, AVX2_BLOCKS, |ox, np, b, nb| {
        macro_rules! tile {
            ($($p:literal, $b:literal);*) => {
                match (np, nb) {
                    // SAFETY: the tile lies inside the row (see `avx2_tile`).
                    $(($p, $b) => unsafe { avx2_tile::<$p, $b>(plan, oy, ox, b, dots) },)*
                    _ => unreachable!(),
                }
            };
        }
        tile!(1, 1; 1, 2; 2, 1; 2, 2; 3, 1; 3, 2)
    });
}

/// The popcount of every byte of `v`, by the nibble table `lut`.
#[inline]
#[target_feature(enable = "avx2")]
fn popcount_bytes(v: __m256i, lut: __m256i, low: __m256i) -> __m256i {
    let lo = _mm256_and_si256(v, low);
    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
    _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi))
}

/// Output pixels `ox..ox + P` times the filters of blocks `b..b + B` (4 each).
///
/// # Safety
/// AVX2; `ox + P <= ow`, `b + B <= ceil(oc / 4)`, `dots` holds the row.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn avx2_tile<const P: usize, const B: usize>(
    plan: &Plan,
    oy: usize,
    ox: usize,
    b: usize,
    dots: &mut [i32],
) {
    let (seg, len, row_stride) = (plan.seg, plan.len, plan.row_stride);
    let pstride = plan.sx * plan.words;
    let x = unsafe { plan.padded.as_ptr().add(plan.patch_offset(oy, ox)) };
    let w = unsafe { plan.weights.as_ptr().add(b * len * 4) };
    let lut = _mm256_setr_epi8(
        0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3,
        3, 4,
    );
    let low = _mm256_set1_epi8(0x0f);
    let zero = _mm256_setzero_si256();
    let mut wide = [[zero; B]; P];
    let mut bytes = [[zero; B]; P];
    // Words counted into `bytes` since the last widening: at most 31 (8 per byte each).
    let mut pending = 0;
    for ky in 0..plan.kh {
        let xr = unsafe { x.add(ky * row_stride) };
        let wr = unsafe { w.add(ky * seg * 4) };
        for j in 0..seg {
            let wv: [__m256i; B] = std::array::from_fn(|f| unsafe {
                _mm256_loadu_si256(wr.add(f * len * 4 + j * 4) as *const __m256i)
            });
            for (p, bytes) in bytes.iter_mut().enumerate() {
                let xv = _mm256_set1_epi64x(unsafe { *xr.add(p * pstride + j) } as i64);
                for (a, &wv) in bytes.iter_mut().zip(&wv) {
                    *a = _mm256_add_epi8(*a, popcount_bytes(_mm256_xor_si256(xv, wv), lut, low));
                }
            }
            pending += 1;
            if pending == 31 {
                pending = 0;
                for (wide, bytes) in wide.iter_mut().zip(bytes.iter_mut()) {
                    for (w, b) in wide.iter_mut().zip(bytes.iter_mut()) {
                        *w = _mm256_add_epi64(*w, _mm256_sad_epu8(*b, zero));
                        *b = zero;
                    }
                }
            }
        }
    }
    let total = _mm_set1_epi32(plan.total);
    let pick = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
    let oc = plan.oc;
    let last = oc - (b + B - 1) * 4;
    let mask = _mm_setr_epi32(
        -((last > 0) as i32),
        -((last > 1) as i32),
        -((last > 2) as i32),
        -((last > 3) as i32),
    );
    assert!(dots.len() >= (ox + P - 1) * oc + (b + B - 1) * 4 + last.min(4));
    for p in 0..P {
        for f in 0..B {
            let counts = _mm256_add_epi64(wide[p][f], _mm256_sad_epu8(bytes[p][f], zero));
            let counts = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(counts, pick));
            let d = _mm_sub_epi32(total, _mm_slli_epi32::<1>(counts));
            let dst = unsafe { dots.as_mut_ptr().add((ox + p) * oc + (b + f) * 4) };
            if f + 1 == B {
                unsafe { _mm_maskstore_epi32(dst, mask, d) };
            } else {
                unsafe { _mm_storeu_si128(dst as *mut __m128i, d) };
            }
        }
    }
}

/// The kernel of LAB's `T` terms for one channel chunk, as vectors: `[term][tap]`.
type LabTaps<V, const T: usize> = [[V; 9]; T];

/// What the LAB row kernels share: the image, its terms and the input rows of the output row.
struct LabRow<'a, const T: usize> {
    terms: &'a [(&'a [f32], &'a [f32]); T],
    w: usize,
    c: usize,
    /// The input row of each kernel row, `None` outside the image.
    rows: [Option<usize>; 3],
}

impl<'a, const T: usize> LabRow<'a, T> {
    fn new(
        terms: &'a [(&'a [f32], &'a [f32]); T],
        bias: &[f32],
        [h, w, c]: [usize; 3],
        y: usize,
        out: &[u64],
    ) -> Self {
        assert!(out.len() == w * super::words_for(c) && bias.len() == c);
        assert!(terms
            .iter()
            .all(|t| t.0.len() == 9 * c && t.1.len() == h * w * c));
        let rows = std::array::from_fn(|ky| (y + ky).checked_sub(1).filter(|&iy| iy < h));
        LabRow { terms, w, c, rows }
    }
}

/// The inputs `x0 - 1 .. x0 + P + 1` of input row `iy` for each term, channels from `c0` (mask
/// `m`): zeros for the columns outside the image.
///
/// # Safety
/// AVX-512 F; `x0 + P <= w`, `P <= 6`, the masked channels lie inside the image.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn lab_inputs_avx512<const P: usize, const T: usize>(
    row: &LabRow<T>,
    iy: usize,
    m: __mmask16,
    c0: usize,
    x0: usize,
) -> [[__m512; 8]; T] {
    let mut xin = [[_mm512_setzero_ps(); 8]; T];
    for (xin, term) in xin.iter_mut().zip(row.terms) {
        for (j, v) in xin.iter_mut().enumerate().take(P + 2) {
            // Input column x0 + j - 1.
            if (1..=row.w).contains(&(x0 + j)) {
                let at = (iy * row.w + x0 + j - 1) * row.c + c0;
                *v = unsafe { _mm512_maskz_loadu_ps(m, term.1.as_ptr().add(at)) };
            }
        }
    }
    xin
}

/// The scores (from the bias `b`) of pixels `x0..x0 + P` of a row, channels from `c0` (mask
/// `m`): each input of a kernel row is loaded once for the three taps that read it. Taps
/// outside the image multiply zeros, which for finite kernels adds nothing, as skipping them
/// does (at most the sign of a zero score changes, which the threshold does not see).
///
/// # Safety
/// AVX-512 F; `x0 + P <= w`, `P <= 6`, the masked channels lie inside the image.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn lab_tile_avx512<const P: usize, const T: usize>(
    row: &LabRow<T>,
    k: &LabTaps<__m512, T>,
    b: __m512,
    m: __mmask16,
    c0: usize,
    x0: usize,
) -> [__m512; P] {
    let mut acc = [b; P];
    for (ky, iy) in row.rows.iter().enumerate() {
        let Some(iy) = *iy else { continue };
        // SAFETY: the caller's bounds.
        let xin = unsafe { lab_inputs_avx512::<P, T>(row, iy, m, c0, x0) };
        for kx in 0..3 {
            for (p, acc) in acc.iter_mut().enumerate() {
                for i in 0..T {
                    let (k, v) = (k[i][3 * ky + kx], xin[i][p + kx]);
                    *acc = if i == 0 {
                        _mm512_fmadd_ps(k, v, *acc)
                    } else {
                        _mm512_fnmadd_ps(k, v, *acc)
                    };
                }
            }
        }
    }
    acc
}

/// ORs the bits of scores `d` (pixels from `x`, channels from `c0`, mask `m`) into `out`.
#[inline]
#[target_feature(enable = "avx512f")]
fn lab_emit_avx512(d: &[__m512], m: __mmask16, c0: usize, x: usize, words: usize, out: &mut [u64]) {
    let (word, shift) = (c0 / 64, c0 % 64);
    for (p, &d) in d.iter().enumerate() {
        let bits = !_mm512_cmp_ps_mask::<_CMP_GT_OQ>(d, _mm512_setzero_ps()) & m;
        out[(x + p) * words + word] |= u64::from(bits) << shift;
    }
}

/// Scores the channels from `c0` (mask `m`, kernel `k`, bias `b`) of a row and ORs their bits
/// into `out`, `N` pixels at a time (fewer at the end of the row).
///
/// # Safety
/// AVX-512 F; the masked channels lie inside the image; `N` is 2 or 4.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn lab_chunk_avx512<const N: usize, const T: usize>(
    row: &LabRow<T>,
    k: &LabTaps<__m512, T>,
    b: __m512,
    m: __mmask16,
    c0: usize,
    out: &mut [u64],
) {
    let words = super::words_for(row.c);
    let mut x = 0;
    while x < row.w {
        let n = N.min(row.w - x);
        let emit = |d: &[__m512], out: &mut [u64]| lab_emit_avx512(d, m, c0, x, words, out);
        // SAFETY: pixels x..x + n lie in the row.
        unsafe {
            match n {
                4 => emit(&lab_tile_avx512::<4, T>(row, k, b, m, c0, x), out),
                3 => emit(&lab_tile_avx512::<3, T>(row, k, b, m, c0, x), out),
                2 => emit(&lab_tile_avx512::<2, T>(row, k, b, m, c0, x), out),
                _ => emit(&lab_tile_avx512::<1, T>(row, k, b, m, c0, x), out),
            }
        }
        x += n;
    }
}

/// LAB's scores of row `y`, 16 channels at a time with their 9 taps (per term) in registers,
/// 4 (folded) or 2 (paired) pixels at a time, ORing the bits into `out` (the row's words,
/// zero). The arithmetic and its order are those `super::lab::LabKernel` documents (from the
/// bias, taps in row-major order, those outside the image skipped, each a fused multiply-add,
/// the second term's subtracted).
///
/// # Safety
/// AVX-512 F.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn lab_row_avx512<const T: usize>(
    terms: &[(&[f32], &[f32]); T],
    bias: &[f32],
    dims: [usize; 3],
    y: usize,
    out: &mut [u64],
) {
    let row = LabRow::new(terms, bias, dims, y, out);
    let c = dims[2];
    for c0 in (0..c).step_by(16) {
        let n = 16.min(c - c0);
        let m: __mmask16 = if n == 16 { 0xffff } else { (1 << n) - 1 };
        // SAFETY (loads): masked to the `n` channels from c0, inside the slices.
        let k: LabTaps<__m512, T> = std::array::from_fn(|i| {
            std::array::from_fn(|t| unsafe {
                _mm512_maskz_loadu_ps(m, terms[i].0.as_ptr().add(t * c + c0))
            })
        });
        let b = unsafe { _mm512_maskz_loadu_ps(m, bias.as_ptr().add(c0)) };
        // SAFETY: the chunk's channels lie inside the image.
        unsafe {
            if T == 1 {
                lab_chunk_avx512::<4, T>(&row, &k, b, m, c0, out)
            } else {
                lab_chunk_avx512::<2, T>(&row, &k, b, m, c0, out)
            }
        }
    }
}

/// The scores (from the bias `b`) of interior pixels `x0..x0 + P` (all their taps inside the
/// row), channels from `c0` (mask `m`): each input of a kernel row is loaded once for the
/// three taps that read it, in the same order of operations as `lab_pixels_avx2`.
///
/// # Safety
/// AVX2 and FMA; `1 <= x0`, `x0 + P < w`, `P <= 6`, the masked channels lie inside the image.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn lab_interior_avx2<const P: usize, const T: usize>(
    row: &LabRow<T>,
    k: &LabTaps<__m256, T>,
    b: __m256,
    m: __m256i,
    c0: usize,
    x0: usize,
) -> [__m256; P] {
    let mut acc = [b; P];
    for (ky, iy) in row.rows.iter().enumerate() {
        let Some(iy) = *iy else { continue };
        let base = (iy * row.w + x0 - 1) * row.c + c0;
        let mut xin = [[_mm256_setzero_ps(); 8]; T];
        for (xin, term) in xin.iter_mut().zip(row.terms) {
            let plane = unsafe { term.1.as_ptr().add(base) };
            for (j, v) in xin.iter_mut().enumerate().take(P + 2) {
                *v = unsafe { _mm256_maskload_ps(plane.add(j * row.c), m) };
            }
        }
        for kx in 0..3 {
            for (p, acc) in acc.iter_mut().enumerate() {
                for i in 0..T {
                    let (k, v) = (k[i][3 * ky + kx], xin[i][p + kx]);
                    *acc = if i == 0 {
                        _mm256_fmadd_ps(k, v, *acc)
                    } else {
                        _mm256_fnmadd_ps(k, v, *acc)
                    };
                }
            }
        }
    }
    acc
}

/// The scores of pixels `x0..x0 + P` for AVX2, 8 channels from `c0` (mask `m`), skipping the
/// taps outside the image.
///
/// # Safety
/// AVX2 and FMA; `x0 + P <= w`, the masked channels lie inside the image.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn lab_pixels_avx2<const P: usize, const T: usize>(
    row: &LabRow<T>,
    k: &LabTaps<__m256, T>,
    b: __m256,
    m: __m256i,
    c0: usize,
    x0: usize,
) -> [__m256; P] {
    let mut acc = [b; P];
    for (ky, iy) in row.rows.iter().enumerate() {
        let Some(iy) = *iy else { continue };
        for kx in 0..3 {
            for (p, acc) in acc.iter_mut().enumerate() {
                // Input column x0 + p + kx - 1 must lie in 0..w.
                let ix = x0 + p + kx;
                if ix < 1 || ix > row.w {
                    continue;
                }
                let at = (iy * row.w + ix - 1) * row.c;
                for (i, term) in row.terms.iter().enumerate() {
                    let v = unsafe { _mm256_maskload_ps(term.1.as_ptr().add(at + c0), m) };
                    *acc = if i == 0 {
                        _mm256_fmadd_ps(k[i][3 * ky + kx], v, *acc)
                    } else {
                        _mm256_fnmadd_ps(k[i][3 * ky + kx], v, *acc)
                    };
                }
            }
        }
    }
    acc
}

/// Scores the channels from `c0` (mask `m`, kernel `k`, bias `b`) of a row and ORs their bits
/// into `out`: interior pixels `P` at a time, the border pixels checking their taps.
///
/// # Safety
/// AVX2 and FMA; the masked channels lie inside the image, `P <= 6`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn lab_chunk_avx2<const P: usize, const T: usize>(
    row: &LabRow<T>,
    k: &LabTaps<__m256, T>,
    b: __m256,
    m: __m256i,
    c0: usize,
    out: &mut [u64],
) {
    let (w, words) = (row.w, super::words_for(row.c));
    let (word, shift) = (c0 / 64, c0 % 64);
    let lane_mask = _mm256_movemask_ps(_mm256_castsi256_ps(m)) as u32;
    let mut emit = |x: usize, d: __m256| {
        let not_positive = _mm256_cmp_ps::<_CMP_NGT_UQ>(d, _mm256_setzero_ps());
        let bits = _mm256_movemask_ps(not_positive) as u32 & lane_mask;
        out[x * words + word] |= u64::from(bits) << shift;
    };
    // The border pixels (first and last) check their taps, the others need not.
    let mut x = 0;
    while x < w {
        if x >= 1 && x + P < w {
            // SAFETY: pixels x..x + P and their taps lie in the row.
            let acc = unsafe { lab_interior_avx2::<P, T>(row, k, b, m, c0, x) };
            for (p, &a) in acc.iter().enumerate() {
                emit(x + p, a);
            }
            x += P;
        } else {
            // SAFETY: pixel x lies in the row.
            let [acc] = if x >= 1 && x + 1 < w {
                unsafe { lab_interior_avx2::<1, T>(row, k, b, m, c0, x) }
            } else {
                unsafe { lab_pixels_avx2::<1, T>(row, k, b, m, c0, x) }
            };
            emit(x, acc);
            x += 1;
        }
    }
}

/// The folded scores of pixels `x0..x0 + P` of two consecutive output rows (`rows[0]` and
/// `rows[1]`, the row below): each of the four input rows is loaded once for both output rows,
/// and each score sees its taps in the order of `lab_tile_avx512` (outside the image, zeros).
///
/// # Safety
/// AVX-512 F; `x0 + P <= w`, `P <= 6`, the masked channels lie inside the image.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn lab_tile_pair_avx512<const P: usize>(
    rows: &[LabRow<1>; 2],
    k: &[__m512; 9],
    b: __m512,
    m: __mmask16,
    c0: usize,
    x0: usize,
) -> [[__m512; P]; 2] {
    let mut acc = [[b; P]; 2];
    let [top, bottom] = rows;
    // Input rows y - 1 .. y + 2: kernel row `r` of the upper output row, `r - 1` of the lower.
    let inputs = [top.rows[0], top.rows[1], top.rows[2], bottom.rows[2]];
    for (r, iy) in inputs.into_iter().enumerate() {
        let Some(iy) = iy else { continue };
        // SAFETY: the caller's bounds.
        let [xin] = unsafe { lab_inputs_avx512::<P, 1>(top, iy, m, c0, x0) };
        for kx in 0..3 {
            for p in 0..P {
                if r < 3 {
                    acc[0][p] = _mm512_fmadd_ps(k[3 * r + kx], xin[p + kx], acc[0][p]);
                }
                if r > 0 {
                    acc[1][p] = _mm512_fmadd_ps(k[3 * (r - 1) + kx], xin[p + kx], acc[1][p]);
                }
            }
        }
    }
    acc
}

/// [`lab_row_avx512`] of the folded form for rows `y` and `y + 1` at once (into `outs`), 4
/// pixels at a time (fewer at the end of the row) from both rows' inputs.
///
/// # Safety
/// AVX-512 F.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn lab_row_pair_avx512(
    terms: &[(&[f32], &[f32]); 1],
    bias: &[f32],
    dims: [usize; 3],
    y: usize,
    outs: [&mut [u64]; 2],
) {
    let [out0, out1] = outs;
    let rows = [
        LabRow::new(terms, bias, dims, y, out0),
        LabRow::new(terms, bias, dims, y + 1, out1),
    ];
    let (w, c) = (dims[1], dims[2]);
    let words = super::words_for(c);
    let mut outs = [out0, out1];
    for c0 in (0..c).step_by(16) {
        let n = 16.min(c - c0);
        let m: __mmask16 = if n == 16 { 0xffff } else { (1 << n) - 1 };
        // SAFETY (loads): masked to the `n` channels from c0, inside the slices.
        let k: [__m512; 9] = std::array::from_fn(|t| unsafe {
            _mm512_maskz_loadu_ps(m, terms[0].0.as_ptr().add(t * c + c0))
        });
        let b = unsafe { _mm512_maskz_loadu_ps(m, bias.as_ptr().add(c0)) };
        let mut x = 0;
        while x < w {
            let n = 4.min(w - x);
            let tile = (&rows, &k, b, m, c0, x);
            // SAFETY: pixels x..x + n lie in the rows.
            unsafe {
                match n {
                    4 => lab_pair_emit_avx512::<4>(tile, words, &mut outs),
                    3 => lab_pair_emit_avx512::<3>(tile, words, &mut outs),
                    2 => lab_pair_emit_avx512::<2>(tile, words, &mut outs),
                    _ => lab_pair_emit_avx512::<1>(tile, words, &mut outs),
                }
            }
            x += n;
        }
    }
}

/// A [`lab_tile_pair_avx512`] tile, its bits ORed into the two rows' `outs`.
///
/// # Safety
/// As [`lab_tile_pair_avx512`].
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn lab_pair_emit_avx512<const P: usize>(
    (rows, k, b, m, c0, x): (
        &[LabRow<1>; 2],
        &[__m512; 9],
        __m512,
        __mmask16,
        usize,
        usize,
    ),
    words: usize,
    outs: &mut [&mut [u64]; 2],
) {
    // SAFETY: the caller's bounds.
    let scores = unsafe { lab_tile_pair_avx512::<P>(rows, k, b, m, c0, x) };
    for (out, d) in outs.iter_mut().zip(&scores) {
        lab_emit_avx512(d, m, c0, x, words, out);
    }
}

/// [`lab_row_avx512`] for AVX2: 8 channels at a time.
///
/// # Safety
/// AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn lab_row_avx2<const T: usize>(
    terms: &[(&[f32], &[f32]); T],
    bias: &[f32],
    dims: [usize; 3],
    y: usize,
    out: &mut [u64],
) {
    let row = LabRow::new(terms, bias, dims, y, out);
    let c = dims[2];
    for c0 in (0..c).step_by(8) {
        let n = 8.min(c - c0);
        let m = _mm256_cmpgt_epi32(
            _mm256_set1_epi32(n as i32),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        );
        // SAFETY (loads): masked to the `n` channels from c0, inside the slices.
        let k: LabTaps<__m256, T> = std::array::from_fn(|i| {
            std::array::from_fn(|t| unsafe {
                _mm256_maskload_ps(terms[i].0.as_ptr().add(t * c + c0), m)
            })
        });
        let b = unsafe { _mm256_maskload_ps(bias.as_ptr().add(c0), m) };
        // SAFETY: the chunk's channels lie inside the image.
        unsafe {
            if T == 1 {
                lab_chunk_avx2::<4, T>(&row, &k, b, m, c0, out)
            } else {
                lab_chunk_avx2::<2, T>(&row, &k, b, m, c0, out)
            }
        }
    }
}

/// One 16-channel chunk of a [`gather_avx512`].
struct GatherChunk {
    /// First output channel.
    c0: usize,
    /// Lanes of the output (channels `c0..c0 + n`).
    store: __mmask16,
    /// Source index of each lane, relative to `lo` when `permute`.
    idx: __m512i,
    /// With `permute`: the first channel loaded, and the lanes inside the pixel.
    lo: usize,
    load: __mmask16,
    /// Whether the sources span less than 16 channels (one load and a permutation).
    permute: bool,
}

/// `out[p][i] = x[p][source[i]]` for every pixel of `x` (`c` channels each), 16 channels at a
/// time: one load and a permutation where the 16 sources span less than 16 channels (as
/// LAB's pairings do), a gather elsewhere.
///
/// # Safety
/// AVX-512 F.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn gather_avx512(
    x: &[f32],
    c: usize,
    source: &[usize],
    out: &mut [std::mem::MaybeUninit<f32>],
) {
    assert!(c > 0 && x.len() == out.len() && x.len().is_multiple_of(c) && source.len() == c);
    assert!(source.iter().all(|&s| s < c) && c < i32::MAX as usize);
    let chunks: Vec<GatherChunk> = (0..c)
        .step_by(16)
        .map(|c0| {
            let src = &source[c0..c.min(c0 + 16)];
            let n = src.len();
            let lo = src.iter().copied().min().unwrap_or(0);
            let permute = src.iter().all(|&s| s - lo < 16);
            let base = if permute { lo } else { 0 };
            let idx: [i32; 16] =
                std::array::from_fn(|l| src.get(l).map_or(0, |&s| (s - base) as i32));
            let mask = |lanes: usize| {
                if lanes >= 16 {
                    0xffff
                } else {
                    (1u16 << lanes) - 1
                }
            };
            GatherChunk {
                c0,
                store: mask(n),
                // SAFETY: 16 i32 values.
                idx: unsafe { _mm512_loadu_si512(idx.as_ptr() as *const __m512i) },
                lo,
                load: mask(c - lo),
                permute,
            }
        })
        .collect();
    for (px, dst) in x.chunks_exact(c).zip(out.chunks_exact_mut(c)) {
        for ch in &chunks {
            // SAFETY: the loads are masked to the pixel's channels, the gather's lanes index
            // them, the store is masked to the chunk's channels.
            unsafe {
                let v = if ch.permute {
                    let v = _mm512_maskz_loadu_ps(ch.load, px.as_ptr().add(ch.lo));
                    _mm512_permutexvar_ps(ch.idx, v)
                } else {
                    _mm512_mask_i32gather_ps::<4>(
                        _mm512_setzero_ps(),
                        ch.store,
                        ch.idx,
                        px.as_ptr(),
                    )
                };
                _mm512_mask_storeu_ps(dst.as_mut_ptr().add(ch.c0) as *mut f32, ch.store, v);
            }
        }
    }
}

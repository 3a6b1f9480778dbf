//! The engine's full-precision layers on one image in NHWC layout: convolution (im2col + GEMM,
//! or direct for short windows such as a stem's),
//! depthwise convolution, pooling, the dense head, and the per-channel output transforms that
//! every layer applies on the fly.

use std::ops::Range;

use rayon::prelude::*;

pub use super::gemm::PackedWeights;
use super::gemm::{Variant, PANEL};
pub use zoo_kernels::packed::Window;

/// A float feature map of one image, NHWC.
#[derive(Clone, Debug, PartialEq)]
pub struct FloatMap {
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
    /// Channels (innermost).
    pub channels: usize,
    /// `height * width * channels` values.
    pub data: Vec<f32>,
}

impl FloatMap {
    /// A map of zeros.
    pub fn zeros(height: usize, width: usize, channels: usize) -> Self {
        FloatMap {
            height,
            width,
            channels,
            data: vec![0.0; height * width * channels],
        }
    }
}

/// One per-channel transform of an output value.
#[derive(Clone, Debug, PartialEq)]
pub enum ChannelOp {
    /// `x * mul[c] + add[c]` (batch norm, a kernel scale with a bias).
    Affine {
        /// Multipliers.
        mul: Vec<f32>,
        /// Offsets.
        add: Vec<f32>,
    },
    /// `x * mul[c]` (a kernel scale).
    Scale(Vec<f32>),
    /// `x + add[c]` (a bias).
    Add(Vec<f32>),
    /// `max(x, 0)`.
    Relu,
    /// `x` where positive, else `alpha[c] * x`.
    PRelu(Vec<f32>),
}

/// The per-channel transforms a layer applies to its outputs before storing them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Epilogue {
    /// Applied in order.
    pub ops: Vec<ChannelOp>,
}

impl Epilogue {
    /// Appends `op`, merging it into the previous op where the result is the same up to rounding
    /// (the merged form rounds once instead of twice).
    pub fn push(&mut self, op: ChannelOp) {
        let merged = match (self.ops.last(), &op) {
            (Some(ChannelOp::Scale(m1)), ChannelOp::Affine { mul, add }) => {
                Some(ChannelOp::Affine {
                    mul: m1.iter().zip(mul).map(|(a, b)| a * b).collect(),
                    add: add.clone(),
                })
            }
            (Some(ChannelOp::Scale(m)), ChannelOp::Add(a)) => Some(ChannelOp::Affine {
                mul: m.clone(),
                add: a.clone(),
            }),
            _ => None,
        };
        match merged {
            Some(m) => *self.ops.last_mut().expect("merged with the last op") = m,
            None => self.ops.push(op),
        }
    }

    /// True when there is nothing to apply.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Applies the transforms to the values of one pixel (`values[c]` is channel `c`), then adds
    /// `residual` if given.
    #[inline]
    pub fn apply(&self, values: &mut [f32], residual: Option<&[f32]>) {
        self.apply_rows(values, values.len(), residual);
    }

    /// [`Epilogue::apply`] to each pixel of `values` (`channels` values each).
    #[inline]
    pub fn apply_rows(&self, values: &mut [f32], channels: usize, residual: Option<&[f32]>) {
        let residual = residual.map_or(Shortcut::None, Shortcut::From);
        self.dispatch(None, values, channels, residual);
    }

    /// [`Epilogue::apply_rows`] to the integer `dots` of some pixels, written as floats to
    /// `values`.
    #[inline]
    pub fn apply_dots(
        &self,
        dots: &[i32],
        values: &mut [f32],
        channels: usize,
        residual: Option<&[f32]>,
    ) {
        assert_eq!(dots.len(), values.len(), "one dot per output value");
        let residual = residual.map_or(Shortcut::None, Shortcut::From);
        self.dispatch(Some(dots), values, channels, residual);
    }

    /// [`Epilogue::apply_dots`] with the residual in `values`: the transformed `dots` are
    /// added to what `values` holds.
    #[inline]
    pub fn apply_dots_onto(&self, dots: &[i32], values: &mut [f32], channels: usize) {
        assert_eq!(dots.len(), values.len(), "one dot per output value");
        self.dispatch(Some(dots), values, channels, Shortcut::Values);
    }

    /// [`Epilogue::transform`] compiled for AVX2 where the CPU has it.
    #[inline]
    fn dispatch(&self, dots: Option<&[i32]>, values: &mut [f32], channels: usize, r: Shortcut) {
        assert!(
            channels > 0 && values.len().is_multiple_of(channels),
            "whole pixels of {channels} channels"
        );
        if let Shortcut::From(residual) = r {
            assert_eq!(
                residual.len(),
                values.len(),
                "one residual per output value"
            );
        }
        if has_avx2() {
            // SAFETY: AVX2 is available.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                self.transform_avx2(dots, values, channels, r)
            };
        } else {
            self.transform(dots, values, channels, r);
        }
    }

    /// [`Epilogue::transform`] compiled for AVX2.
    ///
    /// # Safety
    /// AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn transform_avx2(
        &self,
        dots: Option<&[i32]>,
        values: &mut [f32],
        channels: usize,
        residual: Shortcut,
    ) {
        self.transform(dots, values, channels, residual)
    }

    /// The transforms of a run of pixels, one op at a time over all of them (the op chosen once
    /// per call, its loop over the channels vectorized): the values (from `dots` if given, else
    /// `values`), every op, then the residual.
    #[inline(always)]
    fn transform(
        &self,
        dots: Option<&[i32]>,
        values: &mut [f32],
        channels: usize,
        residual: Shortcut,
    ) {
        use ChannelOp::{Affine, Relu};
        match self.ops.as_slice() {
            [Affine { mul, add }] => {
                return affine_rows::<false, false>(dots, values, channels, mul, add, residual);
            }
            [Affine { mul, add }, Relu] => {
                return affine_rows::<false, true>(dots, values, channels, mul, add, residual);
            }
            [Relu, Affine { mul, add }] => {
                return affine_rows::<true, false>(dots, values, channels, mul, add, residual);
            }
            _ => {}
        }
        if let (Some(dots), Shortcut::Values) = (dots, residual) {
            let mut t: Vec<f32> = dots.iter().map(|&d| d as f32).collect();
            self.ops(&mut t, channels);
            values.iter_mut().zip(&t).for_each(|(v, t)| *v += t);
            return;
        }
        if let Some(dots) = dots {
            values
                .iter_mut()
                .zip(dots)
                .for_each(|(v, &d)| *v = d as f32);
        }
        self.ops(values, channels);
        if let Shortcut::From(r) = residual {
            values.iter_mut().zip(r).for_each(|(v, r)| *v += r);
        }
    }

    /// Every op on each pixel of `values`.
    #[inline(always)]
    fn ops(&self, values: &mut [f32], channels: usize) {
        for op in &self.ops {
            let pixels = values.chunks_exact_mut(channels);
            match op {
                ChannelOp::Affine { mul, add } => pixels.for_each(|px| {
                    for ((v, m), a) in px.iter_mut().zip(mul).zip(add) {
                        *v = *v * m + a;
                    }
                }),
                ChannelOp::Scale(mul) => pixels.for_each(|px| {
                    px.iter_mut().zip(mul).for_each(|(v, m)| *v *= m);
                }),
                ChannelOp::Add(add) => pixels.for_each(|px| {
                    px.iter_mut().zip(add).for_each(|(v, a)| *v += a);
                }),
                ChannelOp::Relu => pixels.flatten().for_each(|v| *v = v.max(0.0)),
                ChannelOp::PRelu(alpha) => pixels.for_each(|px| {
                    for (v, a) in px.iter_mut().zip(alpha) {
                        if *v <= 0.0 {
                            *v *= a;
                        }
                    }
                }),
            }
        }
    }

    /// [`Epilogue::apply_rows`] on `data`, in parallel.
    pub fn apply_map(&self, data: &mut [f32], channels: usize, residual: Option<&[f32]>) {
        if self.is_empty() && residual.is_none() {
            return;
        }
        let rows = data.len() / channels;
        let chunk = (rows / (4 * rayon::current_num_threads()).max(1)).max(16) * channels;
        data.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, block)| {
                let at = i * chunk;
                self.apply_rows(block, channels, residual.map(|r| &r[at..at + block.len()]));
            });
    }
}

/// [`Epilogue::transform`] of the common epilogues, one affine op (a batch norm) with a ReLU
/// before it if `RELU_FIRST` or after it if `RELU_AFTER`, in one pass over the values: the same
/// operations in the same order as op by op.
#[inline(always)]
fn affine_rows<const RELU_FIRST: bool, const RELU_AFTER: bool>(
    dots: Option<&[i32]>,
    values: &mut [f32],
    channels: usize,
    mul: &[f32],
    add: &[f32],
    residual: Shortcut,
) {
    let relu = |x: f32, on: bool| if on { x.max(0.0) } else { x };
    let affine = |x: f32, m: &f32, a: &f32| relu(relu(x, RELU_FIRST) * m + a, RELU_AFTER);
    let pixels = values.chunks_exact_mut(channels);
    match (dots, residual) {
        (Some(dots), Shortcut::Values) => {
            for (px, d) in pixels.zip(dots.chunks_exact(channels)) {
                for (((v, d), m), a) in px.iter_mut().zip(d).zip(mul).zip(add) {
                    *v += affine(*d as f32, m, a);
                }
            }
        }
        (Some(dots), Shortcut::From(r)) => {
            for ((px, d), r) in pixels
                .zip(dots.chunks_exact(channels))
                .zip(r.chunks_exact(channels))
            {
                for ((((v, d), r), m), a) in px.iter_mut().zip(d).zip(r).zip(mul).zip(add) {
                    *v = affine(*d as f32, m, a) + r;
                }
            }
        }
        (Some(dots), Shortcut::None) => {
            for (px, d) in pixels.zip(dots.chunks_exact(channels)) {
                for (((v, d), m), a) in px.iter_mut().zip(d).zip(mul).zip(add) {
                    *v = affine(*d as f32, m, a);
                }
            }
        }
        (None, Shortcut::From(r)) => {
            for (px, r) in pixels.zip(r.chunks_exact(channels)) {
                for (((v, r), m), a) in px.iter_mut().zip(r).zip(mul).zip(add) {
                    *v = affine(*v, m, a) + r;
                }
            }
        }
        (None, _) => {
            for px in pixels {
                for ((v, m), a) in px.iter_mut().zip(mul).zip(add) {
                    *v = affine(*v, m, a);
                }
            }
        }
    }
}

/// What [`Epilogue::transform`] adds after the transforms.
#[derive(Clone, Copy)]
enum Shortcut<'a> {
    None,
    /// One value per output value.
    From(&'a [f32]),
    /// The values the output overwrites.
    Values,
}

/// A convolution: `weight` is the `(kh * kw * in) x out` matrix of a `kh x kw x in x out` kernel;
/// taps in the padding read `pad_value`. Computed directly where windows are short (at most 64
/// inputs per output), else as im2col + one matrix product; then `epilogue` per output pixel.
pub fn conv(
    x: &FloatMap,
    weight: &PackedWeights,
    window: Window,
    pad_value: f32,
    epilogue: &Epilogue,
    residual: Option<&[f32]>,
) -> FloatMap {
    let (oh, ow) = window.output(x.height, x.width);
    let [kh, kw] = window.kernel;
    let c = x.channels;
    let k = kh * kw * c;
    let out_channels = weight.n();
    assert_eq!(weight.k(), k, "a {kh}x{kw}x{c} kernel");
    let direct = kh == 1 && kw == 1 && window.stride == [1, 1] && window.pads == [0; 4];
    if !direct && k <= DIRECT_MAX_TAPS {
        return conv_direct(x, weight, window, pad_value, epilogue, residual);
    }
    let patches: Vec<f32>;
    let lhs: &[f32] = if direct {
        &x.data
    } else {
        let mut p = vec![pad_value; oh * ow * k];
        p.par_chunks_mut(ow * k).enumerate().for_each(|(oy, row)| {
            for ox in 0..ow {
                for ky in 0..kh {
                    for kx in 0..kw {
                        if let Some((y, xx)) = window.source(oy, ox, ky, kx, x.height, x.width) {
                            let at = ox * k + (ky * kw + kx) * c;
                            let from = (y * x.width + xx) * c;
                            row[at..at + c].copy_from_slice(&x.data[from..from + c]);
                        }
                    }
                }
            }
        });
        patches = p;
        &patches
    };
    let mut out = FloatMap::zeros(oh, ow, out_channels);
    weight.matmul(lhs, oh * ow, &mut out.data, |r0, rows| {
        let residual = residual.map(|r| &r[r0 * out_channels..][..rows.len()]);
        if !epilogue.is_empty() || residual.is_some() {
            epilogue.apply_rows(rows, out_channels, residual);
        }
    });
    out
}

/// The most inputs per output (`kh * kw * in`) a convolution computes directly rather than
/// by im2col and GEMM: a stem over RGB or grayscale images, whose patches are too short for a
/// GEMM to pay for copying them.
const DIRECT_MAX_TAPS: usize = 64;

/// [`conv`] computed directly, output rows in parallel: every output pixel accumulates its
/// taps into 16 output channels at a time held in registers, then `epilogue` runs on it.
fn conv_direct(
    x: &FloatMap,
    weight: &PackedWeights,
    window: Window,
    pad_value: f32,
    epilogue: &Epilogue,
    residual: Option<&[f32]>,
) -> FloatMap {
    let (oh, ow) = window.output(x.height, x.width);
    let out_channels = weight.n();
    let mut out = FloatMap::zeros(oh, ow, out_channels);
    let row_len = ow * out_channels;
    if row_len == 0 {
        return out;
    }
    let [kh, kw] = window.kernel;
    let (w, c) = (x.width, x.channels);
    // Offsets of a window's inputs from its top-left input, in weight order.
    let offsets: Vec<usize> = (0..kh)
        .flat_map(|ky| (0..kw * c).map(move |j| ky * w * c + j))
        .collect();
    let offsets = &offsets;
    let variant = Variant::selected();
    out.data
        .par_chunks_mut(row_len)
        .enumerate()
        .for_each(|(oy, row)| {
            let args: DirectArgs = (x, weight, window, pad_value, offsets, oy);
            match variant {
                // SAFETY: the selected variant's instructions are available.
                #[cfg(target_arch = "x86_64")]
                Variant::Avx512 => unsafe { direct_row_avx512(args, row) },
                // SAFETY: as above.
                #[cfg(target_arch = "x86_64")]
                Variant::Avx2 => unsafe { direct_row_avx2(args, row) },
                Variant::Portable => direct_row::<4>(args, Variant::Portable, row),
            }
            let at = oy * row_len;
            epilogue.apply_rows(row, out_channels, residual.map(|r| &r[at..at + row_len]));
        });
    out
}

/// What every pixel group of a direct convolution's row reads: the input, the weights, the
/// window, the padding value, the offsets of a window's inputs and the output row's index.
type DirectArgs<'a> = (
    &'a FloatMap,
    &'a PackedWeights,
    Window,
    f32,
    &'a [usize],
    usize,
);

/// [`direct_row`] compiled for AVX2 and FMA: 4 pixels at a time.
///
/// # Safety
/// AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn direct_row_avx2(args: DirectArgs, row: &mut [f32]) {
    direct_row::<4>(args, Variant::Avx2, row)
}

/// [`direct_row`] compiled for AVX-512: 8 pixels at a time.
///
/// # Safety
/// AVX-512F (and AVX2 and FMA, which every AVX-512 CPU has).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn direct_row_avx512(args: DirectArgs, row: &mut [f32]) {
    direct_row::<8>(args, Variant::Avx512, row)
}

/// Output row `oy` of a direct convolution into `row` (`ow * out` values), before the
/// epilogue: `PIXELS` pixels at a time, for independent sums, reading the inputs in place (at
/// `offsets` from a window's top-left input, in weight order) where their windows lie inside
/// the image, else from a gathered copy of the windows.
#[inline(always)]
fn direct_row<const PIXELS: usize>(args: DirectArgs, variant: Variant, row: &mut [f32]) {
    let (x, weight, window, pad_value, offsets, oy) = args;
    let [kh, kw] = window.kernel;
    let [sy, sx] = window.stride;
    let [top, _, left, _] = window.pads;
    let (h, w, c) = (x.height, x.width, x.channels);
    let k = kh * kw * c;
    let n = weight.n();
    let ow = row.len() / n;
    // The vector kernels compute 16 output channels at a time.
    let variant = if n.is_multiple_of(16) {
        variant
    } else {
        Variant::Portable
    };
    // The first input row and column of a window, if the window lies inside the image.
    let y0 = (oy * sy).checked_sub(top).filter(|y| y + kh <= h);
    let inside = |ox: usize| (ox * sx).checked_sub(left).filter(|x| x + kw <= w);
    // Border pixels' windows, gathered (padding included) pixel after pixel, read in order.
    let mut patch = vec![0f32; PIXELS * k];
    let in_order: Vec<usize> = (0..k).collect();
    // The outputs of a last group of fewer than `PIXELS` pixels.
    let mut spare = vec![0f32; PIXELS * n];
    let mut ox0 = 0;
    while ox0 < ow {
        let pixels = PIXELS.min(ow - ox0);
        let (source, bases, taps): (&[f32], [usize; PIXELS], &[usize]) =
            match (y0, inside(ox0), inside(ox0 + PIXELS - 1)) {
                (Some(y0), Some(x0), Some(_)) => (
                    &x.data,
                    std::array::from_fn(|p| (y0 * w + x0 + p * sx) * c),
                    offsets,
                ),
                _ => {
                    for (p, window_values) in patch.chunks_exact_mut(k).enumerate() {
                        for (tap, values) in window_values.chunks_exact_mut(c).enumerate() {
                            let (ky, kx) = (tap / kw, tap % kw);
                            let source = (ox0 + p < ow)
                                .then(|| window.source(oy, ox0 + p, ky, kx, h, w))
                                .flatten();
                            match source {
                                Some((y, xx)) => {
                                    values.copy_from_slice(&x.data[(y * w + xx) * c..][..c])
                                }
                                None => values.fill(pad_value),
                            }
                        }
                    }
                    (&patch, std::array::from_fn(|p| p * k), &in_order)
                }
            };
        let out = if pixels == PIXELS {
            &mut row[ox0 * n..(ox0 + pixels) * n]
        } else {
            &mut spare[..]
        };
        match variant {
            // SAFETY: the caller checked that AVX-512 is available; every `bases[p] + taps[i]`
            // indexes `source`.
            #[cfg(target_arch = "x86_64")]
            Variant::Avx512 => unsafe { direct_pixels_avx512(source, bases, taps, weight, out) },
            // SAFETY: as above, with AVX2 and FMA.
            #[cfg(target_arch = "x86_64")]
            Variant::Avx2 => unsafe { direct_pixels_fma(source, bases, taps, weight, out) },
            Variant::Portable => {
                direct_pixels::<PIXELS>(|i, p| source[bases[p] + taps[i]], weight, out)
            }
        }
        if pixels < PIXELS {
            row[ox0 * n..].copy_from_slice(&spare[..pixels * n]);
        }
        ox0 += pixels;
    }
}

/// [`direct_pixels`] for `P` pixels whose inputs are `x[bases[p] + offsets[i]]`, with AVX2 and
/// FMA, for a multiple of 16 output channels.
///
/// # Safety
/// AVX2 and FMA; every `bases[p] + offsets[i]` indexes `x`; `out` holds `P` pixels.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn direct_pixels_fma<const P: usize>(
    x: &[f32],
    bases: [usize; P],
    offsets: &[usize],
    weight: &PackedWeights,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let n = weight.n();
    debug_assert!(n.is_multiple_of(16) && out.len() == P * n);
    for o0 in (0..n).step_by(16) {
        let mut acc = [[_mm256_setzero_ps(); 2]; P];
        let columns = weight.columns_from(o0);
        for (i, &offset) in offsets.iter().enumerate() {
            let w = &columns[i * PANEL..][..16];
            // SAFETY: `w` holds 16 values.
            let w = unsafe {
                [
                    _mm256_loadu_ps(w.as_ptr()),
                    _mm256_loadu_ps(w.as_ptr().add(8)),
                ]
            };
            for (acc, base) in acc.iter_mut().zip(bases) {
                // SAFETY: the caller guarantees the index.
                let v = _mm256_set1_ps(unsafe { *x.get_unchecked(base + offset) });
                acc[0] = _mm256_fmadd_ps(v, w[0], acc[0]);
                acc[1] = _mm256_fmadd_ps(v, w[1], acc[1]);
            }
        }
        for (p, acc) in acc.iter().enumerate() {
            let dst = &mut out[p * n + o0..][..16];
            // SAFETY: `dst` holds 16 values.
            unsafe {
                _mm256_storeu_ps(dst.as_mut_ptr(), acc[0]);
                _mm256_storeu_ps(dst.as_mut_ptr().add(8), acc[1]);
            }
        }
    }
}

/// [`direct_pixels`] for `P` pixels whose inputs are `x[bases[p] + offsets[i]]`, with AVX-512,
/// for a multiple of 16 output channels: a pixel's 16 channels in one register.
///
/// # Safety
/// AVX-512F; every `bases[p] + offsets[i]` indexes `x`; `out` holds `P` pixels.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn direct_pixels_avx512<const P: usize>(
    x: &[f32],
    bases: [usize; P],
    offsets: &[usize],
    weight: &PackedWeights,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let n = weight.n();
    debug_assert!(n.is_multiple_of(16) && out.len() == P * n);
    for o0 in (0..n).step_by(16) {
        let mut acc = [_mm512_setzero_ps(); P];
        let columns = weight.columns_from(o0);
        for (i, &offset) in offsets.iter().enumerate() {
            // SAFETY: a panel's row holds 16 values from `o0`.
            let w = unsafe { _mm512_loadu_ps(columns[i * PANEL..][..16].as_ptr()) };
            for (acc, base) in acc.iter_mut().zip(bases) {
                // SAFETY: the caller guarantees the index.
                let v = _mm512_set1_ps(unsafe { *x.get_unchecked(base + offset) });
                *acc = _mm512_fmadd_ps(v, w, *acc);
            }
        }
        for (p, acc) in acc.iter().enumerate() {
            // SAFETY: the pixel's 16 values from `o0` lie in `out`.
            unsafe { _mm512_storeu_ps(out[p * n + o0..][..16].as_mut_ptr(), *acc) };
        }
    }
}

/// `out[p][o] = sum_i input(i, p) * weight[i][o]` for the `out.len() / n` pixels `p` of `out`
/// (at most `PIXELS`), 16 output channels at a time.
#[inline(always)]
fn direct_pixels<const PIXELS: usize>(
    input: impl Fn(usize, usize) -> f32,
    weight: &PackedWeights,
    out: &mut [f32],
) {
    const BLOCK: usize = 16;
    let (k, n) = (weight.k(), weight.n());
    let pixels = out.len() / n;
    for o0 in (0..n).step_by(BLOCK) {
        let width = BLOCK.min(n - o0);
        let mut acc = [[0f32; BLOCK]; PIXELS];
        let columns = weight.columns_from(o0);
        if width == BLOCK {
            for i in 0..k {
                let w: &[f32; BLOCK] = columns[i * PANEL..][..BLOCK].try_into().unwrap();
                for (p, acc) in acc.iter_mut().enumerate() {
                    let v = input(i, p);
                    for (a, w) in acc.iter_mut().zip(w) {
                        *a += v * w;
                    }
                }
            }
        } else {
            for i in 0..k {
                let w = &columns[i * PANEL..][..width];
                for (p, acc) in acc.iter_mut().enumerate() {
                    let v = input(i, p);
                    for (a, w) in acc.iter_mut().zip(w) {
                        *a += v * w;
                    }
                }
            }
        }
        for (p, acc) in acc.iter().take(pixels).enumerate() {
            out[p * n + o0..][..width].copy_from_slice(&acc[..width]);
        }
    }
}

/// A depthwise convolution with zero padding: `weight` is `kh x kw x (C * multiplier)`, output
/// channel `k * multiplier + q` reads input channel `k`.
pub fn depthwise(
    x: &FloatMap,
    weight: &[f32],
    multiplier: usize,
    window: Window,
    epilogue: &Epilogue,
    residual: Option<&[f32]>,
) -> FloatMap {
    let (oh, ow) = window.output(x.height, x.width);
    let co = x.channels * multiplier;
    let mut out = FloatMap::zeros(oh, ow, co);
    if ow * co == 0 {
        return out;
    }
    out.data
        .par_chunks_mut(ow * co)
        .enumerate()
        .for_each(|(oy, row)| {
            if multiplier == 1 && has_avx2() {
                // SAFETY: AVX2 is available.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    depthwise_row_avx2(x, weight, window, oy, row)
                };
            } else if multiplier == 1 {
                depthwise_row(x, weight, window, oy, row);
            } else {
                depthwise_row_multiplier(x, weight, multiplier, window, oy, row);
            }
            let at = oy * ow * co;
            epilogue.apply_rows(row, co, residual.map(|r| &r[at..at + ow * co]));
        });
    out
}

/// Whether the CPU runs AVX2 (the window ops' rows then run in copies compiled for it).
fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx2");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The taps of one output pixel's window that lie inside the image.
struct Taps {
    /// Kernel rows inside.
    rows: Range<usize>,
    /// Kernel columns inside.
    cols: Range<usize>,
    /// Input row and column of tap `(0, 0)` (perhaps outside).
    y0: isize,
    x0: isize,
    /// The input's width and channels.
    width: usize,
    channels: usize,
}

impl Taps {
    /// The taps of output `(oy, ox)` of `window` over `x`.
    #[inline(always)]
    fn of(x: &FloatMap, window: Window, oy: usize, ox: usize) -> Taps {
        let (rows, cols, y0, x0) = window.taps_inside(oy, ox, x.height, x.width);
        Taps {
            rows,
            cols,
            y0,
            x0,
            width: x.width,
            channels: x.channels,
        }
    }

    /// The offset of the first value of tap `(ky, kx)`'s input pixel (a tap inside).
    #[inline(always)]
    fn at(&self, ky: usize, kx: usize) -> usize {
        let (y, x) = (self.y0 + ky as isize, self.x0 + kx as isize);
        (y * self.width as isize + x) as usize * self.channels
    }

    /// How many taps lie inside.
    #[inline(always)]
    fn count(&self) -> usize {
        self.rows.len() * self.cols.len()
    }
}

/// Channels handled together in registers by the window ops (two AVX2 vectors).
const CHANNEL_BLOCK: usize = 16;

/// Output row `oy` of a depthwise convolution with multiplier 1, before the epilogue.
#[inline(always)]
fn depthwise_row(x: &FloatMap, weight: &[f32], window: Window, oy: usize, row: &mut [f32]) {
    for (ox, px) in row.chunks_exact_mut(x.channels).enumerate() {
        let taps = Taps::of(x, window, oy, ox);
        depthwise_pixel(x, weight, window.kernel[1], px, &taps);
    }
}

/// [`depthwise_row`] compiled for AVX2.
///
/// # Safety
/// AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn depthwise_row_avx2(
    x: &FloatMap,
    weight: &[f32],
    window: Window,
    oy: usize,
    row: &mut [f32],
) {
    depthwise_row(x, weight, window, oy, row)
}

/// `px[c] = sum over the taps inside, in weight order, of input * weight` (from zero) for a
/// depthwise convolution with multiplier 1 and kernel width `kw`: channels in blocks of
/// [`CHANNEL_BLOCK`] summed in registers, the rest one by one.
#[inline(always)]
fn depthwise_pixel(x: &FloatMap, weight: &[f32], kw: usize, px: &mut [f32], taps: &Taps) {
    let c = px.len();
    let blocks = c - c % CHANNEL_BLOCK;
    for c0 in (0..blocks).step_by(CHANNEL_BLOCK) {
        depthwise_block::<CHANNEL_BLOCK>(x, weight, kw, px, taps, c0);
    }
    for ch in blocks..c {
        depthwise_block::<1>(x, weight, kw, px, taps, ch);
    }
}

/// [`depthwise_pixel`] of channels `c0..c0 + N`.
#[inline(always)]
fn depthwise_block<const N: usize>(
    x: &FloatMap,
    weight: &[f32],
    kw: usize,
    px: &mut [f32],
    taps: &Taps,
    c0: usize,
) {
    let c = px.len();
    let mut acc = [0.0f32; N];
    for ky in taps.rows.clone() {
        for kx in taps.cols.clone() {
            let input = &x.data[taps.at(ky, kx) + c0..][..N];
            let w = &weight[(ky * kw + kx) * c + c0..][..N];
            for ((a, &v), &t) in acc.iter_mut().zip(input).zip(w) {
                *a += v * t;
            }
        }
    }
    px[c0..c0 + N].copy_from_slice(&acc);
}

/// Output row `oy` of a depthwise convolution with a channel multiplier (output channel
/// `k * multiplier + q` reads input channel `k`), before the epilogue.
fn depthwise_row_multiplier(
    x: &FloatMap,
    weight: &[f32],
    multiplier: usize,
    window: Window,
    oy: usize,
    row: &mut [f32],
) {
    let kw = window.kernel[1];
    let co = x.channels * multiplier;
    for (ox, px) in row.chunks_exact_mut(co).enumerate() {
        let taps = Taps::of(x, window, oy, ox);
        for (j, o) in px.iter_mut().enumerate() {
            let mut acc = 0.0f32;
            for ky in taps.rows.clone() {
                for kx in taps.cols.clone() {
                    acc +=
                        x.data[taps.at(ky, kx) + j / multiplier] * weight[(ky * kw + kx) * co + j];
                }
            }
            *o = acc;
        }
    }
}

/// The fixed `[1,2,1] x [1,2,1] / 16` blur with SAME zero padding and stride `stride`.
pub fn blur(x: &FloatMap, stride: usize) -> FloatMap {
    let (weight, window) = blur_kernel(x.height, x.width, x.channels, stride);
    depthwise(x, &weight, 1, window, &Epilogue::default(), None)
}

/// The blur as a depthwise convolution of an `h x w x c` map: its weights and window.
pub fn blur_kernel(h: usize, w: usize, c: usize, stride: usize) -> (Vec<f32>, Window) {
    let taps = [1.0, 2.0, 1.0, 2.0, 4.0, 2.0, 1.0, 2.0, 1.0];
    let weight: Vec<f32> = taps
        .iter()
        .flat_map(|&t| std::iter::repeat_n(t / 16.0, c))
        .collect();
    let (top, bottom) = zoo_spec::same_padding(h, 3, stride);
    let (left, right) = zoo_spec::same_padding(w, 3, stride);
    let window = Window {
        kernel: [3, 3],
        stride: [stride; 2],
        pads: [top, bottom, left, right],
    };
    (weight, window)
}

/// Max pooling; padding never wins. With `relu`, of the map's ReLU (the same as the ReLU of
/// the maxima), in one pass.
pub fn max_pool(x: &FloatMap, window: Window, relu: bool) -> FloatMap {
    let init = if relu { 0.0 } else { f32::NEG_INFINITY };
    // `f32::max` without its NaN check (a NaN input never wins, as there).
    let max = |a: f32, v: f32| if v > a { v } else { a };
    pool(x, window, init, max, |m, _| m)
}

/// Average pooling over the taps inside the image.
pub fn avg_pool(x: &FloatMap, window: Window) -> FloatMap {
    pool(x, window, 0.0, |a, b| a + b, |s, n| s / n as f32)
}

/// A pooling op: each output value is `finish(combine(...combine(init, v1)..., vn), n)` over
/// the `n` taps of its window inside the image, in row-major order.
fn pool(
    x: &FloatMap,
    window: Window,
    init: f32,
    combine: impl Fn(f32, f32) -> f32 + Sync,
    finish: impl Fn(f32, usize) -> f32 + Sync,
) -> FloatMap {
    let (oh, ow) = window.output(x.height, x.width);
    let c = x.channels;
    let mut out = FloatMap::zeros(oh, ow, c);
    if ow * c == 0 {
        return out;
    }
    let (combine, finish) = (&combine, &finish);
    out.data
        .par_chunks_mut(ow * c)
        .enumerate()
        .for_each(|(oy, row)| {
            if has_avx2() {
                // SAFETY: AVX2 is available.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    pool_row_avx2(x, window, oy, row, init, combine, finish)
                };
            } else {
                pool_row(x, window, oy, row, init, combine, finish);
            }
        });
    out
}

/// Output row `oy` of [`pool`]: channels in blocks of [`CHANNEL_BLOCK`] combined in
/// registers, the rest one by one.
#[inline(always)]
fn pool_row(
    x: &FloatMap,
    window: Window,
    oy: usize,
    row: &mut [f32],
    init: f32,
    combine: impl Fn(f32, f32) -> f32,
    finish: impl Fn(f32, usize) -> f32,
) {
    let c = x.channels;
    let blocks = c - c % CHANNEL_BLOCK;
    for (ox, px) in row.chunks_exact_mut(c).enumerate() {
        let taps = Taps::of(x, window, oy, ox);
        for c0 in (0..blocks).step_by(CHANNEL_BLOCK) {
            pool_block::<CHANNEL_BLOCK>(x, &taps, px, c0, init, &combine, &finish);
        }
        for ch in blocks..c {
            pool_block::<1>(x, &taps, px, ch, init, &combine, &finish);
        }
    }
}

/// [`pool_row`] of channels `c0..c0 + N` of one pixel.
#[inline(always)]
fn pool_block<const N: usize>(
    x: &FloatMap,
    taps: &Taps,
    px: &mut [f32],
    c0: usize,
    init: f32,
    combine: impl Fn(f32, f32) -> f32,
    finish: impl Fn(f32, usize) -> f32,
) {
    let mut acc = [init; N];
    for ky in taps.rows.clone() {
        for kx in taps.cols.clone() {
            let input = &x.data[taps.at(ky, kx) + c0..][..N];
            for (a, &v) in acc.iter_mut().zip(input) {
                *a = combine(*a, v);
            }
        }
    }
    for (o, a) in px[c0..c0 + N].iter_mut().zip(acc) {
        *o = finish(a, taps.count());
    }
}

/// [`pool_row`] compiled for AVX2.
///
/// # Safety
/// AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn pool_row_avx2(
    x: &FloatMap,
    window: Window,
    oy: usize,
    row: &mut [f32],
    init: f32,
    combine: impl Fn(f32, f32) -> f32,
    finish: impl Fn(f32, usize) -> f32,
) {
    pool_row(x, window, oy, row, init, combine, finish)
}

/// The mean over height and width: a `1 x 1 x C` map.
pub fn global_avg_pool(x: &FloatMap) -> FloatMap {
    let c = x.channels;
    let mut sums = vec![0.0f64; c];
    for px in x.data.chunks(c) {
        sums.iter_mut().zip(px).for_each(|(s, &v)| *s += v as f64);
    }
    let n = (x.height * x.width) as f64;
    FloatMap {
        height: 1,
        width: 1,
        channels: c,
        data: sums.iter().map(|s| (s / n) as f32).collect(),
    }
}

/// A fully connected layer on the flattened map: `weight` is `in x out`.
pub fn dense(x: &FloatMap, weight: &PackedWeights, epilogue: &Epilogue) -> FloatMap {
    let mut out = FloatMap::zeros(1, 1, weight.n());
    weight.matmul(&x.data, 1, &mut out.data, |_, row| {
        epilogue.apply(row, None)
    });
    out
}

/// Concatenates maps of equal height and width along channels.
pub fn concat(maps: &[FloatMap]) -> FloatMap {
    let (h, w) = (maps[0].height, maps[0].width);
    let channels: usize = maps.iter().map(|m| m.channels).sum();
    let mut data = Vec::with_capacity(h * w * channels);
    for p in 0..h * w {
        for m in maps {
            data.extend_from_slice(&m.data[p * m.channels..(p + 1) * m.channels]);
        }
    }
    FloatMap {
        height: h,
        width: w,
        channels,
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused batch-norm epilogues give bit for bit what the ops give one at a time, for
    /// every source of values and every kind of residual.
    #[test]
    fn fused_affine_epilogues_equal_the_ops_in_turn() {
        let channels = 19;
        let pixels = 5;
        let len = channels * pixels;
        let wave = |i: usize, s: f32| (i as f32 * 0.37 + s).sin() * 3.0;
        let mul: Vec<f32> = (0..channels).map(|c| wave(c, 1.0)).collect();
        let add: Vec<f32> = (0..channels).map(|c| wave(c, 2.0)).collect();
        let dots: Vec<i32> = (0..len).map(|i| (wave(i, 3.0) * 20.0) as i32).collect();
        let start: Vec<f32> = (0..len).map(|i| wave(i, 4.0)).collect();
        let residual: Vec<f32> = (0..len).map(|i| wave(i, 5.0)).collect();
        let affine = ChannelOp::Affine {
            mul: mul.clone(),
            add: add.clone(),
        };
        let lists = [
            vec![affine.clone()],
            vec![affine.clone(), ChannelOp::Relu],
            vec![ChannelOp::Relu, affine.clone()],
        ];
        for ops in lists {
            let epilogue = Epilogue { ops: ops.clone() };
            let in_turn = |x: f32, c: usize| {
                ops.iter().fold(x, |x, op| match op {
                    ChannelOp::Relu => x.max(0.0),
                    _ => x * mul[c] + add[c],
                })
            };
            for from_dots in [false, true] {
                for shortcut in ["none", "from", "values"] {
                    if shortcut == "values" && !from_dots {
                        continue;
                    }
                    let mut got = start.clone();
                    match (from_dots, shortcut) {
                        (true, "values") => epilogue.apply_dots_onto(&dots, &mut got, channels),
                        (true, _) => epilogue.apply_dots(
                            &dots,
                            &mut got,
                            channels,
                            (shortcut == "from").then_some(&residual[..]),
                        ),
                        (false, _) => epilogue.apply_rows(
                            &mut got,
                            channels,
                            (shortcut == "from").then_some(&residual[..]),
                        ),
                    }
                    for (i, got) in got.iter().enumerate() {
                        let x = if from_dots { dots[i] as f32 } else { start[i] };
                        let y = in_turn(x, i % channels);
                        let want = match shortcut {
                            "from" => y + residual[i],
                            "values" => start[i] + y,
                            _ => y,
                        };
                        assert_eq!(
                            got.to_bits(),
                            want.to_bits(),
                            "{ops:?}, dots {from_dots}, residual {shortcut}: value {i}"
                        );
                    }
                }
            }
        }
    }
}

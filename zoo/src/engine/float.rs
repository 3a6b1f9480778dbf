//! The engine's full-precision layers on one image in NHWC layout: convolution (im2col + GEMM,
//! or direct for short windows such as a stem's),
//! depthwise convolution, pooling, the dense head, and the per-channel output transforms that
//! every layer applies on the fly.

use rayon::prelude::*;

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
        for op in &self.ops {
            match op {
                ChannelOp::Affine { mul, add } => {
                    for ((v, m), a) in values.iter_mut().zip(mul).zip(add) {
                        *v = *v * m + a;
                    }
                }
                ChannelOp::Scale(mul) => values.iter_mut().zip(mul).for_each(|(v, m)| *v *= m),
                ChannelOp::Add(add) => values.iter_mut().zip(add).for_each(|(v, a)| *v += a),
                ChannelOp::Relu => values.iter_mut().for_each(|v| *v = v.max(0.0)),
                ChannelOp::PRelu(alpha) => values.iter_mut().zip(alpha).for_each(|(v, a)| {
                    if *v <= 0.0 {
                        *v *= a;
                    }
                }),
            }
        }
        if let Some(r) = residual {
            values.iter_mut().zip(r).for_each(|(v, r)| *v += r);
        }
    }

    /// Applies [`Epilogue::apply`] to every pixel of `map` (`channels` values each) in parallel.
    pub fn apply_map(&self, data: &mut [f32], channels: usize, residual: Option<&[f32]>) {
        if self.is_empty() && residual.is_none() {
            return;
        }
        let rows = data.len() / channels;
        let chunk = (rows / (4 * rayon::current_num_threads()).max(1)).max(16) * channels;
        data.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, block)| {
                for (j, px) in block.chunks_mut(channels).enumerate() {
                    let at = (i * chunk) + j * channels;
                    self.apply(px, residual.map(|r| &r[at..at + channels]));
                }
            });
    }
}

/// Geometry of a window op: kernel, stride and `[top, bottom, left, right]` padding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Kernel height and width.
    pub kernel: [usize; 2],
    /// Vertical and horizontal stride.
    pub stride: [usize; 2],
    /// `[top, bottom, left, right]`.
    pub pads: [usize; 4],
}

impl Window {
    /// Output height and width for an `h x w` input.
    pub fn output(&self, h: usize, w: usize) -> (usize, usize) {
        let [top, bottom, left, right] = self.pads;
        (
            (h + top + bottom - self.kernel[0]) / self.stride[0] + 1,
            (w + left + right - self.kernel[1]) / self.stride[1] + 1,
        )
    }

    /// The input row and column of tap `(ky, kx)` for output `(oy, ox)`, if inside the image.
    #[inline]
    fn source(
        &self,
        oy: usize,
        ox: usize,
        ky: usize,
        kx: usize,
        h: usize,
        w: usize,
    ) -> Option<(usize, usize)> {
        let y = (oy * self.stride[0] + ky).checked_sub(self.pads[0])?;
        let x = (ox * self.stride[1] + kx).checked_sub(self.pads[2])?;
        (y < h && x < w).then_some((y, x))
    }
}

/// A convolution: `weight` is `kh x kw x in x out`; taps in the padding read `pad_value`.
/// Computed directly where windows are short (at most 64 inputs per output), else as
/// im2col + one GEMM; then `epilogue` per output pixel.
pub fn conv(
    x: &FloatMap,
    weight: &[f32],
    out_channels: usize,
    window: Window,
    pad_value: f32,
    epilogue: &Epilogue,
    residual: Option<&[f32]>,
) -> FloatMap {
    let (oh, ow) = window.output(x.height, x.width);
    let [kh, kw] = window.kernel;
    let c = x.channels;
    let k = kh * kw * c;
    let direct = kh == 1 && kw == 1 && window.stride == [1, 1] && window.pads == [0; 4];
    if !direct && k <= DIRECT_MAX_TAPS {
        return conv_direct(
            x,
            weight,
            out_channels,
            window,
            pad_value,
            epilogue,
            residual,
        );
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
    matmul(lhs, weight, &mut out.data, oh * ow, k, out_channels);
    epilogue.apply_map(&mut out.data, out_channels, residual);
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
    weight: &[f32],
    out_channels: usize,
    window: Window,
    pad_value: f32,
    epilogue: &Epilogue,
    residual: Option<&[f32]>,
) -> FloatMap {
    let (oh, ow) = window.output(x.height, x.width);
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
    out.data
        .par_chunks_mut(row_len)
        .enumerate()
        .for_each(|(oy, row)| {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: AVX2 is available.
                unsafe { direct_row_avx2(x, weight, window, pad_value, offsets, oy, row) };
            } else {
                direct_row(x, weight, window, pad_value, offsets, oy, row);
            }
            #[cfg(not(target_arch = "x86_64"))]
            direct_row(x, weight, window, pad_value, offsets, oy, row);
            for (ox, px) in row.chunks_exact_mut(out_channels).enumerate() {
                let at = (oy * ow + ox) * out_channels;
                epilogue.apply(px, residual.map(|r| &r[at..at + out_channels]));
            }
        });
    out
}

/// [`direct_row`] compiled for AVX2 (its border pixels vectorized too).
///
/// # Safety
/// AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn direct_row_avx2(
    x: &FloatMap,
    weight: &[f32],
    window: Window,
    pad_value: f32,
    offsets: &[usize],
    oy: usize,
    row: &mut [f32],
) {
    direct_row(x, weight, window, pad_value, offsets, oy, row)
}

/// Output row `oy` of a direct convolution into `row` (`ow * out` values, `out` from the
/// weight's size), before the epilogue: `PIXELS` pixels at a time, for independent sums,
/// reading the inputs in place (at `offsets` from a window's top-left input, in weight order)
/// where their windows lie inside the image.
#[inline(always)]
fn direct_row(
    x: &FloatMap,
    weight: &[f32],
    window: Window,
    pad_value: f32,
    offsets: &[usize],
    oy: usize,
    row: &mut [f32],
) {
    const PIXELS: usize = 4;
    let [kh, kw] = window.kernel;
    let [sy, sx] = window.stride;
    let [top, _, left, _] = window.pads;
    let (h, w, c) = (x.height, x.width, x.channels);
    let k = kh * kw * c;
    let n = weight.len() / k;
    let ow = row.len() / n;
    #[cfg(target_arch = "x86_64")]
    let fma = n.is_multiple_of(16)
        && std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma");
    // The first input row and column of a window, if the window lies inside the image.
    let y0 = (oy * sy).checked_sub(top).filter(|y| y + kh <= h);
    let inside = |ox: usize| (ox * sx).checked_sub(left).filter(|x| x + kw <= w);
    let mut patches = vec![[0f32; PIXELS]; k];
    let mut ox0 = 0;
    while ox0 < ow {
        let pixels = PIXELS.min(ow - ox0);
        let out = &mut row[ox0 * n..(ox0 + pixels) * n];
        match (y0, inside(ox0), inside(ox0 + PIXELS - 1)) {
            (Some(y0), Some(x0), Some(_)) if pixels == PIXELS => {
                let bases: [usize; PIXELS] = std::array::from_fn(|p| (y0 * w + x0 + p * sx) * c);
                #[cfg(target_arch = "x86_64")]
                if fma {
                    // SAFETY: AVX2 and FMA are available; every `bases[p] + offsets[i]` is an
                    // input of a window inside the image.
                    unsafe { direct_pixels_fma(&x.data, bases, offsets, weight, out) };
                    ox0 += pixels;
                    continue;
                }
                direct_pixels(|i, p| x.data[bases[p] + offsets[i]], k, weight, out);
            }
            _ => {
                // Border pixels: gather their windows, padding included.
                for ky in 0..kh {
                    for kx in 0..kw {
                        let tap = &mut patches[(ky * kw + kx) * c..][..c];
                        for p in 0..PIXELS {
                            let source = (p < pixels)
                                .then(|| window.source(oy, ox0 + p, ky, kx, h, w))
                                .flatten();
                            for (ci, t) in tap.iter_mut().enumerate() {
                                t[p] = match source {
                                    Some((y, xx)) => x.data[(y * w + xx) * c + ci],
                                    None => pad_value,
                                };
                            }
                        }
                    }
                }
                direct_pixels(|i, p| patches[i][p], k, weight, out);
            }
        }
        ox0 += pixels;
    }
}

/// [`direct_pixels`] for 4 pixels whose inputs are `x[bases[p] + offsets[i]]`, with AVX2 and FMA,
/// for a multiple of 16 output channels.
///
/// # Safety
/// AVX2 and FMA; every `bases[p] + offsets[i]` indexes `x`; `out` holds 4 pixels.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn direct_pixels_fma(
    x: &[f32],
    bases: [usize; 4],
    offsets: &[usize],
    weight: &[f32],
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let k = offsets.len();
    let n = weight.len() / k;
    debug_assert!(n.is_multiple_of(16) && out.len() == 4 * n);
    for o0 in (0..n).step_by(16) {
        let mut acc = [[_mm256_setzero_ps(); 2]; 4];
        for (i, &offset) in offsets.iter().enumerate() {
            let w = &weight[i * n + o0..][..16];
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

/// `out[p][o] = sum_i input(i, p) * weight[i][o]` for the `out.len() / n` pixels `p` of `out`
/// (at most 4), 16 output channels at a time.
#[inline(always)]
fn direct_pixels(input: impl Fn(usize, usize) -> f32, k: usize, weight: &[f32], out: &mut [f32]) {
    const BLOCK: usize = 16;
    const PIXELS: usize = 4;
    let n = weight.len() / k;
    let pixels = out.len() / n;
    for o0 in (0..n).step_by(BLOCK) {
        let width = BLOCK.min(n - o0);
        let mut acc = [[0f32; BLOCK]; PIXELS];
        if width == BLOCK {
            for i in 0..k {
                let w: &[f32; BLOCK] = weight[i * n + o0..][..BLOCK].try_into().unwrap();
                for (p, acc) in acc.iter_mut().enumerate() {
                    let v = input(i, p);
                    for (a, w) in acc.iter_mut().zip(w) {
                        *a += v * w;
                    }
                }
            }
        } else {
            for i in 0..k {
                let w = &weight[i * n + o0..][..width];
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

/// `out (m x n) = lhs (m x k) * rhs (k x n)`, row-major, on the current rayon pool.
pub fn matmul(lhs: &[f32], rhs: &[f32], out: &mut [f32], m: usize, k: usize, n: usize) {
    assert!(lhs.len() >= m * k && rhs.len() >= k * n && out.len() >= m * n);
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 && m * n * k > 1 << 16 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the pointers address `m x k`, `k x n` and `m x n` row-major matrices inside the
    // slices, as asserted above; `out` is not read (`read_dst` is false).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
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
    let [kh, kw] = window.kernel;
    let c = x.channels;
    let co = c * multiplier;
    let mut out = FloatMap::zeros(oh, ow, co);
    out.data
        .par_chunks_mut(ow * co)
        .enumerate()
        .for_each(|(oy, row)| {
            for ox in 0..ow {
                let px = &mut row[ox * co..(ox + 1) * co];
                for ky in 0..kh {
                    for kx in 0..kw {
                        let Some((y, xx)) = window.source(oy, ox, ky, kx, x.height, x.width) else {
                            continue;
                        };
                        let input = &x.data[(y * x.width + xx) * c..][..c];
                        let taps = &weight[(ky * kw + kx) * co..][..co];
                        if multiplier == 1 {
                            for ((o, &v), &t) in px.iter_mut().zip(input).zip(taps) {
                                *o += v * t;
                            }
                        } else {
                            for (j, (o, &t)) in px.iter_mut().zip(taps).enumerate() {
                                *o += input[j / multiplier] * t;
                            }
                        }
                    }
                }
                let at = (oy * ow + ox) * co;
                epilogue.apply(px, residual.map(|r| &r[at..at + co]));
            }
        });
    out
}

/// The fixed `[1,2,1] x [1,2,1] / 16` blur with SAME zero padding and stride `stride`.
pub fn blur(x: &FloatMap, stride: usize) -> FloatMap {
    let c = x.channels;
    let taps = [1.0, 2.0, 1.0, 2.0, 4.0, 2.0, 1.0, 2.0, 1.0];
    let weight: Vec<f32> = taps
        .iter()
        .flat_map(|&t| std::iter::repeat_n(t / 16.0, c))
        .collect();
    let (top, bottom) = zoo_spec::same_padding(x.height, 3, stride);
    let (left, right) = zoo_spec::same_padding(x.width, 3, stride);
    let window = Window {
        kernel: [3, 3],
        stride: [stride; 2],
        pads: [top, bottom, left, right],
    };
    depthwise(x, &weight, 1, window, &Epilogue::default(), None)
}

/// Max pooling; padding never wins.
pub fn max_pool(x: &FloatMap, window: Window) -> FloatMap {
    pool(x, window, f32::NEG_INFINITY, f32::max, |m, _| m)
}

/// Average pooling over the taps inside the image.
pub fn avg_pool(x: &FloatMap, window: Window) -> FloatMap {
    pool(x, window, 0.0, |a, b| a + b, |s, n| s / n as f32)
}

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
    out.data
        .par_chunks_mut(ow * c)
        .enumerate()
        .for_each(|(oy, row)| {
            for ox in 0..ow {
                let px = &mut row[ox * c..(ox + 1) * c];
                px.fill(init);
                let mut count = 0;
                for ky in 0..window.kernel[0] {
                    for kx in 0..window.kernel[1] {
                        if let Some((y, xx)) = window.source(oy, ox, ky, kx, x.height, x.width) {
                            count += 1;
                            let input = &x.data[(y * x.width + xx) * c..][..c];
                            px.iter_mut()
                                .zip(input)
                                .for_each(|(o, &v)| *o = combine(*o, v));
                        }
                    }
                }
                px.iter_mut().for_each(|o| *o = finish(*o, count));
            }
        });
    out
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
pub fn dense(x: &FloatMap, weight: &[f32], units: usize, epilogue: &Epilogue) -> FloatMap {
    let mut out = FloatMap::zeros(1, 1, units);
    matmul(&x.data, weight, &mut out.data, 1, x.data.len(), units);
    epilogue.apply(&mut out.data, None);
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

//! LAB (the Learnable Activation Binarizer) as one fused op, forward and backward.
//!
//! LAB convolves its `N x C x H x W` input with a depthwise 3x3 kernel of multiplier 2 (stride 1,
//! SAME zero padding, with bias), giving `2C` maps `y_j` (map `j` reads input channel `j / 2`).
//! Output channel `c` compares the two maps `(a0, a1)` of its [`Pairing`]: with the learnable
//! scalar `beta`, `d = beta*y_a1 - beta*y_a0`, and the output is `+1` where `d > 0` and `-1`
//! elsewhere. The backward pass is that of the surrogate `tanh(d / 2)`.
//!
//! The forward pass runs one work item per `(image, output channel)`: both 3x3 sums of the pair,
//! the scale and the threshold, without materialising the `2C` maps. The backward pass recomputes
//! `d` the same way and produces every gradient (input, kernel, bias, beta) in one pass; the
//! kernel, bias and beta gradients are reduced per rayon task and summed at the end. Under the
//! [`Pairing::Official`] layout an input channel feeds two different pairs, so there the
//! backward pass first writes the gradients of the `2C` maps and then runs a second sweep over
//! input channels.
//!
//! Every plane is processed "wide", as in the depthwise kernel: the input is copied into a
//! zero-bordered `(H + 2) x (W + 2)` plane, output `(oy, ox)` lives at `oy * (W + 2) + ox`, and
//! each tap is one long shifted multiply-add. The taps are summed in the same order as the
//! depthwise convolution over a zero-padded input, so that (for finite tensors) the forward
//! decision is bit for bit the one of the composed candle ops (convolution, bias, `beta`,
//! difference, threshold).

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::{dispatch2, dispatch3};

/// Which two of the `2C` depthwise maps LAB compares for output channel `c` (of `C`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pairing {
    /// Maps `2c` and `2c + 1`: the two kernels of input channel `c` (the paper's form).
    Channel,
    /// Maps `c` and `C + c`, as the official code's `(2, C)` reshape of the Keras-ordered maps;
    /// they read input channels `c / 2` and `(C + c) / 2`.
    Official,
}

impl Pairing {
    /// The maps `[a0, a1]` compared for output channel `c` of `channels`.
    fn maps(self, c: usize, channels: usize) -> [usize; 2] {
        match self {
            Pairing::Channel => [2 * c, 2 * c + 1],
            Pairing::Official => [c, channels + c],
        }
    }

    /// The output channel whose pair holds map `a`, and the side (0 or 1) it is on.
    fn owner(self, a: usize, channels: usize) -> (usize, usize) {
        match self {
            Pairing::Channel => (a / 2, a % 2),
            Pairing::Official if a < channels => (a, 0),
            Pairing::Official => (a - channels, 1),
        }
    }
}

/// `f32` or `f64`, with the surrogate slope the backward pass needs.
trait Real: WithDType + std::ops::Neg<Output = Self> {
    /// `(1 - tanh(d / 2)^2) / 2`, the derivative of `tanh(d / 2)`, computed as
    /// `2 e / (1 + e)^2` with `e = exp(-|d|)`: one `exp` instead of a `tanh`, and no
    /// cancellation for large `|d|`.
    fn slope(self) -> Self;
}

impl Real for f32 {
    #[inline(always)]
    fn slope(self) -> Self {
        let e = (-self.abs()).exp();
        2.0 * e / ((1.0 + e) * (1.0 + e))
    }
}

impl Real for f64 {
    #[inline(always)]
    fn slope(self) -> Self {
        let e = (-self.abs()).exp();
        2.0 * e / ((1.0 + e) * (1.0 + e))
    }
}

/// The shapes of one LAB op: input `n x c x h x w`, and the pairing.
///
/// The parameters travel as one vector: the `2c x 1 x 3 x 3` kernel, then the `2c` biases, then
/// `beta`.
#[derive(Clone, Copy, Debug)]
struct Dims {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    pairing: Pairing,
}

impl Dims {
    fn plane(&self) -> usize {
        self.h * self.w
    }

    /// The row stride of padded and wide planes.
    fn pw(&self) -> usize {
        self.w + 2
    }

    fn padded(&self) -> usize {
        (self.h + 2) * self.pw()
    }

    /// The length of a wide plane: `h` rows of stride `w + 2`, the last one `w` long.
    fn wide(&self) -> usize {
        (self.h - 1) * self.pw() + self.w
    }

    /// The taps `(i, j)` that reach the image, in row-major order. On a plane one pixel high
    /// (wide) the outer tap rows (columns) read only padding: their products are zeros, which
    /// change no sum but the sign of a zero one (invisible to the threshold), so they are skipped.
    fn taps(&self) -> impl Iterator<Item = (usize, usize)> {
        let rows = if self.h == 1 { 1..2 } else { 0..3 };
        let cols = if self.w == 1 { 1..2 } else { 0..3 };
        rows.flat_map(move |i| cols.clone().map(move |j| (i, j)))
    }

    fn params(&self) -> usize {
        20 * self.c + 1
    }

    fn is_empty(&self) -> bool {
        self.n * self.c * self.h * self.w == 0
    }

    /// Rayon items per task so that each task does at least about 2^14 multiply-adds, for an
    /// item cost of `per_pixel` multiply-adds on each wide pixel.
    fn min_len(&self, per_pixel: usize) -> usize {
        const MIN_WORK: usize = 1 << 14;
        (MIN_WORK / (per_pixel * self.wide()).max(1)).max(1)
    }
}

/// The parameter vector, split: `(kernel, bias, beta)`.
fn split_params<'a, T: Real>(d: &Dims, params: &'a [T]) -> (&'a [T], &'a [T], T) {
    let (kernel, rest) = params.split_at(18 * d.c);
    (kernel, &rest[..2 * d.c], rest[2 * d.c])
}

/// Copies the `h x w` `plane` into the interior of `padded`, whose border stays zero.
fn pad_into<T: Real>(padded: &mut [T], plane: &[T], w: usize) {
    let pw = w + 2;
    for (r, row) in plane.chunks_exact(w).enumerate() {
        padded[(r + 1) * pw + 1..][..w].copy_from_slice(row);
    }
}

/// `acc = sum_t taps[t] * padded[. + offset_t]` on a wide plane, taps summed in row-major order
/// from zero (the order of the depthwise convolution, for bit-identical sums).
#[inline(always)]
fn correlate<T: Real>(d: &Dims, acc: &mut [T], taps: &[T], padded: &[T]) {
    acc.fill(T::zero());
    for (i, j) in d.taps() {
        let k = taps[i * 3 + j];
        for (a, &v) in acc.iter_mut().zip(&padded[i * d.pw() + j..]) {
            *a += k * v;
        }
    }
}

/// [`correlate`] in AVX2 vectors where the CPU has them: the same operations on each element,
/// so the same sums.
fn correlate_fast<T: Real>(d: &Dims, acc: &mut [T], taps: &[T], padded: &[T]) {
    /// # Safety
    /// AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn avx2<T: Real>(d: &Dims, acc: &mut [T], taps: &[T], padded: &[T]) {
        correlate(d, acc, taps, padded)
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is available.
        return unsafe { avx2(d, acc, taps, padded) };
    }
    correlate(d, acc, taps, padded)
}

/// `sum_i a[i] * b[i]` over `a.len()` entries, in eight independent lanes (vectorisable).
#[inline(always)]
fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let b = &b[..a.len()];
    let mut lanes = [T::zero(); 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (u, v) in ca.zip(cb) {
        for l in 0..8 {
            lanes[l] += u[l] * v[l];
        }
    }
    let mut s = lanes.iter().fold(T::zero(), |s, &v| s + v);
    for (&u, &v) in ra.iter().zip(rb) {
        s += u * v;
    }
    s
}

/// Per-task scratch: the padded input planes of a pair and its two wide sums (without bias).
struct Planes<T> {
    pad: [Vec<T>; 2],
    acc: [Vec<T>; 2],
}

impl<T: Real> Planes<T> {
    fn new(d: &Dims) -> Self {
        Planes {
            pad: [vec![T::zero(); d.padded()], vec![T::zero(); d.padded()]],
            acc: [vec![T::zero(); d.wide()], vec![T::zero(); d.wide()]],
        }
    }

    /// Fills `acc` with the two bias-free 3x3 sums of the pair of output channel `ch` of image
    /// `img`, and returns the pair's maps `[a0, a1]`. `pad[0]` holds the padded plane read by
    /// `a0` (under [`Pairing::Channel`] also the one read by `a1`).
    fn sums(&mut self, d: &Dims, x: &[T], kernel: &[T], img: usize, ch: usize) -> [usize; 2] {
        let maps = d.pairing.maps(ch, d.c);
        let [k0, k1] = maps.map(|a| a / 2);
        let plane = |k: usize| &x[(img * d.c + k) * d.plane()..][..d.plane()];
        let [pad0, pad1] = &mut self.pad;
        let [acc0, acc1] = &mut self.acc;
        pad_into(pad0, plane(k0), d.w);
        correlate_fast(d, acc0, &kernel[9 * maps[0]..][..9], pad0);
        let second = match k1 == k0 {
            true => &*pad0,
            false => {
                pad_into(pad1, plane(k1), d.w);
                &*pad1
            }
        };
        correlate_fast(d, acc1, &kernel[9 * maps[1]..][..9], second);
        maps
    }
}

/// The forward pass: `+1` where `beta*y_a1 - beta*y_a0 > 0`, `-1` elsewhere.
fn forward<T: Real>(d: &Dims, x: &[T], params: &[T]) -> Vec<T> {
    let mut out = vec![T::zero(); d.n * d.c * d.plane()];
    if d.is_empty() {
        return out;
    }
    let (kernel, bias, beta) = split_params(d, params);
    let (plus, minus) = (T::one(), -T::one());
    out.par_chunks_mut(d.plane())
        .with_min_len(d.min_len(18))
        .enumerate()
        .for_each_init(
            || Planes::new(d),
            |s, (p, plane_out)| {
                let [a0, a1] = s.sums(d, x, kernel, p / d.c, p % d.c);
                let (b0, b1) = (bias[a0], bias[a1]);
                for (oy, row) in plane_out.chunks_exact_mut(d.w).enumerate() {
                    let s0 = &s.acc[0][oy * d.pw()..][..d.w];
                    let s1 = &s.acc[1][oy * d.pw()..][..d.w];
                    for ((o, &u), &v) in row.iter_mut().zip(s0).zip(s1) {
                        let diff = beta * (v + b1) - beta * (u + b0);
                        *o = if diff > T::zero() { plus } else { minus };
                    }
                }
            },
        );
    out
}

/// Parameter gradients of one rayon task, accumulated in `f64`: kernel (`18c`), bias (`2c`),
/// then beta, as in the parameter vector.
struct ParamGrads(Vec<f64>);

impl ParamGrads {
    fn new(d: &Dims) -> Self {
        ParamGrads(vec![0.0; d.params()])
    }

    fn merge(mut self, other: Self) -> Self {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a += b;
        }
        self
    }
}

/// Per-task scratch of the fused backward pass: the wide gradients of a pair's two maps and a
/// padded input-gradient plane.
struct Grads<T> {
    dy: [Vec<T>; 2],
    dx: Vec<T>,
}

impl<T: Real> Grads<T> {
    fn new(d: &Dims) -> Self {
        Grads {
            dy: [vec![T::zero(); d.wide()], vec![T::zero(); d.wide()]],
            dx: vec![T::zero(); d.padded()],
        }
    }
}

/// The first half of the backward pass for the pair of output plane `p` (output channel
/// `p % c` of image `p / c`): recomputes `d`, writes the wide gradients of the two maps into
/// `dy` (their scratch columns are left as they are, zero), and adds the bias and beta
/// gradients to `grads`. Returns the pair's maps.
fn pair_backward<T: Real>(
    d: &Dims,
    (x, params, g): (&[T], &[T], &[T]),
    p: usize,
    planes: &mut Planes<T>,
    [dy0, dy1]: [&mut [T]; 2],
    grads: &mut ParamGrads,
) -> [usize; 2] {
    let (kernel, bias, beta) = split_params(d, params);
    let [a0, a1] = planes.sums(d, x, kernel, p / d.c, p % d.c);
    let (b0, b1) = (bias[a0], bias[a1]);
    let gplane = &g[p * d.plane()..][..d.plane()];
    let (mut db1, mut dbeta) = (T::zero(), T::zero());
    for (oy, grow) in gplane.chunks_exact(d.w).enumerate() {
        let at = oy * d.pw();
        let s0 = &planes.acc[0][at..][..d.w];
        let s1 = &planes.acc[1][at..][..d.w];
        let dy0 = &mut dy0[at..][..d.w];
        let dy1 = &mut dy1[at..][..d.w];
        for ox in 0..d.w {
            let (y0, y1) = (s0[ox] + b0, s1[ox] + b1);
            let gd = grow[ox] * (beta * y1 - beta * y0).slope();
            let dy = beta * gd;
            dy1[ox] = dy;
            dy0[ox] = -dy;
            db1 += dy;
            dbeta += gd * (y1 - y0);
        }
    }
    let bias_grads = &mut grads.0[18 * d.c..];
    bias_grads[a0] -= db1.to_f64();
    bias_grads[a1] += db1.to_f64();
    bias_grads[2 * d.c] += dbeta.to_f64();
    [a0, a1]
}

/// The second half of the backward pass for input channel `k` of image `img`, which maps `2k`
/// and `2k + 1` read: given their wide gradients `dys` and the padded input plane `padded`,
/// writes the input gradient into `dx_plane` (through the padded scratch plane `dx_wide`) and
/// adds the kernel gradients to `grads`.
#[inline(always)]
fn channel_backward<T: Real>(
    d: &Dims,
    kernel: &[T],
    (k, padded): (usize, &[T]),
    [dy0, dy1]: [&[T]; 2],
    [dx_wide, dx_plane]: [&mut [T]; 2],
    grads: &mut ParamGrads,
) {
    let pw = d.pw();
    let (taps0, taps1) = (&kernel[18 * k..][..9], &kernel[18 * k + 9..][..9]);
    dx_wide.fill(T::zero());
    for (i, j) in d.taps() {
        let t = 3 * i + j;
        let off = i * pw + j;
        let (k0, k1) = (taps0[t], taps1[t]);
        for ((o, &u), &v) in dx_wide[off..].iter_mut().zip(dy0).zip(dy1) {
            *o += k0 * u + k1 * v;
        }
        grads.0[18 * k + t] += dot(dy0, &padded[off..]).to_f64();
        grads.0[18 * k + 9 + t] += dot(dy1, &padded[off..]).to_f64();
    }
    for (r, row) in dx_plane.chunks_exact_mut(d.w).enumerate() {
        row.copy_from_slice(&dx_wide[(r + 1) * pw + 1..][..d.w]);
    }
}

/// [`channel_backward`] in AVX2 vectors where the CPU has them (the same arithmetic).
fn channel_backward_fast<T: Real>(
    d: &Dims,
    kernel: &[T],
    input: (usize, &[T]),
    dys: [&[T]; 2],
    dx: [&mut [T]; 2],
    grads: &mut ParamGrads,
) {
    /// # Safety
    /// AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn avx2<T: Real>(
        d: &Dims,
        kernel: &[T],
        input: (usize, &[T]),
        dys: [&[T]; 2],
        dx: [&mut [T]; 2],
        grads: &mut ParamGrads,
    ) {
        channel_backward(d, kernel, input, dys, dx, grads)
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is available.
        return unsafe { avx2(d, kernel, input, dys, dx, grads) };
    }
    channel_backward(d, kernel, input, dys, dx, grads)
}

/// The backward pass: the input gradient (`n*c*h*w`) followed by the parameter gradients.
fn backward<T: Real>(d: &Dims, x: &[T], params: &[T], g: &[T]) -> Vec<T> {
    let nx = d.n * d.c * d.plane();
    let mut out = vec![T::zero(); nx + d.params()];
    if d.is_empty() {
        return out;
    }
    let (dx, dparams) = out.split_at_mut(nx);
    let kernel = split_params(d, params).0;
    let grads = match d.pairing {
        // Pair `c` is input channel `c`: one sweep does both halves.
        Pairing::Channel => dx
            .par_chunks_mut(d.plane())
            .with_min_len(d.min_len(54))
            .enumerate()
            .fold(
                || (Planes::new(d), Grads::new(d), ParamGrads::new(d)),
                |(mut planes, mut scratch, mut grads), (p, dx_plane)| {
                    let [dy0, dy1] = &mut scratch.dy;
                    let dys = [dy0.as_mut_slice(), dy1.as_mut_slice()];
                    pair_backward(d, (x, params, g), p, &mut planes, dys, &mut grads);
                    channel_backward_fast(
                        d,
                        kernel,
                        (p % d.c, &planes.pad[0]),
                        [&scratch.dy[0], &scratch.dy[1]],
                        [&mut scratch.dx, dx_plane],
                        &mut grads,
                    );
                    (planes, scratch, grads)
                },
            )
            .map(|(_, _, grads)| grads)
            .reduce(|| ParamGrads::new(d), ParamGrads::merge),
        // An input channel feeds two pairs: first the map gradients of every pair, stored as
        // `n x c x 2` wide planes, then one sweep over input channels.
        Pairing::Official => {
            let wide = d.wide();
            let mut dys = vec![T::zero(); d.n * d.c * 2 * wide];
            let first = dys
                .par_chunks_mut(2 * wide)
                .with_min_len(d.min_len(18))
                .enumerate()
                .fold(
                    || (Planes::new(d), ParamGrads::new(d)),
                    |(mut planes, mut grads), (p, pair)| {
                        let (dy0, dy1) = pair.split_at_mut(wide);
                        let io = (x, params, g);
                        pair_backward(d, io, p, &mut planes, [dy0, dy1], &mut grads);
                        (planes, grads)
                    },
                )
                .map(|(_, grads)| grads)
                .reduce(|| ParamGrads::new(d), ParamGrads::merge);
            let dys = &dys;
            let second = dx
                .par_chunks_mut(d.plane())
                .with_min_len(d.min_len(36))
                .enumerate()
                .fold(
                    || {
                        let padded = || vec![T::zero(); d.padded()];
                        (padded(), padded(), ParamGrads::new(d))
                    },
                    |(mut padded, mut dx_wide, mut grads), (p, dx_plane)| {
                        let (img, k) = (p / d.c, p % d.c);
                        pad_into(&mut padded, &x[p * d.plane()..][..d.plane()], d.w);
                        let map_grad = |a: usize| {
                            let (ch, side) = d.pairing.owner(a, d.c);
                            &dys[((img * d.c + ch) * 2 + side) * wide..][..wide]
                        };
                        channel_backward_fast(
                            d,
                            kernel,
                            (k, &padded),
                            [map_grad(2 * k), map_grad(2 * k + 1)],
                            [&mut dx_wide, dx_plane],
                            &mut grads,
                        );
                        (padded, dx_wide, grads)
                    },
                )
                .map(|(_, _, grads)| grads)
                .reduce(|| ParamGrads::new(d), ParamGrads::merge);
            first.merge(second)
        }
    };
    for (o, &v) in dparams.iter_mut().zip(&grads.0) {
        *o = T::from_f64(v);
    }
    out
}

/// The forward op: `(input, parameters) -> ±1`.
struct Lab(Dims);
/// The backward op: `(input, parameters, output gradient) -> [input gradient, parameter
/// gradients]`, flattened into one vector.
struct LabBackward(Dims);

impl CustomOp2 for Lab {
    fn name(&self) -> &'static str {
        "lab"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = &self.0;
        let out = dispatch2(
            self.name(),
            (s1, l1),
            (s2, l2),
            |x, p| forward(d, x, p),
            |x, p| forward(d, x, p),
        )?;
        Ok((out, Shape::from((d.n, d.c, d.h, d.w))))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        params: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = &self.0;
        let both = xs.detach().apply_op3_no_bwd(
            &params.detach(),
            &grad_res.contiguous()?,
            &LabBackward(*d),
        )?;
        let nx = d.n * d.c * d.plane();
        let dx = both.narrow(0, 0, nx)?.reshape(xs.shape())?;
        let dp = both.narrow(0, nx, d.params())?;
        Ok((Some(dx), Some(dp)))
    }
}

impl CustomOp3 for LabBackward {
    fn name(&self) -> &'static str {
        "lab-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = &self.0;
        let out = dispatch3(
            self.name(),
            (s1, l1),
            (s2, l2),
            (s3, l3),
            |x, p, g| backward(d, x, p, g),
            |x, p, g| backward(d, x, p, g),
        )?;
        Ok((out, Shape::from(d.n * d.c * d.plane() + d.params())))
    }
}

/// LAB on an `N x C x H x W` input `x` (`f32` or `f64`), fused into one op each way.
///
/// `weight` is the `2C x 1 x 3 x 3` depthwise kernel (map `2k + q` reads input channel `k`),
/// `bias` the `2C` biases and `beta` the scalar scale (one element). With `y_j` the 3x3 SAME
/// zero-padded correlation of map `j` plus `bias[j]` and `(a0, a1)` the maps of output channel
/// `c` under `pairing`, the output is `+1` where `beta*y_a1 - beta*y_a0 > 0` and `-1` elsewhere
/// (ties give `-1`), bit for bit as the composed candle ops compute it. The gradients (to `x`,
/// `weight`, `bias` and `beta`) are those of the surrogate `tanh((beta*y_a1 - beta*y_a0) / 2)`.
pub fn lab(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    beta: &Tensor,
    pairing: Pairing,
) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if weight.dims() != [2 * c, 1, 3, 3] || bias.elem_count() != 2 * c || beta.elem_count() != 1 {
        candle_core::bail!(
            "lab: a {n}x{c}x{h}x{w} input needs a {}x1x3x3 kernel, {} biases and one beta, \
             found {:?}, {:?} and {:?}",
            2 * c,
            2 * c,
            weight.dims(),
            bias.dims(),
            beta.dims()
        );
    }
    let params = Tensor::cat(
        &[
            weight.flatten_all()?,
            bias.flatten_all()?,
            beta.flatten_all()?,
        ],
        0,
    )?;
    let dims = Dims {
        n,
        c,
        h,
        w,
        pairing,
    };
    x.contiguous()?.apply_op2(&params, Lab(dims))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// A deterministic source of uniform numbers in `[-1, 1)` (SplitMix64).
    struct Rng(u64);

    impl Rng {
        fn uniform(&mut self, len: usize) -> Vec<f64> {
            (0..len)
                .map(|_| {
                    self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
                    let mut z = self.0;
                    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                    z ^= z >> 31;
                    (z >> 11) as f64 / (1u64 << 52) as f64 - 1.0
                })
                .collect()
        }
    }

    /// Random LAB inputs as `Var`s of `dtype`: `x`, `weight`, `bias`, `beta`.
    fn setup(rng: &mut Rng, (n, c, h, w): (usize, usize, usize, usize), dtype: DType) -> [Var; 4] {
        let dev = Device::Cpu;
        let make = |v: Vec<f64>, shape: &[usize]| {
            let t = Tensor::from_vec(v, shape, &dev)?.to_dtype(dtype)?;
            Var::from_tensor(&t)
        };
        let beta = 1.5 * rng.uniform(1)[0];
        [
            make(rng.uniform(n * c * h * w), &[n, c, h, w]),
            make(rng.uniform(18 * c), &[2 * c, 1, 3, 3]),
            make(rng.uniform(2 * c), &[2 * c]),
            make(vec![beta], &[1]),
        ]
        .map(|v| v.expect("a variable"))
    }

    /// LAB as the composition of candle ops that `zoo::layers::Lab` used before this op: channels
    /// repeated, zero padding, depthwise convolution, bias, `beta`, pairing, `lab_sign`.
    fn composed(xs: &Tensor, k: &Tensor, b: &Tensor, beta: &Tensor, p: Pairing) -> Result<Tensor> {
        let (n, c, h, w) = xs.dims4()?;
        let repeated = xs
            .unsqueeze(2)?
            .broadcast_as((n, c, 2, h, w))?
            .reshape((n, 2 * c, h, w))?;
        let padded = repeated.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
        let ys = crate::depthwise_conv2d(&padded, k, [1, 1])?
            .broadcast_add(&b.reshape((1, (), 1, 1))?)?
            .broadcast_mul(beta)?;
        let pairs = match p {
            Pairing::Channel => ys.reshape((n, c, 2, h, w))?.transpose(1, 2)?,
            Pairing::Official => ys.reshape((n, 2, c, h, w))?,
        };
        let y0 = pairs.narrow(1, 0, 1)?.squeeze(1)?;
        let y1 = pairs.narrow(1, 1, 1)?.squeeze(1)?;
        crate::lab_sign(&y1.sub(&y0)?)
    }

    fn values(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .expect("values")
    }

    /// `|a - e| <= rtol * max(|e|, max|e| / 100)` elementwise: relative, with a floor for
    /// entries that cancel to near zero.
    #[track_caller]
    fn assert_close(actual: &[f64], expected: &[f64], rtol: f64, what: &str) {
        assert_eq!(actual.len(), expected.len(), "{what}: lengths");
        let scale = expected.iter().fold(0f64, |m, v| m.max(v.abs())) / 100.0;
        for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
            let tol = rtol * e.abs().max(scale).max(1e-30);
            assert!((a - e).abs() <= tol, "{what}[{i}]: {a:e} vs {e:e}");
        }
    }

    const SIZES: [(usize, usize); 4] = [(1, 1), (3, 5), (7, 7), (2, 9)];
    const PAIRINGS: [Pairing; 2] = [Pairing::Channel, Pairing::Official];

    #[test]
    fn matches_the_composed_ops_forward_exactly_and_gradients() -> Result<()> {
        let mut rng = Rng(1);
        for (dtype, rtol) in [(DType::F64, 1e-5), (DType::F32, 1e-4)] {
            for n in 1..=3 {
                for c in [1, 2, 3, 5] {
                    for (h, w) in SIZES {
                        for pairing in PAIRINGS {
                            let what = format!("{dtype:?} {pairing:?} {n}x{c}x{h}x{w}");
                            let vars = setup(&mut rng, (n, c, h, w), dtype);
                            let [x, k, b, beta] = vars.each_ref().map(|v| v.as_tensor());
                            let ours = lab(x, k, b, beta, pairing)?;
                            let theirs = composed(x, k, b, beta, pairing)?;
                            assert_eq!(ours.dtype(), dtype);
                            assert_eq!(ours.dims(), [n, c, h, w]);
                            let (o, t) = (values(&ours), values(&theirs));
                            assert!(o == t, "{what}: forward differs");
                            assert!(o.iter().all(|&v| v == 1.0 || v == -1.0), "{what}");

                            let g = Tensor::from_vec(
                                rng.uniform(n * c * h * w),
                                ours.dims(),
                                x.device(),
                            )?
                            .to_dtype(dtype)?;
                            let ours = (ours * &g)?.sum_all()?.backward()?;
                            let theirs = (theirs * &g)?.sum_all()?.backward()?;
                            for (name, v) in ["x", "weight", "bias", "beta"].iter().zip(&vars) {
                                let get = |grads: &candle_core::backprop::GradStore| {
                                    values(grads.get(v.as_tensor()).expect("a gradient"))
                                };
                                let what = format!("{what} d/d{name}");
                                assert_close(&get(&ours), &get(&theirs), rtol, &what);
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// `sum(g * tanh(d / 2))` with `d = beta*y_a1 - beta*y_a0`, as plain loops in f64.
    fn surrogate(
        (n, c, h, w): (usize, usize, usize, usize),
        pairing: Pairing,
        [x, k, b, beta]: [&[f64]; 4],
        g: &[f64],
    ) -> f64 {
        let y = |img: usize, a: usize, oy: usize, ox: usize| {
            let mut s = b[a];
            for i in 0..3 {
                for j in 0..3 {
                    let (iy, ix) = ((oy + i).wrapping_sub(1), (ox + j).wrapping_sub(1));
                    if iy < h && ix < w {
                        s += k[a * 9 + i * 3 + j] * x[((img * c + a / 2) * h + iy) * w + ix];
                    }
                }
            }
            s
        };
        let mut loss = 0.0;
        for img in 0..n {
            for ch in 0..c {
                let [a0, a1] = pairing.maps(ch, c);
                for oy in 0..h {
                    for ox in 0..w {
                        let d = beta[0] * y(img, a1, oy, ox) - beta[0] * y(img, a0, oy, ox);
                        loss += g[((img * c + ch) * h + oy) * w + ox] * (d / 2.0).tanh();
                    }
                }
            }
        }
        loss
    }

    #[test]
    fn gradients_match_finite_differences_of_the_tanh_surrogate() -> Result<()> {
        let mut rng = Rng(2);
        let step = 1e-6;
        for dims in [(2, 3, 3, 5), (1, 5, 2, 9), (3, 1, 1, 1), (1, 2, 7, 7)] {
            for pairing in PAIRINGS {
                let vars = setup(&mut rng, dims, DType::F64);
                let [x, k, b, beta] = vars.each_ref().map(|v| v.as_tensor());
                let (n, c, h, w) = dims;
                let g = rng.uniform(n * c * h * w);
                let gt = Tensor::from_slice(&g, dims, x.device())?;
                let grads = (lab(x, k, b, beta, pairing)? * gt)?.sum_all()?.backward()?;
                let mut point = vars.each_ref().map(|v| values(v.as_tensor()));
                for (which, name) in ["x", "weight", "bias", "beta"].iter().enumerate() {
                    let analytic = values(grads.get(vars[which].as_tensor()).expect("a gradient"));
                    for i in 0..point[which].len() {
                        let at = |point: &[Vec<f64>; 4]| {
                            let args = point.each_ref().map(|v| v.as_slice());
                            surrogate(dims, pairing, args, &g)
                        };
                        let base = point[which][i];
                        point[which][i] = base + step;
                        let up = at(&point);
                        point[which][i] = base - step;
                        let down = at(&point);
                        point[which][i] = base;
                        let numeric = (up - down) / (2.0 * step);
                        assert!(
                            (numeric - analytic[i]).abs() <= 1e-6 * numeric.abs().max(0.1),
                            "{pairing:?} {dims:?} d/d{name}[{i}]: numeric {numeric:e}, \
                             analytic {:e}",
                            analytic[i]
                        );
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn ties_give_minus_one_and_gradients_flow() -> Result<()> {
        // Identical kernels and biases in each pair: d = 0 everywhere.
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 4, 5), &dev)?)?;
        let k = Tensor::randn(0f32, 1.0, (3, 1, 1, 3, 3), &dev)?
            .broadcast_as((3, 2, 1, 3, 3))?
            .reshape((6, 1, 3, 3))?;
        let b = Tensor::new(&[0.5f32, 0.5, -1.0, -1.0, 2.0, 2.0], &dev)?;
        let beta = Tensor::new(&[1.0f32], &dev)?;
        let y = lab(&x, &k, &b, &beta, Pairing::Channel)?;
        assert!(values(&y).iter().all(|&v| v == -1.0));
        let grads = y.sum_all()?.backward()?;
        let dx = values(grads.get(x.as_tensor()).expect("a gradient"));
        // d = 0 gives the surrogate slope 1/2 on both maps, which cancel.
        assert!(dx.iter().all(|&v| v == 0.0), "{dx:?}");
        Ok(())
    }

    #[test]
    fn non_contiguous_empty_and_bad_inputs() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f64, 1.0, (2, 3, 6, 5), &dev)?;
        let k = Tensor::randn(0f64, 1.0, (6, 1, 3, 3), &dev)?;
        let b = Tensor::randn(0f64, 1.0, 6, &dev)?;
        let beta = Tensor::new(&[0.8f64], &dev)?;
        let xt = x.transpose(2, 3)?;
        let ours = lab(&xt, &k, &b, &beta, Pairing::Official)?;
        let theirs = composed(&xt.contiguous()?, &k, &b, &beta, Pairing::Official)?;
        assert_eq!(values(&ours), values(&theirs));

        let empty = Tensor::zeros((0, 3, 6, 5), DType::F64, &dev)?;
        assert_eq!(
            lab(&empty, &k, &b, &beta, Pairing::Channel)?.dims(),
            [0, 3, 6, 5]
        );

        let k5 = Tensor::zeros((6, 1, 5, 5), DType::F64, &dev)?;
        let err = lab(&x, &k5, &b, &beta, Pairing::Channel).unwrap_err();
        assert!(err.to_string().contains("6x1x3x3"), "{err}");
        assert!(lab(&x, &k, &b.narrow(0, 0, 5)?, &beta, Pairing::Channel).is_err());
        assert!(lab(&x, &k, &b, &b, Pairing::Channel).is_err());
        assert!(lab(&x.to_dtype(DType::F32)?, &k, &b, &beta, Pairing::Channel).is_err());
        Ok(())
    }
}

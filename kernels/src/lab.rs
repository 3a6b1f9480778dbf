//! LAB (the Learnable Activation Binarizer) as one fused op, forward and backward.
//!
//! LAB convolves its `N x C x H x W` input with a depthwise 3x3 kernel of multiplier 2 (stride 1,
//! SAME zero padding, with bias), giving `2C` maps `y_j` (map `j` reads input channel `j / 2`).
//! Output channel `c` compares the two maps `(a0, a1)` of its [`Pairing`]: with the learnable
//! scalar `beta`, `d = beta*y_a1 - beta*y_a0`, and the output is `+1` where `d > 0` and `-1`
//! elsewhere. The backward pass is that of the surrogate `tanh(d / 2)`.
//!
//! The op works on *windows* of `L` consecutive planes of the `N*C` (image, channel) planes, one
//! plane per vector lane: a window's planes are copied side by side (lane-interleaved) into a
//! zero-bordered `(H + 2) x (W + 2)` grid, so that every tap of every pixel is one multiply-add
//! across `L` channels, whatever the map size. This matters for the small maps of training on
//! small images (down to 1x1), where a plane-by-plane loop spends its time on overhead. The
//! per-lane parameters (taps, biases) repeat every `C / gcd(C, L)` windows and are laid out once
//! per call.
//!
//! - The forward pass computes both 3x3 sums of each output lane's pair, the scale and the
//!   threshold, without materialising the `2C` maps.
//! - The backward pass recomputes `d` the same way, forms the gradients of the pair's two maps
//!   (and the bias and beta gradients), then the input and kernel gradients. Under
//!   [`Pairing::Channel`] a window's output lanes are its input lanes and both halves run in one
//!   sweep. Under [`Pairing::Official`] an input channel feeds two different pairs, so the first
//!   sweep stores the map gradients and a second sweep runs over the input windows. Parameter
//!   gradients are reduced per rayon task in `f64` and summed at the end.
//!
//! The taps are summed in the same order as the depthwise convolution over a zero-padded input,
//! from zero, so that (for finite tensors) the forward decision is bit for bit the one of the
//! composed candle ops (convolution, bias, `beta`, difference, threshold).

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

/// Planes processed side by side, one per vector lane (eight `f32`s fill an AVX2 register).
const L: usize = 8;

/// One value per lane of a window.
type Lanes<T> = [T; L];

/// `f32` or `f64`, with the surrogate slope the backward pass needs.
trait Real: WithDType + std::ops::Neg<Output = Self> {
    /// `(1 - tanh(d / 2)^2) / 2`, the derivative of `tanh(d / 2)`, of each lane, computed as
    /// `2 e / (1 + e)^2` with `e = exp(-|d|)`: one `exp` instead of a `tanh`, and no
    /// cancellation for large `|d|`.
    fn slopes(d: Lanes<Self>) -> Lanes<Self>;
}

impl Real for f32 {
    #[inline(always)]
    fn slopes(mut d: Lanes<f32>) -> Lanes<f32> {
        for v in &mut d {
            let e = exp_nonpositive(-v.abs());
            *v = 2.0 * e / ((1.0 + e) * (1.0 + e));
        }
        d
    }
}

impl Real for f64 {
    #[inline(always)]
    fn slopes(d: Lanes<f64>) -> Lanes<f64> {
        d.map(|v| {
            let e = (-v.abs()).exp();
            2.0 * e / ((1.0 + e) * (1.0 + e))
        })
    }
}

/// `exp(x)` for `x <= 0` in plain arithmetic, so that it vectorises and gives the same result on
/// every CPU: `2^n e^r` with `n` the integer nearest `x / ln 2`, and `e^r` (`|r| <= ln 2 / 2`) by
/// its Taylor polynomial of degree 7, whose remainder (below 1e-8) is under `f32` precision.
/// Arguments below -87 give `exp(-87)`, about 1.6e-38, the smallest normal power in range.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    // ln 2 = LN2_HI + LN2_LO, with LN2_HI short enough that `n * LN2_HI` is exact.
    const LN2_HI: f32 = 355.0 / 512.0;
    const LN2_LO: f32 = (std::f64::consts::LN_2 - 355.0 / 512.0) as f32;
    let x = x.max(-87.0);
    // Truncation towards zero of a non-positive `x / ln 2 - 1/2` rounds `x / ln 2`.
    let n = (x * std::f32::consts::LOG2_E - 0.5) as i32;
    let nf = n as f32;
    let r = (x - nf * LN2_HI) - nf * LN2_LO;
    let mut p = 1.0 / 5040.0;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p * r + c;
    }
    // `n >= -126`, so `n + 127` is a valid biased exponent.
    p * f32::from_bits(((n + 127) as u32) << 23)
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

    /// The row stride of padded and wide grids.
    fn pw(&self) -> usize {
        self.w + 2
    }

    /// The length of a padded grid: the plane with a zero border; pixel `(y, x)` at
    /// `(y + 1) * (w + 2) + x + 1`.
    fn padded(&self) -> usize {
        (self.h + 2) * self.pw()
    }

    /// The length of a wide grid: pixel `(y, x)` at `y * (w + 2) + x`, so that a tap `(i, j)` of
    /// the pixel at `o` reads the padded grid at `o + i * (w + 2) + j`.
    fn wide(&self) -> usize {
        self.h * self.pw()
    }

    fn params(&self) -> usize {
        20 * self.c + 1
    }

    fn is_empty(&self) -> bool {
        self.n * self.c * self.h * self.w == 0
    }

    /// The plane in lane `lane` of window `window`, if the tensor has that many planes.
    fn plane_of(&self, window: usize, lane: usize) -> Option<usize> {
        let p = window * L + lane;
        (p < self.n * self.c).then_some(p)
    }

    /// Windows `w` and `w + period` hold the same channels in the same lanes.
    fn period(&self) -> usize {
        let (mut a, mut b) = (self.c, L);
        while b != 0 {
            (a, b) = (b, a % b);
        }
        self.c / a
    }

    /// The channel of lane `lane` in the windows of phase `phase` (`window % period`).
    fn channel(&self, phase: usize, lane: usize) -> usize {
        (phase * L + lane) % self.c
    }

    /// The input plane that side `side` of output plane `p` reads.
    fn pair_input(&self, p: usize, side: usize) -> usize {
        match self.pairing {
            Pairing::Channel => p,
            Pairing::Official => {
                let (img, ch) = (p / self.c, p % self.c);
                img * self.c + self.pairing.maps(ch, self.c)[side] / 2
            }
        }
    }

    /// Rayon items (windows) per task so that each task does at least about 2^14 multiply-adds,
    /// for a window cost of `per_pixel` multiply-adds on each pixel of each lane.
    fn min_len(&self, per_pixel: usize) -> usize {
        const MIN_WORK: usize = 1 << 14;
        (MIN_WORK / (per_pixel * L * self.plane()).max(1)).max(1)
    }
}

/// The taps `t = 3i + j` that reach the image, in row-major order, with their offsets
/// `i * (w + 2) + j` from a pixel's wide index into the padded grid. On a map one pixel high
/// (wide) the outer tap rows (columns) read only padding: their products are zeros, which change
/// no sum but the sign of a zero one (invisible to the threshold), so they are left out.
#[derive(Clone, Copy)]
struct Taps {
    len: usize,
    tap: [usize; 9],
    offset: [usize; 9],
}

impl Taps {
    fn new(d: &Dims) -> Self {
        let rows = if d.h == 1 { 1..2 } else { 0..3 };
        let cols = if d.w == 1 { 1..2 } else { 0..3 };
        let mut taps = Taps {
            len: 0,
            tap: [0; 9],
            offset: [0; 9],
        };
        for i in rows {
            for j in cols.clone() {
                taps.tap[taps.len] = 3 * i + j;
                taps.offset[taps.len] = i * d.pw() + j;
                taps.len += 1;
            }
        }
        taps
    }

    fn iter(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.tap[..self.len]
            .iter()
            .copied()
            .zip(self.offset[..self.len].iter().copied())
    }
}

/// The parameter vector, split: `(kernel, bias, beta)`.
fn split_params<'a, T: Real>(d: &Dims, params: &'a [T]) -> (&'a [T], &'a [T], T) {
    let (kernel, rest) = params.split_at(18 * d.c);
    (kernel, &rest[..2 * d.c], rest[2 * d.c])
}

/// The parameters of each lane, per window phase: `[side][phase]`.
struct Tables<T> {
    /// The taps of the two maps each output lane compares (`pairing.maps`).
    pair_taps: [Vec<[Lanes<T>; 9]>; 2],
    /// The biases of those maps.
    pair_bias: [Vec<Lanes<T>>; 2],
    /// The taps of the two maps `2k`, `2k + 1` that each input lane (channel `k`) feeds.
    input_taps: [Vec<[Lanes<T>; 9]>; 2],
    beta: T,
}

impl<T: Real> Tables<T> {
    fn new(d: &Dims, params: &[T]) -> Self {
        let (kernel, bias, beta) = split_params(d, params);
        let zeros = || vec![[[T::zero(); L]; 9]; d.period()];
        let mut t = Tables {
            pair_taps: [zeros(), zeros()],
            pair_bias: [0, 1].map(|_| vec![[T::zero(); L]; d.period()]),
            input_taps: [zeros(), zeros()],
            beta,
        };
        for ph in 0..d.period() {
            for l in 0..L {
                let ch = d.channel(ph, l);
                for side in 0..2 {
                    let (pair, input) = (d.pairing.maps(ch, d.c)[side], 2 * ch + side);
                    t.pair_bias[side][ph][l] = bias[pair];
                    for tap in 0..9 {
                        t.pair_taps[side][ph][tap][l] = kernel[9 * pair + tap];
                        t.input_taps[side][ph][tap][l] = kernel[9 * input + tap];
                    }
                }
            }
        }
        t
    }
}

/// Parameter gradients of one rayon task, per lane and window phase, accumulated in `f64`. The
/// forward pass leaves them empty (all zero).
#[derive(Default)]
struct ParamGrads {
    /// Of the maps `2k + s` of input lanes (channel `k`), tap `t` at `[phase][9s + t]`.
    kernel: Vec<[Lanes<f64>; 18]>,
    /// Of the maps of output lanes' pairs, at `[phase][side]`.
    bias: Vec<[Lanes<f64>; 2]>,
    beta: f64,
}

impl ParamGrads {
    fn new(d: &Dims) -> Self {
        ParamGrads {
            kernel: vec![[[0.0; L]; 18]; d.period()],
            bias: vec![[[0.0; L]; 2]; d.period()],
            beta: 0.0,
        }
    }

    fn merge(mut self, mut other: Self) -> Self {
        if self.kernel.is_empty() {
            std::mem::swap(&mut self, &mut other);
        }
        let kernel = self
            .kernel
            .iter_mut()
            .flatten()
            .zip(other.kernel.iter().flatten());
        let bias = self
            .bias
            .iter_mut()
            .flatten()
            .zip(other.bias.iter().flatten());
        for (a, b) in kernel.chain(bias) {
            add_lanes(a, b, L);
        }
        self.beta += other.beta;
        self
    }

    /// The gradients in the order of the parameter vector: kernel, biases, beta.
    fn write<T: Real>(&self, d: &Dims, out: &mut [T]) {
        let mut sums = vec![0.0; d.params()];
        for (ph, (kernel, bias)) in self.kernel.iter().zip(&self.bias).enumerate() {
            for l in 0..L {
                let ch = d.channel(ph, l);
                for (t, taps) in kernel.iter().enumerate() {
                    sums[18 * ch + t] += taps[l];
                }
                for (side, b) in bias.iter().enumerate() {
                    sums[18 * d.c + d.pairing.maps(ch, d.c)[side]] += b[l];
                }
            }
        }
        sums[20 * d.c] = self.beta;
        for (o, v) in out.iter_mut().zip(sums) {
            *o = T::from_f64(v);
        }
    }
}

/// Adds the first `lanes` lanes of `v` to `acc`.
#[inline(always)]
fn add_lanes<T: Real>(acc: &mut Lanes<f64>, v: &Lanes<T>, lanes: usize) {
    for (a, v) in acc.iter_mut().zip(v).take(lanes) {
        *a += v.to_f64();
    }
}

/// Per-task scratch: lane-interleaved grids, and the task's parameter gradients.
struct Scratch<T> {
    /// The padded inputs of the two sides of a window's pairs (only `[0]` under
    /// [`Pairing::Channel`], whose pairs read one plane); in the second sweep of the
    /// [`Pairing::Official`] backward, `[0]` holds the window's own input planes.
    x: [Vec<Lanes<T>>; 2],
    /// The output gradient, wide.
    g: Vec<Lanes<T>>,
    /// Wide: the gradients of the two maps, or the forward output in `[0]`.
    dy: [Vec<Lanes<T>>; 2],
    /// The padded input gradient.
    dx: Vec<Lanes<T>>,
    grads: ParamGrads,
}

impl<T: Real> Scratch<T> {
    /// Scratch for a pass; `grads` for a backward one.
    fn new(d: &Dims, grads: bool) -> Self {
        let grid = |len| vec![[T::zero(); L]; len];
        Scratch {
            x: [grid(d.padded()), grid(d.padded())],
            g: grid(d.wide()),
            dy: [grid(d.wide()), grid(d.wide())],
            dx: grid(d.padded()),
            grads: match grads {
                true => ParamGrads::new(d),
                false => ParamGrads::default(),
            },
        }
    }
}

/// Copies plane `plane(l)` into lane `l` of the grid `dst`, whose row `y` starts at
/// `origin + y * (w + 2)`; lanes without a plane become zeros.
#[inline(always)]
fn gather<'a, T: Real>(
    d: &Dims,
    dst: &mut [Lanes<T>],
    origin: usize,
    plane: impl Fn(usize) -> Option<&'a [T]>,
) {
    for l in 0..L {
        let src = plane(l);
        for y in 0..d.h {
            let row = &mut dst[origin + y * d.pw()..][..d.w];
            match src {
                Some(src) => {
                    for (v, &s) in row.iter_mut().zip(&src[y * d.w..][..d.w]) {
                        v[l] = s;
                    }
                }
                None => row.iter_mut().for_each(|v| v[l] = T::zero()),
            }
        }
    }
}

/// Copies lane `l` of the grid `src` (row `y` at `origin + y * (w + 2)`) into plane `l` of
/// `dst`, for each plane `dst` holds.
#[inline(always)]
fn scatter<T: Real>(d: &Dims, src: &[Lanes<T>], origin: usize, dst: &mut [T]) {
    for (l, plane) in dst.chunks_exact_mut(d.plane()).enumerate() {
        for (y, row) in plane.chunks_exact_mut(d.w).enumerate() {
            for (o, v) in row.iter_mut().zip(&src[origin + y * d.pw()..]) {
                *o = v[l];
            }
        }
    }
}

/// Pixels computed together: independent sums, so that their additions overlap.
const P: usize = 4;

/// The bias-free 3x3 sums of every lane of both maps of a pair (taps `k0` on the padded grid
/// `x0`, `k1` on `x1`) at the `P` pixels of wide indices `os`: taps summed in row-major order
/// from zero, as the depthwise convolution sums them.
#[inline(always)]
fn sums<T: Real>(
    taps: &Taps,
    [k0, k1]: [&[Lanes<T>; 9]; 2],
    [x0, x1]: [&[Lanes<T>]; 2],
    os: &[usize; P],
) -> [[Lanes<T>; P]; 2] {
    let mut acc = [[[T::zero(); L]; P]; 2];
    for (t, offset) in taps.iter() {
        for p in 0..P {
            let (u, v) = (x0[os[p] + offset], x1[os[p] + offset]);
            for l in 0..L {
                acc[0][p][l] += k0[t][l] * u[l];
                acc[1][p][l] += k1[t][l] * v[l];
            }
        }
    }
    acc
}

/// What one op shares with all its windows.
struct Ctx<'a, T> {
    d: Dims,
    taps: Taps,
    tables: Tables<T>,
    /// The wide indices of the map's pixels in row-major order, `P` at a time. The last group is
    /// filled up with `w`, a scratch column of row 0: its output gradient is zero, its padded
    /// windows lie inside the grid, and nothing reads its results.
    pixels: Vec<[usize; P]>,
    x: &'a [T],
    /// The output gradient (empty in the forward pass).
    g: &'a [T],
    /// The stored map gradients of the [`Pairing::Official`] backward, by side, in the layout of
    /// the output (empty elsewhere).
    dys: [&'a [T]; 2],
}

/// What one rayon item computes for its window, into the chunks of the outputs it owns.
enum Job<'o, T> {
    /// The forward pass, into the window's output planes.
    Forward(&'o mut [T]),
    /// The whole [`Pairing::Channel`] backward pass, into the window's input-gradient planes.
    Backward(&'o mut [T]),
    /// The first [`Pairing::Official`] backward sweep: the gradients of the two maps of the
    /// window's pairs.
    Pairs([&'o mut [T]; 2]),
    /// The second [`Pairing::Official`] backward sweep, into the window's input-gradient planes.
    Inputs(&'o mut [T]),
}

impl<'a, T: Real> Ctx<'a, T> {
    fn new(d: &Dims, params: &[T], x: &'a [T], g: &'a [T]) -> Self {
        let mut wide = (0..d.h).flat_map(|y| (y * d.pw()..).take(d.w));
        let groups = d.plane().div_ceil(P);
        let pixels = (0..groups)
            .map(|_| std::array::from_fn(|_| wide.next().unwrap_or(d.w)))
            .collect();
        Ctx {
            d: *d,
            taps: Taps::new(d),
            tables: Tables::new(d, params),
            pixels,
            x,
            g,
            dys: [&[], &[]],
        }
    }

    /// The planes of `src` in the lanes of window `window`, each mapped by `plane`.
    fn lanes<'s>(
        &self,
        src: &'s [T],
        window: usize,
        plane: impl Fn(usize) -> usize,
    ) -> impl Fn(usize) -> Option<&'s [T]> {
        let d = self.d;
        move |l| {
            d.plane_of(window, l)
                .map(|p| &src[plane(p) * d.plane()..][..d.plane()])
        }
    }

    /// Gathers the padded inputs of the pairs of window `window` into `s.x`.
    #[inline(always)]
    fn gather_pair_inputs(&self, window: usize, s: &mut Scratch<T>) {
        let d = &self.d;
        for side in 0..2 {
            if side == 1 && d.pairing == Pairing::Channel {
                break;
            }
            let planes = self.lanes(self.x, window, |p| d.pair_input(p, side));
            gather(d, &mut s.x[side], d.pw() + 1, planes);
        }
    }

    /// The padded input grid of side `side` of the pairs gathered into `x`.
    fn pair_input<'s>(&self, x: &'s [Vec<Lanes<T>>; 2], side: usize) -> &'s [Lanes<T>] {
        match self.d.pairing {
            Pairing::Channel => &x[0],
            Pairing::Official => &x[side],
        }
    }

    /// Runs `job` for window `window`, in AVX2 vectors where the CPU has them (the same
    /// operations on every lane, so the same results).
    fn run(&self, window: usize, job: Job<T>, s: &mut Scratch<T>) {
        /// # Safety
        /// AVX2.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        unsafe fn avx2<T: Real>(ctx: &Ctx<T>, window: usize, job: Job<T>, s: &mut Scratch<T>) {
            ctx.job(window, job, s)
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is available.
            return unsafe { avx2(self, window, job, s) };
        }
        self.job(window, job, s)
    }

    #[inline(always)]
    fn job(&self, window: usize, job: Job<T>, s: &mut Scratch<T>) {
        let d = &self.d;
        match job {
            Job::Forward(out) => {
                self.forward(window, s);
                scatter(d, &s.dy[0], 0, out);
            }
            Job::Backward(dx) => {
                self.pair_grads(window, s);
                self.input_grads(window, s, dx);
            }
            Job::Pairs([dy0, dy1]) => {
                self.pair_grads(window, s);
                scatter(d, &s.dy[0], 0, dy0);
                scatter(d, &s.dy[1], 0, dy1);
            }
            Job::Inputs(dx) => {
                let own = self.lanes(self.x, window, |p| p);
                gather(d, &mut s.x[0], d.pw() + 1, own);
                for side in 0..2 {
                    // Map `2k + side` of input plane `(img, k)` belongs to the pair of output
                    // channel `ch`, on side `at`.
                    let owner = |l: usize| {
                        let p = d.plane_of(window, l)?;
                        let (img, k) = (p / d.c, p % d.c);
                        let (ch, at) = d.pairing.owner(2 * k + side, d.c);
                        Some(&self.dys[at][(img * d.c + ch) * d.plane()..][..d.plane()])
                    };
                    gather(d, &mut s.dy[side], 0, owner);
                }
                self.input_grads(window, s, dx);
            }
        }
    }

    /// The forward pass of window `window`: `+1` where `beta*y_a1 - beta*y_a0 > 0`, `-1`
    /// elsewhere, into the wide grid `s.dy[0]`.
    #[inline(always)]
    fn forward(&self, window: usize, s: &mut Scratch<T>) {
        let (d, t) = (&self.d, &self.tables);
        let ph = window % d.period();
        self.gather_pair_inputs(window, s);
        let [b0, b1] = [&t.pair_bias[0][ph], &t.pair_bias[1][ph]];
        let xs = [self.pair_input(&s.x, 0), self.pair_input(&s.x, 1)];
        let ks = [&t.pair_taps[0][ph], &t.pair_taps[1][ph]];
        let (plus, minus) = (T::one(), -T::one());
        for os in &self.pixels {
            let [u, v] = sums(&self.taps, ks, xs, os);
            for p in 0..P {
                let mut out = [T::zero(); L];
                for l in 0..L {
                    let diff = t.beta * (v[p][l] + b1[l]) - t.beta * (u[p][l] + b0[l]);
                    out[l] = if diff > T::zero() { plus } else { minus };
                }
                s.dy[0][os[p]] = out;
            }
        }
    }

    /// The first half of the backward pass for the pairs of window `window`: recomputes `d`,
    /// writes the wide gradients of the two maps into `s.dy`, and adds the bias and beta
    /// gradients to `s.grads`.
    #[inline(always)]
    fn pair_grads(&self, window: usize, s: &mut Scratch<T>) {
        let (d, t) = (&self.d, &self.tables);
        let ph = window % d.period();
        self.gather_pair_inputs(window, s);
        gather(d, &mut s.g, 0, self.lanes(self.g, window, |p| p));
        let [b0, b1] = [&t.pair_bias[0][ph], &t.pair_bias[1][ph]];
        let (mut db1, mut dbeta) = ([T::zero(); L], [T::zero(); L]);
        let beta = t.beta;
        let xs = [self.pair_input(&s.x, 0), self.pair_input(&s.x, 1)];
        let ks = [&t.pair_taps[0][ph], &t.pair_taps[1][ph]];
        for os in &self.pixels {
            let [u, v] = sums(&self.taps, ks, xs, os);
            for p in 0..P {
                let (mut y0, mut y1, mut diff) = ([T::zero(); L], [T::zero(); L], [T::zero(); L]);
                for l in 0..L {
                    (y0[l], y1[l]) = (u[p][l] + b0[l], v[p][l] + b1[l]);
                    diff[l] = beta * y1[l] - beta * y0[l];
                }
                let (slope, g) = (T::slopes(diff), s.g[os[p]]);
                let mut dy = [T::zero(); L];
                for l in 0..L {
                    let gd = g[l] * slope[l];
                    dy[l] = beta * gd;
                    db1[l] += dy[l];
                    dbeta[l] += gd * (y1[l] - y0[l]);
                }
                s.dy[0][os[p]] = dy.map(|v| -v);
                s.dy[1][os[p]] = dy;
            }
        }
        let lanes = (0..L).filter(|&l| d.plane_of(window, l).is_some()).count();
        let [bias0, bias1] = &mut s.grads.bias[ph];
        add_lanes(bias0, &db1.map(|v| -v), lanes);
        add_lanes(bias1, &db1, lanes);
        s.grads.beta += dbeta[..lanes].iter().map(|v| v.to_f64()).sum::<f64>();
    }

    /// The second half of the backward pass for the input planes of window `window`: given
    /// their padded grid `s.x[0]` and the wide gradients `s.dy` of the maps `2k`, `2k + 1` they
    /// feed, writes the input gradients into `dx` and adds the kernel gradients to `s.grads`.
    #[inline(always)]
    fn input_grads(&self, window: usize, s: &mut Scratch<T>, dx: &mut [T]) {
        let (d, t) = (&self.d, &self.tables);
        let ph = window % d.period();
        let lanes = dx.len() / d.plane();
        let (x, [dy0, dy1], dxp) = (&s.x[0], &s.dy, &mut s.dx);
        dxp.fill([T::zero(); L]);
        for (tap, offset) in self.taps.iter() {
            let (k0, k1) = (&t.input_taps[0][ph][tap], &t.input_taps[1][ph][tap]);
            let (mut g0, mut g1) = ([[T::zero(); L]; P], [[T::zero(); L]; P]);
            for os in &self.pixels {
                for p in 0..P {
                    // Whole lanes in and out, so that the lane loop vectorises.
                    let o = os[p];
                    let (u, v, xv, mut dxv) = (dy0[o], dy1[o], x[o + offset], dxp[o + offset]);
                    for l in 0..L {
                        dxv[l] += k0[l] * u[l] + k1[l] * v[l];
                        g0[p][l] += u[l] * xv[l];
                        g1[p][l] += v[l] * xv[l];
                    }
                    dxp[o + offset] = dxv;
                }
            }
            let total = |g: [Lanes<T>; P]| -> Lanes<T> {
                std::array::from_fn(|l| g.iter().fold(T::zero(), |sum, v| sum + v[l]))
            };
            let kernel = &mut s.grads.kernel[ph];
            add_lanes(&mut kernel[tap], &total(g0), lanes);
            add_lanes(&mut kernel[9 + tap], &total(g1), lanes);
        }
        scatter(d, dxp, d.pw() + 1, dx);
    }

    /// Runs `jobs` (one per window, in window order) in parallel and returns the summed
    /// parameter gradients (none in the forward pass, which has no output gradient).
    fn sweep<'o>(
        &self,
        jobs: impl IndexedParallelIterator<Item = Job<'o, T>>,
        per_pixel: usize,
    ) -> ParamGrads
    where
        T: 'o,
    {
        let d = &self.d;
        let grads = !self.g.is_empty();
        jobs.with_min_len(d.min_len(per_pixel))
            .enumerate()
            .fold(
                || Scratch::new(d, grads),
                |mut s, (window, job)| {
                    self.run(window, job, &mut s);
                    s
                },
            )
            .map(|s| s.grads)
            .reduce(ParamGrads::default, ParamGrads::merge)
    }
}

/// The forward pass: `+1` where `beta*y_a1 - beta*y_a0 > 0`, `-1` elsewhere.
fn forward<T: Real>(d: &Dims, x: &[T], params: &[T]) -> Vec<T> {
    let mut out = vec![T::zero(); d.n * d.c * d.plane()];
    if d.is_empty() {
        return out;
    }
    let ctx = Ctx::new(d, params, x, &[]);
    ctx.sweep(out.par_chunks_mut(L * d.plane()).map(Job::Forward), 18);
    out
}

/// The backward pass: the input gradient (`n*c*h*w`) followed by the parameter gradients.
fn backward<T: Real>(d: &Dims, x: &[T], params: &[T], g: &[T]) -> Vec<T> {
    let nx = d.n * d.c * d.plane();
    let mut out = vec![T::zero(); nx + d.params()];
    if d.is_empty() {
        return out;
    }
    let (dx, dparams) = out.split_at_mut(nx);
    let window = L * d.plane();
    let ctx = Ctx::new(d, params, x, g);
    let grads = match d.pairing {
        Pairing::Channel => ctx.sweep(dx.par_chunks_mut(window).map(Job::Backward), 54),
        Pairing::Official => {
            let mut dys = vec![T::zero(); 2 * nx];
            let (dy0, dy1) = dys.split_at_mut(nx);
            let pairs = dy0.par_chunks_mut(window).zip(dy1.par_chunks_mut(window));
            let first = ctx.sweep(pairs.map(|(a, b)| Job::Pairs([a, b])), 18);
            let (dy0, dy1) = dys.split_at(nx);
            let ctx = Ctx {
                dys: [dy0, dy1],
                ..ctx
            };
            first.merge(ctx.sweep(dx.par_chunks_mut(window).map(Job::Inputs), 36))
        }
    };
    grads.write(d, dparams);
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let d = &self.0;
        let out = gpu::forward(self.name(), d, (s1, l1), (s2, l2))?;
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let d = &self.0;
        let out = gpu::backward(self.name(), d, (s1, l1), (s2, l2), (s3, l3))?;
        Ok((out, Shape::from(d.n * d.c * d.plane() + d.params())))
    }
}

/// The GPU passes (`kernels/cuda/lab.cu`).
#[cfg(feature = "cuda")]
mod gpu {
    use super::{Dims, Pairing};
    use crate::cuda::{by_dtype, elementwise, launch, view, zeros, Real, BLOCK, LAB};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig};
    use candle_core::cuda_backend::CudaStorage;
    use candle_core::{Layout, Result};

    /// `struct Lab` of `lab.cu`.
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Shape {
        n: i64,
        c: i64,
        h: i64,
        w: i64,
        pairing: i32,
    }

    // SAFETY: plain data, laid out as the kernel's `struct Lab`.
    unsafe impl DeviceRepr for Shape {}

    impl Shape {
        fn new(d: &Dims) -> Self {
            Shape {
                n: d.n as i64,
                c: d.c as i64,
                h: d.h as i64,
                w: d.w as i64,
                pairing: match d.pairing {
                    Pairing::Channel => 0,
                    Pairing::Official => 1,
                },
            }
        }
    }

    /// Slices of a channel's `N*H*W` pixels for the reducing kernels: enough blocks to fill
    /// the GPU, each with at least 16 pixels a thread, at most 64.
    fn slices(d: &Dims) -> usize {
        (d.n * d.plane()).div_ceil(16 * BLOCK as usize).clamp(1, 64)
    }

    /// A launch of `(x, y)` blocks of `BLOCK` threads.
    fn grid(x: usize, y: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (x as u32, y as u32, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn check(op: &str, d: &Dims) -> Result<()> {
        if 2 * d.c > 65535 {
            candle_core::bail!("{op}: at most 32767 channels on the GPU, found {}", d.c);
        }
        Ok(())
    }

    pub(super) fn forward(
        op: &str,
        d: &Dims,
        (s1, l1): (&CudaStorage, &Layout),
        (s2, l2): (&CudaStorage, &Layout),
    ) -> Result<CudaStorage> {
        fn run<T: Real>(
            op: &str,
            d: &Dims,
            (s1, l1): (&CudaStorage, &Layout),
            (s2, l2): (&CudaStorage, &Layout),
        ) -> Result<CudaStorage> {
            let dev = s1.device();
            let (x, params) = (view::<T>(op, s1, l1)?, view::<T>(op, s2, l2)?);
            let n = d.n * d.c * d.plane();
            let mut out = zeros::<T>(dev, n)?;
            if n > 0 {
                let shape = Shape::new(d);
                // SAFETY: `lab_forward(Lab, const T* x, const T* params, T* out)`; `x` and
                // `out` hold N*C*H*W values, `params` 20C + 1.
                launch!(dev, LAB, &T::kernel("lab_forward"), elementwise(n);
                    &shape, &x, &params, &mut out);
            }
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }
        check(op, d)?;
        by_dtype!(op, s1, run(op, d, (s1, l1), (s2, l2)))
    }

    pub(super) fn backward(
        op: &str,
        d: &Dims,
        (s1, l1): (&CudaStorage, &Layout),
        (s2, l2): (&CudaStorage, &Layout),
        (s3, l3): (&CudaStorage, &Layout),
    ) -> Result<CudaStorage> {
        fn run<T: Real>(
            op: &str,
            d: &Dims,
            (s1, l1): (&CudaStorage, &Layout),
            (s2, l2): (&CudaStorage, &Layout),
            (s3, l3): (&CudaStorage, &Layout),
        ) -> Result<CudaStorage> {
            let dev = s1.device();
            let (x, params, g) = (
                view::<T>(op, s1, l1)?,
                view::<T>(op, s2, l2)?,
                view::<T>(op, s3, l3)?,
            );
            let nx = d.n * d.c * d.plane();
            let mut out = zeros::<T>(dev, nx + d.params())?;
            if nx == 0 {
                return Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()));
            }
            let (shape, slices) = (Shape::new(d), slices(d));
            let mut dy0 = zeros::<T>(dev, nx)?;
            let mut dy1 = zeros::<T>(dev, nx)?;
            let mut partial = zeros::<f64>(dev, 20 * d.c * slices)?;
            // SAFETY (all four): the signatures of `lab.cu`; `x`, `g`, `dy0`, `dy1` and the
            // input gradient hold N*C*H*W values, `params` 20C + 1, the parameter gradients
            // 20C + 1, `partial` 20C rows of `slices` (the grid's x dimension).
            launch!(dev, LAB, &T::kernel("lab_map_grads"), grid(slices, d.c);
                &shape, &x, &params, &g, &mut dy0, &mut dy1, &mut partial);
            {
                let mut dx = out.slice_mut(..nx);
                launch!(dev, LAB, &T::kernel("lab_input_grad"), elementwise(nx);
                    &shape, &params, &dy0, &dy1, &mut dx);
            }
            launch!(dev, LAB, &T::kernel("lab_kernel_grads"), grid(slices, 2 * d.c);
                &shape, &x, &dy0, &dy1, &mut partial);
            {
                let (mut dparams, slices) = (out.slice_mut(nx..), slices as i64);
                launch!(dev, LAB, &T::kernel("lab_finish"), grid(1, 1);
                    &shape, &partial, &slices, &mut dparams);
            }
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }
        check(op, d)?;
        by_dtype!(op, s1, run(op, d, (s1, l1), (s2, l2), (s3, l3)))
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
                for c in [1, 2, 3, 5, 11] {
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
        for dims in [
            (2, 3, 3, 5),
            (1, 5, 2, 9),
            (3, 1, 1, 1),
            (1, 2, 7, 7),
            (1, 9, 2, 3),
        ] {
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
    fn exp_is_within_an_epsilon_of_the_f64_one() {
        for i in 0..=1_000_000 {
            let x = -87.0 * i as f32 / 1e6;
            let (ours, exact) = (exp_nonpositive(x) as f64, (x as f64).exp());
            // 0.83 epsilons at worst; a degree-6 polynomial would reach 2.1.
            let tol = f32::EPSILON as f64 * exact;
            assert!(
                (ours - exact).abs() <= tol,
                "exp({x}): {ours:e} vs {exact:e}"
            );
        }
        let floor = exp_nonpositive(-87.0);
        for x in [-87.5, -100.0, -1e30, f32::NEG_INFINITY] {
            assert_eq!(exp_nonpositive(x), floor);
        }
        assert_eq!(f32::slopes([0.0; L]), [0.5; L]);
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

//! Tests of every layer in `zoo::layers` (and the kernels in `zoo_kernels`) against independent
//! references written as plain loops over `Vec<f64>`.
//!
//! Forward values and shapes are compared with naive references; every custom gradient is
//! compared either with a hand-derived formula or with central finite differences in f64 (of a
//! smooth surrogate where the forward pass is a step function). Gradients come from candle's
//! autograd: the loss is `sum(g * layer(x))` for a fixed random `g`, and the weights are `Var`s
//! placed in a `VarMap` before the layer is built, so that the layer reads exactly those `Var`s.
//!
//! Semantics follow Larq/Keras (see `shared/reference/architectures.md`): TensorFlow SAME
//! padding with the smaller half before, `sign(0) = +1`, binarize-then-pad in `QuantConv2D`,
//! Keras batch-norm momentum and epsilon, max-pool gradient to the first maximum.

// The naive references index several arrays with the same loop counters.
#![allow(clippy::needless_range_loop)]

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use zoo::layers::{
    self, approx_sign, ste_sign, swish_sign, BatchNorm, Bias, Binarizer, Dense, DepthwiseConv2d,
    Lab, PRelu, QuantConv2d,
};
use zoo::spec::{
    self, Activation, BatchNorm as BnConfig, BlurPool, Conv, Dense as DenseConfig, DepthwiseConv,
    FeatureShape, Init, KernelQuantizer, LabPairing, PRelu as PReluConfig, Padding, Pool, Units,
};

type Result<T = ()> = candle_core::Result<T>;
/// `(N, C, H, W)`.
type Dims = (usize, usize, usize, usize);

// ------------------------------------------------------------------------------------------
// Helpers: random data, tensors, comparisons, finite differences, weights.
// ------------------------------------------------------------------------------------------

fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

fn uniform(rng: &mut StdRng, len: usize, lo: f64, hi: f64) -> Vec<f64> {
    (0..len).map(|_| rng.random_range(lo..hi)).collect()
}

/// Overwrites evenly spread entries of `v` with `specials` (exact boundary values).
fn plant(v: &mut [f64], specials: &[f64]) {
    let step = v.len() / specials.len();
    assert!(step > 0, "too many special values for {} entries", v.len());
    for (i, &s) in specials.iter().enumerate() {
        v[i * step + step / 2] = s;
    }
}

fn numel((n, c, h, w): Dims) -> usize {
    n * c * h * w
}

fn tensor(data: &[f64], shape: impl Into<Shape>) -> Tensor {
    Tensor::from_slice(data, shape.into(), &Device::Cpu).expect("tensor")
}

fn var(data: &[f64], shape: impl Into<Shape>) -> Var {
    Var::from_slice(data, shape, &Device::Cpu).expect("var")
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .expect("tensor values")
}

fn feature(channels: usize, height: usize, width: usize) -> FeatureShape {
    FeatureShape {
        channels,
        height,
        width,
        binary: false,
    }
}

/// Gradients of `sum(g * y)`.
fn backward(y: &Tensor, g: &[f64]) -> Result<GradStore> {
    let g = Tensor::from_slice(g, y.shape(), y.device())?.to_dtype(y.dtype())?;
    y.mul(&g)?.sum_all()?.backward()
}

fn grad(grads: &GradStore, v: &Var) -> Vec<f64> {
    values(
        grads
            .get(v.as_tensor())
            .expect("the variable received no gradient"),
    )
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Asserts `|actual - expected| <= atol + rtol * |expected|` elementwise (NaN fails).
#[track_caller]
fn assert_close(actual: &[f64], expected: &[f64], rtol: f64, atol: f64, what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: lengths differ");
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let ok = (a - e).abs() <= atol + rtol * e.abs();
        assert!(
            ok,
            "{what}[{i}]: got {a:e}, expected {e:e} (diff {:e})",
            a - e
        );
    }
}

/// Asserts bitwise-equal numbers up to the sign of zero.
#[track_caller]
fn assert_exact(actual: &[f64], expected: &[f64], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: lengths differ");
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        assert!(a == e, "{what}[{i}]: got {a:e}, expected exactly {e:e}");
    }
}

/// Relative tolerance for results that differ from the reference only by summation order.
const EXACT: f64 = 1e-12;
/// Relative tolerance for comparisons with finite differences.
const FD_RTOL: f64 = 1e-6;
const FD_ATOL: f64 = 1e-8;

/// Central differences of `f` at `x`, in f64.
fn numeric_gradient(x: &[f64], f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut p = x.to_vec();
    (0..x.len())
        .map(|i| {
            let h = 1e-5 * x[i].abs().max(1.0);
            let (up, down) = (x[i] + h, x[i] - h);
            p[i] = up;
            let fu = f(&p);
            p[i] = down;
            let fd = f(&p);
            p[i] = x[i];
            (fu - fd) / (up - down)
        })
        .collect()
}

/// Larq's sign, restated: `+1` for `x >= 0` (`-0.0` included), `-1` otherwise.
fn sign(v: f64) -> f64 {
    if v >= 0.0 {
        1.0
    } else {
        -1.0
    }
}

/// A `VarMap` whose tensors are set before a layer is built from it.
struct Weights(VarMap);

impl Weights {
    fn new() -> Self {
        Weights(VarMap::new())
    }

    /// Stores `data` as the `Var` called `name` and returns it.
    fn set(&self, name: &str, data: &[f64], shape: impl Into<Shape>) -> Var {
        let v = var(data, shape);
        self.0
            .data()
            .lock()
            .unwrap()
            .insert(name.to_string(), v.clone());
        v
    }

    /// The current value of `name`, if the map holds it.
    fn get(&self, name: &str) -> Option<(Vec<usize>, Vec<f64>)> {
        let data = self.0.data().lock().unwrap();
        data.get(name)
            .map(|v| (v.dims().to_vec(), values(v.as_tensor())))
    }

    fn vb(&self) -> VarBuilder<'static> {
        VarBuilder::from_varmap(&self.0, DType::F64, &Device::Cpu)
    }
}

// ------------------------------------------------------------------------------------------
// Naive references.
// ------------------------------------------------------------------------------------------

/// TensorFlow's SAME padding of one dimension, `(before, after)`, restated from its definition.
fn tf_same(size: usize, kernel: usize, stride: usize) -> (usize, usize) {
    let out = size.div_ceil(stride);
    let needed = (out as i64 - 1) * stride as i64 + kernel as i64 - size as i64;
    let total = needed.max(0) as usize;
    (total / 2, total - total / 2)
}

/// `[top, bottom, left, right]` for a window on an `h x w` input.
fn tf_pads(h: usize, w: usize, kernel: [usize; 2], stride: [usize; 2], p: Padding) -> [usize; 4] {
    match p {
        Padding::Valid => [0; 4],
        Padding::Same => {
            let (t, b) = tf_same(h, kernel[0], stride[0]);
            let (l, r) = tf_same(w, kernel[1], stride[1]);
            [t, b, l, r]
        }
    }
}

/// The window of a convolution or pooling, with explicit padding.
#[derive(Clone, Copy, Debug)]
struct Geom {
    kernel: [usize; 2],
    stride: [usize; 2],
    /// `[top, bottom, left, right]`.
    pads: [usize; 4],
    /// Convolution groups: 1 for a full convolution, C for a depthwise one.
    groups: usize,
    /// The value of padded cells.
    pad_value: f64,
}

impl Geom {
    fn new(kernel: [usize; 2], stride: [usize; 2], pads: [usize; 4]) -> Self {
        Geom {
            kernel,
            stride,
            pads,
            groups: 1,
            pad_value: 0.0,
        }
    }

    fn out_hw(&self, h: usize, w: usize) -> (usize, usize) {
        let [t, b, l, r] = self.pads;
        (
            (h + t + b - self.kernel[0]) / self.stride[0] + 1,
            (w + l + r - self.kernel[1]) / self.stride[1] + 1,
        )
    }

    /// The image pixel behind padded position `(py, px)`, `None` in the padding.
    fn source(&self, py: usize, px: usize, h: usize, w: usize) -> Option<(usize, usize)> {
        let iy = py.checked_sub(self.pads[0])?;
        let ix = px.checked_sub(self.pads[2])?;
        (iy < h && ix < w).then_some((iy, ix))
    }
}

/// Grouped 2D cross-correlation of `x` (`d`) with `k` (`out_c x C/groups x kh x kw`); output
/// channel `o` reads the input channels of group `o / (out_c / groups)`.
fn naive_conv(x: &[f64], d: Dims, k: &[f64], out_c: usize, g: &Geom) -> (Vec<f64>, Dims) {
    let (n, c, h, w) = d;
    let (oh, ow) = g.out_hw(h, w);
    let [kh, kw] = g.kernel;
    let (cin, cout) = (c / g.groups, out_c / g.groups);
    assert_eq!(k.len(), out_c * cin * kh * kw, "kernel size");
    let mut y = vec![0.0; n * out_c * oh * ow];
    for b in 0..n {
        for o in 0..out_c {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = 0.0;
                    for ci in 0..cin {
                        let ic = (o / cout) * cin + ci;
                        for ki in 0..kh {
                            for kj in 0..kw {
                                let py = oy * g.stride[0] + ki;
                                let px = ox * g.stride[1] + kj;
                                let v = match g.source(py, px, h, w) {
                                    Some((iy, ix)) => x[((b * c + ic) * h + iy) * w + ix],
                                    None => g.pad_value,
                                };
                                acc += v * k[((o * cin + ci) * kh + ki) * kw + kj];
                            }
                        }
                    }
                    y[((b * out_c + o) * oh + oy) * ow + ox] = acc;
                }
            }
        }
    }
    (y, (n, out_c, oh, ow))
}

/// Hand-derived gradients of `sum(gy * naive_conv(x, k))` with respect to `x` and `k`
/// (padded cells carry no gradient to `x` but contribute `pad_value` to `k`).
fn naive_conv_backward(
    x: &[f64],
    d: Dims,
    k: &[f64],
    out_c: usize,
    g: &Geom,
    gy: &[f64],
) -> (Vec<f64>, Vec<f64>) {
    let (n, c, h, w) = d;
    let (oh, ow) = g.out_hw(h, w);
    let [kh, kw] = g.kernel;
    let (cin, cout) = (c / g.groups, out_c / g.groups);
    let mut dx = vec![0.0; x.len()];
    let mut dk = vec![0.0; k.len()];
    for b in 0..n {
        for o in 0..out_c {
            for oy in 0..oh {
                for ox in 0..ow {
                    let go = gy[((b * out_c + o) * oh + oy) * ow + ox];
                    for ci in 0..cin {
                        let ic = (o / cout) * cin + ci;
                        for ki in 0..kh {
                            for kj in 0..kw {
                                let ik = ((o * cin + ci) * kh + ki) * kw + kj;
                                let py = oy * g.stride[0] + ki;
                                let px = ox * g.stride[1] + kj;
                                match g.source(py, px, h, w) {
                                    Some((iy, ix)) => {
                                        let i = ((b * c + ic) * h + iy) * w + ix;
                                        dx[i] += go * k[ik];
                                        dk[ik] += go * x[i];
                                    }
                                    None => dk[ik] += go * g.pad_value,
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    (dx, dk)
}

/// Adds a per-channel bias to an `N x C x H x W` buffer.
fn add_bias(y: &mut [f64], (n, c, h, w): Dims, bias: &[f64]) {
    for b in 0..n {
        for ch in 0..c {
            for p in 0..h * w {
                y[(b * c + ch) * h * w + p] += bias[ch];
            }
        }
    }
}

/// Per-channel sums over N, H and W.
fn channel_sums(y: &[f64], (n, c, h, w): Dims) -> Vec<f64> {
    let mut s = vec![0.0; c];
    for b in 0..n {
        for ch in 0..c {
            for p in 0..h * w {
                s[ch] += y[(b * c + ch) * h * w + p];
            }
        }
    }
    s
}

/// LAB's scaled scores `(beta*y0, beta*y1)` (each `N x C x H x W`) from the naive depthwise
/// convolution (3x3, stride 1, SAME zeros, multiplier 2) plus bias.
fn lab_reference(
    x: &[f64],
    d: Dims,
    w: &[f64],
    b: &[f64],
    beta: f64,
    pairing: LabPairing,
) -> (Vec<f64>, Vec<f64>) {
    let (n, c, h, wd) = d;
    let mut geom = Geom::new([3, 3], [1, 1], [1, 1, 1, 1]);
    geom.groups = c;
    let (out, od) = naive_conv(x, d, w, 2 * c, &geom);
    assert_eq!(od, (n, 2 * c, h, wd));
    let hw = h * wd;
    let mut y0 = vec![0.0; n * c * hw];
    let mut y1 = vec![0.0; n * c * hw];
    for s in 0..n {
        for ch in 0..c {
            let (c0, c1) = match pairing {
                LabPairing::Channel => (2 * ch, 2 * ch + 1),
                LabPairing::Official => (ch, c + ch),
            };
            for p in 0..hw {
                let i = (s * c + ch) * hw + p;
                y0[i] = beta * (out[(s * 2 * c + c0) * hw + p] + b[c0]);
                y1[i] = beta * (out[(s * 2 * c + c1) * hw + p] + b[c1]);
            }
        }
    }
    (y0, y1)
}

/// LAB's forward output: `+1` where `y1 > y0`, else `-1`.
fn lab_hard(y0: &[f64], y1: &[f64]) -> Vec<f64> {
    y0.iter()
        .zip(y1)
        .map(|(a, b)| if b > a { 1.0 } else { -1.0 })
        .collect()
}

/// LAB's smooth surrogate `tanh((y1 - y0) / 2)`.
fn lab_soft(y0: &[f64], y1: &[f64]) -> Vec<f64> {
    y0.iter()
        .zip(y1)
        .map(|(a, b)| ((b - a) / 2.0).tanh())
        .collect()
}

/// Per output channel means of `|w|` for a kernel with `o` output channels (the leading axis).
fn channel_mean_abs(w: &[f64], o: usize) -> Vec<f64> {
    w.chunks(w.len() / o)
        .map(|ch| ch.iter().map(|v| v.abs()).sum::<f64>() / ch.len() as f64)
        .collect()
}

/// The effective kernel of a quantizer, restated.
fn quantize_reference(w: &[f64], o: usize, q: KernelQuantizer) -> Vec<f64> {
    let per = w.len() / o;
    match q {
        KernelQuantizer::None => w.to_vec(),
        KernelQuantizer::SteSign { .. } => w.iter().map(|&v| sign(v)).collect(),
        KernelQuantizer::MagnitudeAwareSign { .. } => {
            let a = channel_mean_abs(w, o);
            w.iter()
                .enumerate()
                .map(|(i, &v)| a[i / per] * sign(v))
                .collect()
        }
        KernelQuantizer::XnorWeightScale => {
            let clipped: Vec<f64> = w.iter().map(|v| v.clamp(-1.0, 1.0)).collect();
            let a = channel_mean_abs(&clipped, o);
            clipped
                .iter()
                .enumerate()
                .map(|(i, &v)| a[i / per] * sign(v))
                .collect()
        }
    }
}

/// Hand-derived `dL/dw` from `gq = dL/dq(w)` (Larq's gradients, TensorFlow's `clip_by_value`).
fn quantize_backward_reference(w: &[f64], o: usize, q: KernelQuantizer, gq: &[f64]) -> Vec<f64> {
    let per = w.len() / o;
    let inside = |v: f64, clip: f64| if v.abs() <= clip { 1.0 } else { 0.0 };
    match q {
        KernelQuantizer::None => gq.to_vec(),
        KernelQuantizer::SteSign { clip } => w
            .iter()
            .zip(gq)
            .map(|(&v, g)| g * inside(v, clip))
            .collect(),
        KernelQuantizer::MagnitudeAwareSign { clip } => {
            // The scale is a constant for the gradient.
            let a = channel_mean_abs(w, o);
            (0..w.len())
                .map(|i| a[i / per] * gq[i] * inside(w[i], clip))
                .collect()
        }
        KernelQuantizer::XnorWeightScale => {
            // q = alpha_o * sign(clip(w)), alpha_o = mean |clip(w)|; clip passes the gradient
            // inside [-1, 1] (bounds included), so both terms carry the mask:
            // dL/dw = 1{|w| <= 1} (alpha_o G + (sum_o G sign(w)) sign(w) / n).
            let clipped: Vec<f64> = w.iter().map(|v| v.clamp(-1.0, 1.0)).collect();
            let a = channel_mean_abs(&clipped, o);
            let s: Vec<f64> = (0..o)
                .map(|oc| {
                    (0..per)
                        .map(|j| gq[oc * per + j] * sign(w[oc * per + j]))
                        .sum()
                })
                .collect();
            (0..w.len())
                .map(|i| {
                    let oc = i / per;
                    inside(w[i], 1.0) * (a[oc] * gq[i] + s[oc] * sign(w[i]) / per as f64)
                })
                .collect()
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum PoolKind {
    Max,
    Avg,
}

/// TensorFlow pooling over the in-image cells of each window: the first maximum (row-major) or
/// the mean. Returns the output, its dims, and for each output the input index of the first
/// maximum (max) or the in-image cells (avg).
fn naive_pool(x: &[f64], d: Dims, g: &Geom, kind: PoolKind) -> (Vec<f64>, Dims, Vec<Vec<usize>>) {
    let (n, c, h, w) = d;
    let (oh, ow) = g.out_hw(h, w);
    let mut y = Vec::new();
    let mut sources = Vec::new();
    for plane in 0..n * c {
        for oy in 0..oh {
            for ox in 0..ow {
                let mut cells = Vec::new();
                for ki in 0..g.kernel[0] {
                    for kj in 0..g.kernel[1] {
                        let py = oy * g.stride[0] + ki;
                        let px = ox * g.stride[1] + kj;
                        if let Some((iy, ix)) = g.source(py, px, h, w) {
                            cells.push((plane * h + iy) * w + ix);
                        }
                    }
                }
                assert!(!cells.is_empty(), "a window entirely in the padding");
                match kind {
                    PoolKind::Max => {
                        let mut best = cells[0];
                        for &i in &cells[1..] {
                            if x[i] > x[best] {
                                best = i;
                            }
                        }
                        y.push(x[best]);
                        sources.push(vec![best]);
                    }
                    PoolKind::Avg => {
                        let sum: f64 = cells.iter().map(|&i| x[i]).sum();
                        y.push(sum / cells.len() as f64);
                        sources.push(cells);
                    }
                }
            }
        }
    }
    (y, (n, c, oh, ow), sources)
}

// ------------------------------------------------------------------------------------------
// 1. zoo_kernels::sign
// ------------------------------------------------------------------------------------------

#[test]
fn sign_kernel_is_plus_one_from_zero_up_in_f64_and_f32() -> Result {
    let xs = [
        -3.5,
        -1.0,
        -1e-300,
        -f64::MIN_POSITIVE / 4.0, // subnormal
        -0.0,
        0.0,
        f64::MIN_POSITIVE / 4.0,
        1e-300,
        2.0,
        f64::NEG_INFINITY,
        f64::INFINITY,
        f64::MIN,
        f64::MAX,
    ];
    let expected = [
        -1.0, -1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 1.0, -1.0, 1.0, -1.0, 1.0,
    ];
    let s = zoo_kernels::sign(&Tensor::new(&xs[..], &Device::Cpu)?)?;
    assert_eq!(s.dtype(), DType::F64);
    assert_exact(&s.to_vec1::<f64>()?, &expected, "sign f64");

    let xs32 = [
        -3.5f32,
        -1e-40, // subnormal in f32
        -0.0,
        0.0,
        1e-40,
        f32::NEG_INFINITY,
        f32::INFINITY,
        7.0,
    ];
    let expected32 = [-1.0f32, -1.0, 1.0, 1.0, 1.0, -1.0, 1.0, 1.0];
    let s = zoo_kernels::sign(&Tensor::new(&xs32[..], &Device::Cpu)?)?;
    assert_eq!(s.dtype(), DType::F32);
    assert_eq!(s.to_vec1::<f32>()?, expected32);

    // A strided (transposed) input keeps its logical order.
    let m = Tensor::new(&[[-1.0f64, 0.0, 2.0], [3.0, -0.0, -4.0]], &Device::Cpu)?.t()?;
    let s = zoo_kernels::sign(&m)?;
    assert_eq!(
        s.to_vec2::<f64>()?,
        vec![vec![-1.0, 1.0], vec![1.0, 1.0], vec![1.0, -1.0]]
    );
    Ok(())
}

#[test]
fn sign_kernel_has_no_gradient() -> Result {
    let x = var(&[-0.5, 0.5], 2);
    let y = zoo_kernels::sign(x.as_tensor())?;
    let grads = y.sum_all()?.backward()?;
    assert!(grads.get(x.as_tensor()).is_none());
    Ok(())
}

// ------------------------------------------------------------------------------------------
// 2-3. Straight-through binarizers.
// ------------------------------------------------------------------------------------------

#[test]
fn straight_through_is_hard_forward_and_surrogate_backward() -> Result {
    let mut r = rng(1);
    let xs = uniform(&mut r, 6, -2.0, 2.0);
    let x = var(&xs, 6);
    let hard = x.as_tensor().sqr()?; // any tensor; detached inside
    let surrogate = x.as_tensor().affine(3.0, 0.0)?.sin()?;
    let y = layers::straight_through(&hard, &surrogate)?;
    let expected: Vec<f64> = xs.iter().map(|v| v * v).collect();
    assert_exact(&values(&y), &expected, "straight_through forward");
    let g = uniform(&mut r, 6, -1.0, 1.0);
    let grads = backward(&y, &g)?;
    let dx: Vec<f64> = (0..6).map(|i| g[i] * 3.0 * (3.0 * xs[i]).cos()).collect();
    assert_close(&grad(&grads, &x), &dx, EXACT, 0.0, "straight_through grad");
    Ok(())
}

#[test]
fn ste_sign_is_exact_sign_with_inclusive_clip_mask() -> Result {
    let mut r = rng(2);
    for clip in [1.0f64, 0.5, 1.3] {
        let mut xs = uniform(&mut r, 40, -2.0, 2.0);
        let above = f64::from_bits(clip.to_bits() + 1);
        let below = f64::from_bits(clip.to_bits() - 1);
        plant(
            &mut xs,
            &[clip, -clip, above, -above, below, -below, 0.0, -0.0],
        );
        let x = var(&xs, (2, 20));
        let y = ste_sign(x.as_tensor(), clip)?;
        let expected: Vec<f64> = xs.iter().map(|&v| sign(v)).collect();
        assert_exact(&values(&y), &expected, "ste_sign forward");
        let g = uniform(&mut r, 40, -1.0, 1.0);
        let grads = backward(&y, &g)?;
        let dx: Vec<f64> = (0..40)
            .map(|i| if xs[i].abs() <= clip { g[i] } else { 0.0 })
            .collect();
        assert_exact(
            &grad(&grads, &x),
            &dx,
            &format!("ste_sign grad, clip {clip}"),
        );
    }
    // f32: same forward and mask.
    let xs = [-1.5f32, -1.0, -0.25, -0.0, 0.0, 0.5, 1.0, 1.0000001];
    let x = Var::from_slice(&xs, 8, &Device::Cpu)?;
    let y = ste_sign(x.as_tensor(), 1.0)?;
    assert_eq!(y.dtype(), DType::F32);
    assert_eq!(
        y.to_vec1::<f32>()?,
        vec![-1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    );
    let grads = y.sum_all()?.backward()?;
    assert_eq!(
        grads.get(x.as_tensor()).unwrap().to_vec1::<f32>()?,
        vec![0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    );
    Ok(())
}

#[test]
fn approx_sign_gradient_is_two_minus_two_abs_inside_unit_interval() -> Result {
    let mut r = rng(3);
    let mut xs = uniform(&mut r, 48, -1.6, 1.6);
    plant(&mut xs, &[1.0, -1.0, 0.0, -0.0, 0.5, -0.75]);
    let x = var(&xs, (4, 12));
    let y = approx_sign(x.as_tensor())?;
    let expected: Vec<f64> = xs.iter().map(|&v| sign(v)).collect();
    assert_exact(&values(&y), &expected, "approx_sign forward");
    let g = uniform(&mut r, 48, -1.0, 1.0);
    let grads = backward(&y, &g)?;
    let dx: Vec<f64> = (0..48)
        .map(|i| {
            let a = xs[i].abs();
            if a <= 1.0 {
                g[i] * (2.0 - 2.0 * a)
            } else {
                0.0
            }
        })
        .collect();
    assert_close(&grad(&grads, &x), &dx, 1e-15, 0.0, "approx_sign grad");
    // The formula is the derivative of ApproxSign's polynomial 2x - x|x| (|x| <= 1).
    let poly = |v: f64| 2.0 * v - v * v.abs();
    // Away from the kinks at 0 and +-1.
    let inner: Vec<f64> = xs
        .iter()
        .copied()
        .filter(|v| (1e-3..0.99).contains(&v.abs()))
        .collect();
    for &v in &inner {
        let fd = numeric_gradient(&[v], |p| poly(p[0]))[0];
        assert_close(
            &[2.0 - 2.0 * v.abs()],
            &[fd],
            FD_RTOL,
            FD_ATOL,
            "ApproxSign",
        );
    }
    Ok(())
}

/// SwishSign's surrogate gradient, restated:
/// `beta (2 - beta x tanh(beta x / 2)) / (1 + cosh(beta x))`.
fn swish_slope(x: f64, beta: f64) -> f64 {
    beta * (2.0 - beta * x * (beta * x / 2.0).tanh()) / (1.0 + (beta * x).cosh())
}

#[test]
fn swish_sign_gradient_matches_its_formula_and_the_signswish_derivative() -> Result {
    let mut r = rng(4);
    for beta in [5.0, 1.7] {
        let mut xs = uniform(&mut r, 60, -3.0, 3.0);
        plant(&mut xs, &[0.0, -0.0, 30.0, -30.0, 100.0, -100.0]);
        let x = var(&xs, (3, 20));
        let y = swish_sign(x.as_tensor(), beta)?;
        let expected: Vec<f64> = xs.iter().map(|&v| sign(v)).collect();
        assert_exact(&values(&y), &expected, "swish_sign forward");
        let g = uniform(&mut r, 60, -1.0, 1.0);
        let grads = backward(&y, &g)?;
        let dx: Vec<f64> = (0..60).map(|i| g[i] * swish_slope(xs[i], beta)).collect();
        assert_close(&grad(&grads, &x), &dx, 1e-12, 1e-300, "swish_sign grad");

        // The formula is the derivative of SignSwish 2 s(bx) (1 + bx (1 - s(bx))) - 1.
        let sig = |z: f64| 1.0 / (1.0 + (-z).exp());
        let signswish =
            |v: f64| 2.0 * sig(beta * v) * (1.0 + beta * v * (1.0 - sig(beta * v))) - 1.0;
        for &v in xs.iter().filter(|v| v.abs() < 3.0) {
            let fd = numeric_gradient(&[v], |p| signswish(p[0]))[0];
            assert_close(
                &[swish_slope(v, beta)],
                &[fd],
                FD_RTOL,
                FD_ATOL,
                "SignSwish'",
            );
        }
    }
    Ok(())
}

#[test]
fn swish_sign_has_no_nan_where_cosh_overflows_in_f32() -> Result {
    let xs = [-100.0f32, -30.0, -17.9, -0.7, 0.0, 0.2, 17.9, 30.0, 100.0];
    let x = Var::from_slice(&xs, xs.len(), &Device::Cpu)?;
    let y = swish_sign(x.as_tensor(), 5.0)?;
    assert_eq!(
        y.to_vec1::<f32>()?,
        vec![-1.0, -1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    );
    let grads = y.sum_all()?.backward()?;
    let dx = grads.get(x.as_tensor()).unwrap().to_vec1::<f32>()?;
    for (i, (&d, &v)) in dx.iter().zip(&xs).enumerate() {
        assert!(d.is_finite(), "swish_sign f32 grad at {v} is {d}");
        let expected = swish_slope(v as f64, 5.0);
        assert!(
            (d as f64 - expected).abs() <= 1e-5 * expected.abs() + 1e-30,
            "swish_sign f32 grad[{i}] at {v}: {d} vs {expected}"
        );
    }
    Ok(())
}

#[test]
fn binarizers_give_plus_minus_one_on_infinite_input() -> Result {
    let x = Tensor::new(&[f64::NEG_INFINITY, f64::INFINITY], &Device::Cpu)?;
    let outputs = [
        ("ste_sign", values(&ste_sign(&x, 1.0)?)),
        ("approx_sign", values(&approx_sign(&x)?)),
        ("swish_sign", values(&swish_sign(&x, 5.0)?)),
    ];
    let wrong: Vec<_> = outputs.iter().filter(|(_, y)| y != &[-1.0, 1.0]).collect();
    assert!(
        wrong.is_empty(),
        "expected [-1, 1] for [-inf, inf]: {wrong:?}"
    );
    Ok(())
}

// ------------------------------------------------------------------------------------------
// 4. LAB
// ------------------------------------------------------------------------------------------

struct LabSetup {
    weights: Weights,
    w: Vec<f64>,
    b: Vec<f64>,
    beta: f64,
    vars: [Var; 3],
}

/// Random LAB tensors for `c` channels under `prefix` (`""` for the root).
fn lab_setup(r: &mut StdRng, c: usize, beta: f64, weights: Weights, prefix: &str) -> LabSetup {
    let w = uniform(r, 2 * c * 9, -1.0, 1.0);
    let b = uniform(r, 2 * c, -0.5, 0.5);
    let vars = [
        weights.set(&format!("{prefix}weight"), &w, (2 * c, 1, 3, 3)),
        weights.set(&format!("{prefix}bias"), &b, 2 * c),
        weights.set(&format!("{prefix}beta"), &[beta], 1),
    ];
    LabSetup {
        weights,
        w,
        b,
        beta,
        vars,
    }
}

const PAIRINGS: [LabPairing; 2] = [LabPairing::Channel, LabPairing::Official];

#[test]
fn lab_creates_its_tensors_with_keras_defaults() -> Result {
    let weights = Weights::new();
    let lab = Lab::new(weights.vb(), feature(3, 4, 4), LabPairing::Channel)?;
    let (shape, _) = weights.get("weight").expect("weight");
    assert_eq!(shape, vec![6, 1, 3, 3]);
    assert_eq!(weights.get("bias"), Some((vec![6], vec![0.0; 6])));
    assert_eq!(weights.get("beta"), Some((vec![1], vec![1.0])));
    let y = lab.forward(&Tensor::ones((1, 3, 4, 4), DType::F64, &Device::Cpu)?)?;
    assert!(values(&y).iter().all(|&v| v == 1.0 || v == -1.0));
    Ok(())
}

#[test]
fn lab_forward_matches_reference_for_both_pairings() -> Result {
    let mut r = rng(5);
    let mut near_ties = 0;
    for pairing in PAIRINGS {
        for c in 1..=3 {
            for beta in [0.7, -1.3] {
                let d = (2, c, 5, 7);
                let s = lab_setup(&mut r, c, beta, Weights::new(), "");
                let lab = Lab::new(s.weights.vb(), feature(c, 5, 7), pairing)?;
                let xs = uniform(&mut r, numel(d), -1.0, 1.0);
                let x = tensor(&xs, d);
                let (y0, y1) = lab_reference(&xs, d, &s.w, &s.b, beta, pairing);
                let (s0, s1) = lab.scores(&x)?;
                assert_eq!(s0.dims4()?, d);
                assert_close(&values(&s0), &y0, EXACT, 1e-14, "LAB beta*y0");
                assert_close(&values(&s1), &y1, EXACT, 1e-14, "LAB beta*y1");
                let out = values(&lab.forward(&x)?);
                let hard = lab_hard(&y0, &y1);
                for i in 0..out.len() {
                    if (y1[i] - y0[i]).abs() < 1e-12 {
                        near_ties += 1;
                        continue;
                    }
                    assert!(
                        out[i] == hard[i],
                        "LAB {pairing:?} C={c} beta={beta} [{i}]: {} vs {}",
                        out[i],
                        hard[i]
                    );
                }
            }
        }
    }
    assert_eq!(near_ties, 0, "random data should have no near ties");
    Ok(())
}

#[test]
fn lab_tie_gives_minus_one() -> Result {
    let mut r = rng(6);
    let (c, h, w) = (3, 4, 5);
    let d = (2, c, h, w);
    for beta in [1.0, -1.3, 0.0] {
        // Channel pairing: the two kernels and biases of each channel are identical.
        let weights = Weights::new();
        let k = uniform(&mut r, c * 9, -1.0, 1.0);
        let bb = uniform(&mut r, c, -0.5, 0.5);
        let mut w2 = Vec::new();
        let mut b2 = Vec::new();
        for ch in 0..c {
            for _ in 0..2 {
                w2.extend_from_slice(&k[ch * 9..(ch + 1) * 9]);
                b2.push(bb[ch]);
            }
        }
        weights.set("weight", &w2, (2 * c, 1, 3, 3));
        weights.set("bias", &b2, 2 * c);
        weights.set("beta", &[beta], 1);
        let lab = Lab::new(weights.vb(), feature(c, h, w), LabPairing::Channel)?;
        let x = tensor(&uniform(&mut r, numel(d), -1.0, 1.0), d);
        assert_exact(
            &values(&lab.forward(&x)?),
            &vec![-1.0; numel(d)],
            "LAB channel tie",
        );

        // Official pairing: all kernels and biases identical, all input channels identical.
        let weights = Weights::new();
        let k: Vec<f64> = uniform(&mut r, 9, -1.0, 1.0).repeat(2 * c);
        weights.set("weight", &k, (2 * c, 1, 3, 3));
        weights.set("bias", &[0.3; 6][..2 * c], 2 * c);
        weights.set("beta", &[beta], 1);
        let lab = Lab::new(weights.vb(), feature(c, h, w), LabPairing::Official)?;
        let plane = uniform(&mut r, h * w, -1.0, 1.0);
        let xs: Vec<f64> = plane.repeat(2 * c);
        assert_exact(
            &values(&lab.forward(&tensor(&xs, d))?),
            &vec![-1.0; numel(d)],
            "LAB official tie",
        );
    }
    Ok(())
}

#[test]
fn lab_gradients_match_finite_differences_of_the_tanh_surrogate() -> Result {
    let mut r = rng(7);
    for pairing in PAIRINGS {
        for c in 1..=3 {
            for beta in [0.7, -1.3] {
                let d = (2, c, 5, 7);
                let s = lab_setup(&mut r, c, beta, Weights::new(), "");
                let lab = Lab::new(s.weights.vb(), feature(c, 5, 7), pairing)?;
                let xs = uniform(&mut r, numel(d), -1.0, 1.0);
                let x = var(&xs, d);
                let y = lab.forward(x.as_tensor())?;
                let g = uniform(&mut r, numel(d), -1.0, 1.0);
                let grads = backward(&y, &g)?;
                let loss = |xs: &[f64], w: &[f64], b: &[f64], beta: f64| {
                    let (y0, y1) = lab_reference(xs, d, w, b, beta, pairing);
                    dot(&g, &lab_soft(&y0, &y1))
                };
                let what = |t: &str| format!("LAB d/d{t} ({pairing:?}, C={c}, beta={beta})");
                let fd_x = numeric_gradient(&xs, |p| loss(p, &s.w, &s.b, s.beta));
                assert_close(&grad(&grads, &x), &fd_x, FD_RTOL, FD_ATOL, &what("x"));
                let fd_w = numeric_gradient(&s.w, |p| loss(&xs, p, &s.b, s.beta));
                let [wv, bv, betav] = &s.vars;
                assert_close(&grad(&grads, wv), &fd_w, FD_RTOL, FD_ATOL, &what("w"));
                let fd_b = numeric_gradient(&s.b, |p| loss(&xs, &s.w, p, s.beta));
                assert_close(&grad(&grads, bv), &fd_b, FD_RTOL, FD_ATOL, &what("b"));
                let fd_beta = numeric_gradient(&[s.beta], |p| loss(&xs, &s.w, &s.b, p[0]));
                assert_close(
                    &grad(&grads, betav),
                    &fd_beta,
                    FD_RTOL,
                    FD_ATOL,
                    &what("beta"),
                );
            }
        }
    }
    Ok(())
}

#[test]
fn binarizer_dispatches_to_the_configured_binarizer() -> Result {
    let mut r = rng(8);
    let d = (1, 2, 3, 4);
    let xs = uniform(&mut r, numel(d), -1.5, 1.5);
    let x = tensor(&xs, d);
    let weights = Weights::new();
    let s = lab_setup(&mut r, 2, 0.9, weights, "lab.");
    let cases: Vec<(Activation, Tensor)> = vec![
        (Activation::None, x.clone()),
        (Activation::Sign { clip: 0.5 }, ste_sign(&x, 0.5)?),
        (Activation::ApproxSign, approx_sign(&x)?),
        (Activation::SwishSign { beta: 3.0 }, swish_sign(&x, 3.0)?),
    ];
    for (activation, expected) in cases {
        let b = Binarizer::new(s.weights.vb().pp("lab"), feature(2, 3, 4), &activation)?;
        assert_exact(
            &values(&b.forward(&x)?),
            &values(&expected),
            &format!("{activation:?}"),
        );
    }
    for pairing in PAIRINGS {
        let b = Binarizer::new(
            s.weights.vb().pp("lab"),
            feature(2, 3, 4),
            &Activation::Lab(pairing),
        )?;
        let (y0, y1) = lab_reference(&xs, d, &s.w, &s.b, s.beta, pairing);
        assert_exact(
            &values(&b.forward(&x)?),
            &lab_hard(&y0, &y1),
            "Binarizer::Lab",
        );
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// 5. QuantConv2d and quantize_kernel
// ------------------------------------------------------------------------------------------

#[test]
fn same_padding_is_tensorflow_same() {
    // (input, kernel, stride) -> (before, after), worked out by hand.
    let table = [
        ((6, 3, 2), (0, 1)),
        ((7, 3, 2), (1, 1)),
        ((5, 3, 1), (1, 1)),
        ((6, 1, 2), (0, 0)),
        ((5, 2, 1), (0, 1)),
        ((4, 4, 1), (1, 2)),
        ((224, 7, 2), (2, 3)),
        ((1, 3, 2), (1, 1)),
        ((8, 2, 2), (0, 0)),
    ];
    for ((i, k, s), expected) in table {
        assert_eq!(tf_same(i, k, s), expected, "reference {i} {k} {s}");
        assert_eq!(spec::same_padding(i, k, s), expected, "zoo {i} {k} {s}");
        assert_eq!(
            spec::output_size(i, k, s, Padding::Same),
            Some(i.div_ceil(s))
        );
    }
    assert_eq!(spec::output_size(6, 3, 2, Padding::Valid), Some(2));
    assert_eq!(spec::output_size(7, 3, 2, Padding::Valid), Some(3));
    assert_eq!(spec::output_size(2, 3, 1, Padding::Valid), None);
}

fn conv_config(
    filters: usize,
    kernel: [usize; 2],
    stride: usize,
    padding: Padding,
    pad_value: f64,
    input: Activation,
    kernel_quantizer: KernelQuantizer,
) -> Conv {
    Conv {
        filters,
        kernel,
        stride: [stride, stride],
        padding,
        pad_value,
        bias: true,
        init: Init::GlorotUniform,
        input,
        kernel_quantizer,
        weight_clip: None,
    }
}

/// The geometry a `QuantConv2d` uses on an `h x w` input.
fn conv_geom(cfg: &Conv, h: usize, w: usize) -> Geom {
    let mut g = Geom::new(
        cfg.kernel,
        cfg.stride,
        tf_pads(h, w, cfg.kernel, cfg.stride, cfg.padding),
    );
    g.pad_value = cfg.pad_value;
    g
}

/// The input binarizer of a convolution (LAB excluded) and its gradient factor.
fn binarize_reference(xs: &[f64], a: Activation) -> (Vec<f64>, Vec<f64>) {
    match a {
        Activation::None => (xs.to_vec(), vec![1.0; xs.len()]),
        Activation::Sign { clip } => (
            xs.iter().map(|&v| sign(v)).collect(),
            xs.iter()
                .map(|v| if v.abs() <= clip { 1.0 } else { 0.0 })
                .collect(),
        ),
        other => panic!("no reference for {other:?} here"),
    }
}

/// Builds a `QuantConv2d` on random data, checks its forward pass and the gradients of the input,
/// kernel and bias against the naive convolution and the hand-derived backward pass.
fn check_quant_conv(seed: u64, d: Dims, cfg: &Conv) -> Result {
    let mut r = rng(seed);
    let (_, c, h, w) = d;
    let what = format!("QuantConv2d {d:?} {cfg:?}");
    let [kh, kw] = cfg.kernel;
    let wd = (cfg.filters, c, kh, kw);
    let mut xs = uniform(&mut r, numel(d), -1.5, 1.5);
    let mut ws = uniform(&mut r, numel(wd), -1.5, 1.5);
    let mut specials = vec![0.0, -0.0, 1.0, -1.0];
    if let KernelQuantizer::SteSign { clip } | KernelQuantizer::MagnitudeAwareSign { clip } =
        cfg.kernel_quantizer
    {
        specials.extend([clip, -clip]);
    }
    if cfg.kernel_quantizer == KernelQuantizer::XnorWeightScale {
        // At w == 0 the gradient of |w| is ambiguous; see the dedicated test.
        specials.retain(|&v| v != 0.0);
    }
    plant(&mut ws, &specials);
    if let Activation::Sign { clip } = cfg.input {
        plant(&mut xs, &[clip, -clip, 0.0, -0.0, 2.0 * clip, -2.0 * clip]);
    }
    let bs = uniform(&mut r, cfg.filters, -0.5, 0.5);

    let weights = Weights::new();
    let wv = weights.set("weight", &ws, wd);
    let bv = cfg.bias.then(|| weights.set("bias", &bs, cfg.filters));
    let layer = QuantConv2d::new(weights.vb(), feature(c, h, w), cfg)?;
    assert_exact(&values(layer.weight()), &ws, "latent weight");

    let x = var(&xs, d);
    let y = layer.forward(x.as_tensor())?;

    let geom = conv_geom(cfg, h, w);
    let (xb, xmask) = binarize_reference(&xs, cfg.input);
    let q = quantize_reference(&ws, cfg.filters, cfg.kernel_quantizer);
    let (mut y_ref, yd) = naive_conv(&xb, d, &q, cfg.filters, &geom);
    if cfg.bias {
        add_bias(&mut y_ref, yd, &bs);
    }
    assert_eq!(y.dims4()?, yd, "{what}: output shape");
    assert_eq!(
        yd.2,
        spec::output_size(h, kh, cfg.stride[0], cfg.padding).unwrap()
    );
    assert_eq!(
        yd.3,
        spec::output_size(w, kw, cfg.stride[1], cfg.padding).unwrap()
    );
    assert_close(
        &values(&y),
        &y_ref,
        EXACT,
        1e-12,
        &format!("{what}: forward"),
    );

    let gy = uniform(&mut r, y_ref.len(), -1.0, 1.0);
    let grads = backward(&y, &gy)?;
    let (dxb, dq) = naive_conv_backward(&xb, d, &q, cfg.filters, &geom, &gy);
    let dx: Vec<f64> = dxb.iter().zip(&xmask).map(|(a, m)| a * m).collect();
    let dw = quantize_backward_reference(&ws, cfg.filters, cfg.kernel_quantizer, &dq);
    assert_close(
        &grad(&grads, &x),
        &dx,
        EXACT,
        1e-12,
        &format!("{what}: d/dx"),
    );
    assert_close(
        &grad(&grads, &wv),
        &dw,
        EXACT,
        1e-12,
        &format!("{what}: d/dw"),
    );
    if let Some(bv) = &bv {
        let db = channel_sums(&gy, yd);
        assert_close(
            &grad(&grads, bv),
            &db,
            EXACT,
            1e-12,
            &format!("{what}: d/db"),
        );
    }
    Ok(())
}

#[test]
fn quant_conv_same_padding_stride_two_even_input_pads_after() -> Result {
    // 6x6, 3x3, stride 2: TF pads 0 rows before and 1 after; with pad value 1 the last output
    // row and column see the padding, the first do not.
    let sign1 = Activation::Sign { clip: 1.0 };
    let ste = KernelQuantizer::SteSign { clip: 1.0 };
    for pad_value in [0.0, 1.0] {
        let cfg = conv_config(3, [3, 3], 2, Padding::Same, pad_value, sign1, ste);
        assert_eq!(conv_geom(&cfg, 6, 6).pads, [0, 1, 0, 1]);
        check_quant_conv(10, (2, 2, 6, 6), &cfg)?;
    }
    // With an all-ones kernel and input the padding is visible in the output directly.
    let mut cfg = conv_config(1, [3, 3], 2, Padding::Same, 0.0, sign1, ste);
    cfg.bias = false;
    let weights = Weights::new();
    weights.set("weight", &[0.5; 9], (1, 1, 3, 3));
    let layer = QuantConv2d::new(weights.vb(), feature(1, 6, 6), &cfg)?;
    let y = layer.forward(&Tensor::ones((1, 1, 6, 6), DType::F64, &Device::Cpu)?)?;
    assert_eq!(
        y.squeeze(0)?.squeeze(0)?.to_vec2::<f64>()?,
        vec![
            vec![9.0, 9.0, 6.0],
            vec![9.0, 9.0, 6.0],
            vec![6.0, 6.0, 4.0]
        ]
    );
    Ok(())
}

#[test]
fn quant_conv_forward_and_gradients_match_reference() -> Result {
    use KernelQuantizer as K;
    let sign = |clip| Activation::Sign { clip };
    let cases = [
        // Odd input, stride 2, symmetric SAME padding, pad value 1.
        (
            (2, 2, 7, 5),
            conv_config(
                3,
                [3, 3],
                2,
                Padding::Same,
                1.0,
                sign(1.0),
                K::SteSign { clip: 1.0 },
            ),
        ),
        // Stride 1 SAME, magnitude-aware kernel.
        (
            (2, 3, 5, 6),
            conv_config(
                2,
                [3, 3],
                1,
                Padding::Same,
                1.0,
                sign(1.3),
                K::MagnitudeAwareSign { clip: 1.0 },
            ),
        ),
        // XNOR kernel scale, pad value 0.
        (
            (1, 2, 6, 5),
            conv_config(
                4,
                [3, 3],
                1,
                Padding::Same,
                0.0,
                sign(1.0),
                K::XnorWeightScale,
            ),
        ),
        // VALID, stride 2, square input.
        (
            (2, 2, 7, 7),
            conv_config(
                3,
                [3, 3],
                2,
                Padding::Valid,
                1.0,
                sign(0.6),
                K::SteSign { clip: 0.8 },
            ),
        ),
        (
            (2, 2, 6, 6),
            conv_config(
                3,
                [3, 3],
                2,
                Padding::Valid,
                0.0,
                sign(1.0),
                K::XnorWeightScale,
            ),
        ),
        // Non-square kernel, SAME pads only the width asymmetrically.
        (
            (1, 2, 5, 6),
            conv_config(
                2,
                [3, 2],
                1,
                Padding::Same,
                1.0,
                sign(1.0),
                K::MagnitudeAwareSign { clip: 0.7 },
            ),
        ),
        // 1x1 stride-2 shortcut on a square input.
        (
            (2, 3, 6, 6),
            conv_config(
                2,
                [1, 1],
                2,
                Padding::Same,
                1.0,
                sign(1.0),
                K::SteSign { clip: 1.0 },
            ),
        ),
        // Full precision input, binary kernel; binary input, full precision kernel.
        (
            (2, 2, 5, 5),
            conv_config(
                2,
                [3, 3],
                1,
                Padding::Same,
                0.0,
                Activation::None,
                K::XnorWeightScale,
            ),
        ),
        (
            (2, 2, 6, 6),
            conv_config(2, [3, 3], 2, Padding::Same, 1.0, sign(1.0), K::None),
        ),
    ];
    for (i, (d, mut cfg)) in cases.into_iter().enumerate() {
        check_quant_conv(20 + i as u64, d, &cfg)?;
        cfg.bias = !cfg.bias;
        check_quant_conv(40 + i as u64, d, &cfg)?;
    }
    Ok(())
}

#[test]
fn quant_conv_full_precision_gradients_match_finite_differences() -> Result {
    let mut r = rng(11);
    for (d, stride, padding) in [
        ((2, 2, 5, 6), 1, Padding::Same),
        ((1, 3, 6, 6), 2, Padding::Same),
        ((1, 2, 7, 7), 2, Padding::Valid),
    ] {
        let (_, c, h, w) = d;
        let cfg = conv_config(
            3,
            [3, 3],
            stride,
            padding,
            0.0,
            Activation::None,
            KernelQuantizer::None,
        );
        let wd = (3, c, 3, 3);
        let ws = uniform(&mut r, numel(wd), -1.0, 1.0);
        let bs = uniform(&mut r, 3, -1.0, 1.0);
        let weights = Weights::new();
        let wv = weights.set("weight", &ws, wd);
        let bv = weights.set("bias", &bs, 3);
        let layer = QuantConv2d::new(weights.vb(), feature(c, h, w), &cfg)?;
        let xs = uniform(&mut r, numel(d), -1.0, 1.0);
        let x = var(&xs, d);
        let y = layer.forward(x.as_tensor())?;
        let geom = conv_geom(&cfg, h, w);
        let gy = uniform(&mut r, y.elem_count(), -1.0, 1.0);
        let grads = backward(&y, &gy)?;
        let loss = |xs: &[f64], ws: &[f64], bs: &[f64]| {
            let (mut y, yd) = naive_conv(xs, d, ws, 3, &geom);
            add_bias(&mut y, yd, bs);
            dot(&gy, &y)
        };
        let fd = numeric_gradient(&xs, |p| loss(p, &ws, &bs));
        assert_close(&grad(&grads, &x), &fd, FD_RTOL, FD_ATOL, "conv d/dx");
        let fd = numeric_gradient(&ws, |p| loss(&xs, p, &bs));
        assert_close(&grad(&grads, &wv), &fd, FD_RTOL, FD_ATOL, "conv d/dw");
        let fd = numeric_gradient(&bs, |p| loss(&xs, &ws, p));
        assert_close(&grad(&grads, &bv), &fd, FD_RTOL, FD_ATOL, "conv d/db");
    }
    Ok(())
}

#[test]
fn quant_conv_gradients_on_non_square_input_with_uneven_stride_remainders() -> Result {
    use KernelQuantizer as K;
    let sign1 = Activation::Sign { clip: 1.0 };
    // 6x7 VALID stride 2: the padded input leaves one spare row but no spare column.
    let cfg = conv_config(
        2,
        [3, 3],
        2,
        Padding::Valid,
        0.0,
        sign1,
        K::SteSign { clip: 1.0 },
    );
    check_quant_conv(60, (1, 2, 6, 7), &cfg)?;
    // 1x1 stride 2 SAME (no padding) on 6x7: the same situation.
    let cfg = conv_config(
        4,
        [1, 1],
        2,
        Padding::Same,
        1.0,
        sign1,
        K::SteSign { clip: 1.0 },
    );
    check_quant_conv(61, (1, 2, 6, 7), &cfg)
}

#[test]
fn quant_conv_with_lab_input_matches_reference() -> Result {
    let mut r = rng(12);
    let (c, h, w) = (2, 5, 6);
    let d = (2, c, h, w);
    for pairing in PAIRINGS {
        let cfg = conv_config(
            3,
            [3, 3],
            1,
            Padding::Same,
            1.0,
            Activation::Lab(pairing),
            KernelQuantizer::SteSign { clip: 1.0 },
        );
        let wd = (3, c, 3, 3);
        let s = lab_setup(&mut r, c, -0.8, Weights::new(), "lab.");
        let ws = uniform(&mut r, numel(wd), -1.5, 1.5);
        let bs = uniform(&mut r, 3, -0.5, 0.5);
        let wv = s.weights.set("weight", &ws, wd);
        s.weights.set("bias", &bs, 3);
        let layer = QuantConv2d::new(s.weights.vb(), feature(c, h, w), &cfg)?;
        let xs = uniform(&mut r, numel(d), -1.0, 1.0);
        let x = var(&xs, d);
        let y = layer.forward(x.as_tensor())?;

        let geom = conv_geom(&cfg, h, w);
        let q = quantize_reference(&ws, 3, cfg.kernel_quantizer);
        let (y0, y1) = lab_reference(&xs, d, &s.w, &s.b, s.beta, pairing);
        let xb = lab_hard(&y0, &y1);
        let (mut y_ref, yd) = naive_conv(&xb, d, &q, 3, &geom);
        add_bias(&mut y_ref, yd, &bs);
        assert_close(&values(&y), &y_ref, EXACT, 1e-12, "LAB conv forward");

        let gy = uniform(&mut r, y_ref.len(), -1.0, 1.0);
        let grads = backward(&y, &gy)?;
        let (_, dq) = naive_conv_backward(&xb, d, &q, 3, &geom, &gy);
        let dw = quantize_backward_reference(&ws, 3, cfg.kernel_quantizer, &dq);
        assert_close(&grad(&grads, &wv), &dw, EXACT, 1e-12, "LAB conv d/dw");
        // The convolution is linear in its (padded) input, so the gradients of the LAB tensors
        // are those of sum(gy * conv(pad(tanh((y1 - y0) / 2), 1))).
        let loss = |xs: &[f64], lw: &[f64], lb: &[f64], beta: f64| {
            let (y0, y1) = lab_reference(xs, d, lw, lb, beta, pairing);
            let (y, _) = naive_conv(&lab_soft(&y0, &y1), d, &q, 3, &geom);
            dot(&gy, &y)
        };
        let [lw, lb, lbeta] = &s.vars;
        let fd = numeric_gradient(&xs, |p| loss(p, &s.w, &s.b, s.beta));
        assert_close(&grad(&grads, &x), &fd, FD_RTOL, FD_ATOL, "LAB conv d/dx");
        let fd = numeric_gradient(&s.w, |p| loss(&xs, p, &s.b, s.beta));
        assert_close(
            &grad(&grads, lw),
            &fd,
            FD_RTOL,
            FD_ATOL,
            "LAB conv d/dlab.w",
        );
        let fd = numeric_gradient(&s.b, |p| loss(&xs, &s.w, p, s.beta));
        assert_close(
            &grad(&grads, lb),
            &fd,
            FD_RTOL,
            FD_ATOL,
            "LAB conv d/dlab.b",
        );
        let fd = numeric_gradient(&[s.beta], |p| loss(&xs, &s.w, &s.b, p[0]));
        assert_close(
            &grad(&grads, lbeta),
            &fd,
            FD_RTOL,
            FD_ATOL,
            "LAB conv d/dbeta",
        );
    }
    Ok(())
}

#[test]
fn quant_conv_rejects_unequal_strides() {
    let mut cfg = conv_config(
        2,
        [3, 3],
        1,
        Padding::Same,
        0.0,
        Activation::None,
        KernelQuantizer::None,
    );
    cfg.stride = [1, 2];
    assert!(QuantConv2d::new(Weights::new().vb(), feature(2, 5, 5), &cfg).is_err());
}

#[test]
fn quantize_kernel_values_and_gradients_match_hand_derived_formulas() -> Result {
    let mut r = rng(13);
    let wd = (3, 2, 3, 3);
    let quantizers = [
        KernelQuantizer::None,
        KernelQuantizer::SteSign { clip: 1.0 },
        KernelQuantizer::SteSign { clip: 0.6 },
        KernelQuantizer::MagnitudeAwareSign { clip: 1.0 },
        KernelQuantizer::MagnitudeAwareSign { clip: 0.8 },
        KernelQuantizer::XnorWeightScale,
    ];
    for q in quantizers {
        let mut ws = uniform(&mut r, numel(wd), -1.6, 1.6);
        let mut specials = vec![1.0, -1.0, 1.0 + 1e-12, -1.0 - 1e-12];
        if let KernelQuantizer::SteSign { clip } | KernelQuantizer::MagnitudeAwareSign { clip } = q
        {
            specials.extend([clip, -clip, 0.0]);
        }
        plant(&mut ws, &specials);
        // Some weights outside [-1, 1] in every output channel.
        for oc in 0..3 {
            ws[oc * 18 + 1] = 1.25 * sign(ws[oc * 18 + 1]);
        }
        let w = var(&ws, wd);
        let qw = layers::quantize_kernel(w.as_tensor(), &q)?;
        let expected = quantize_reference(&ws, 3, q);
        assert_close(
            &values(&qw),
            &expected,
            EXACT,
            0.0,
            &format!("{q:?} forward"),
        );
        let g = uniform(&mut r, numel(wd), -1.0, 1.0);
        let grads = backward(&qw, &g)?;
        let dw = quantize_backward_reference(&ws, 3, q, &g);
        assert_close(&grad(&grads, &w), &dw, EXACT, 1e-15, &format!("{q:?} grad"));
    }
    Ok(())
}

#[test]
fn xnor_weight_scale_gradient_at_a_zero_weight_matches_tensorflow() -> Result {
    // One output channel, weights [0, 0.5, -0.25, 2]: n = 4, alpha = (0 + 0.5 + 0.25 + 1) / 4.
    let ws = [0.0, 0.5, -0.25, 2.0];
    let w = var(&ws, (1, 1, 2, 2));
    let q = layers::quantize_kernel(w.as_tensor(), &KernelQuantizer::XnorWeightScale)?;
    let g = [0.3, -0.7, 0.2, 0.9];
    let grads = backward(&q, &g)?;
    let alpha = 1.75 / 4.0;
    // sum(G * sign(w)) with sign(0) = +1 (Larq's ste_sign forward).
    let s = 0.3 - 0.7 - 0.2 + 0.9;
    // TensorFlow: d|w|/dw = sign(w), 0 at w == 0; the clipped weight (2) gets nothing.
    let expected = [
        alpha * 0.3,
        alpha * -0.7 + s / 4.0,
        alpha * 0.2 - s / 4.0,
        0.0,
    ];
    assert_close(&grad(&grads, &w), &expected, EXACT, 1e-15, "xnor at w == 0");
    Ok(())
}

// ------------------------------------------------------------------------------------------
// 6. DepthwiseConv2d
// ------------------------------------------------------------------------------------------

#[test]
fn depthwise_conv_forward_and_gradients_match_reference() -> Result {
    let mut r = rng(14);
    let cases = [
        // (dims, kernel, stride, padding, multiplier, bias)
        ((2, 2, 5, 6), [3, 3], [1, 1], Padding::Same, 1, true),
        ((2, 2, 6, 6), [3, 3], [2, 2], Padding::Same, 2, true),
        ((1, 3, 7, 7), [3, 3], [2, 2], Padding::Same, 1, false),
        ((1, 2, 7, 6), [3, 3], [2, 2], Padding::Valid, 2, true),
        ((2, 1, 5, 6), [2, 3], [1, 1], Padding::Valid, 2, false),
        ((1, 2, 6, 7), [3, 3], [2, 1], Padding::Same, 2, true),
        ((1, 2, 6, 6), [5, 5], [2, 2], Padding::Same, 1, true),
    ];
    for (d, kernel, stride, padding, multiplier, bias) in cases {
        let (_, c, h, w) = d;
        let cfg = DepthwiseConv {
            kernel,
            stride,
            padding,
            multiplier,
            bias,
            init: Init::GlorotUniform,
        };
        let what = format!("depthwise {d:?} {cfg:?}");
        let out_c = c * multiplier;
        let wd = (out_c, 1, kernel[0], kernel[1]);
        let ws = uniform(&mut r, numel(wd), -1.0, 1.0);
        let bs = uniform(&mut r, out_c, -1.0, 1.0);
        let weights = Weights::new();
        let wv = weights.set("weight", &ws, wd);
        let bv = bias.then(|| weights.set("bias", &bs, out_c));
        let layer = DepthwiseConv2d::new(weights.vb(), feature(c, h, w), &cfg)?;
        let xs = uniform(&mut r, numel(d), -1.0, 1.0);
        let x = var(&xs, d);
        let y = layer.forward(x.as_tensor())?;

        let mut geom = Geom::new(kernel, stride, tf_pads(h, w, kernel, stride, padding));
        geom.groups = c;
        let bias_of = |bs: &[f64]| if bias { bs.to_vec() } else { vec![0.0; out_c] };
        let reference = |xs: &[f64], ws: &[f64], bs: &[f64]| {
            let (mut y, yd) = naive_conv(xs, d, ws, out_c, &geom);
            add_bias(&mut y, yd, &bias_of(bs));
            (y, yd)
        };
        let (y_ref, yd) = reference(&xs, &ws, &bs);
        assert_eq!(y.dims4()?, yd, "{what}: shape");
        assert_close(
            &values(&y),
            &y_ref,
            EXACT,
            1e-14,
            &format!("{what}: forward"),
        );

        let gy = uniform(&mut r, y_ref.len(), -1.0, 1.0);
        let grads = backward(&y, &gy)?;
        let loss = |xs: &[f64], ws: &[f64], bs: &[f64]| dot(&gy, &reference(xs, ws, bs).0);
        let fd = numeric_gradient(&xs, |p| loss(p, &ws, &bs));
        assert_close(
            &grad(&grads, &x),
            &fd,
            FD_RTOL,
            FD_ATOL,
            &format!("{what}: d/dx"),
        );
        let fd = numeric_gradient(&ws, |p| loss(&xs, p, &bs));
        assert_close(
            &grad(&grads, &wv),
            &fd,
            FD_RTOL,
            FD_ATOL,
            &format!("{what}: d/dw"),
        );
        if let Some(bv) = &bv {
            let fd = numeric_gradient(&bs, |p| loss(&xs, &ws, p));
            assert_close(
                &grad(&grads, bv),
                &fd,
                FD_RTOL,
                FD_ATOL,
                &format!("{what}: d/db"),
            );
        }
    }
    Ok(())
}

#[test]
fn depthwise_conv_function_rejects_a_kernel_larger_than_the_input() -> Result {
    let x = Tensor::zeros((1, 2, 2, 5), DType::F64, &Device::Cpu)?;
    let k = Tensor::zeros((2, 1, 3, 3), DType::F64, &Device::Cpu)?;
    assert!(layers::depthwise_conv2d(&x, &k, [1, 1]).is_err());
    let k = Tensor::zeros((3, 1, 1, 1), DType::F64, &Device::Cpu)?;
    assert!(layers::depthwise_conv2d(&x, &k, [1, 1]).is_err());
    Ok(())
}

// ------------------------------------------------------------------------------------------
// 7. BatchNorm
// ------------------------------------------------------------------------------------------

/// Per-channel batch mean and biased variance over N, H and W.
fn batch_moments(xs: &[f64], d: Dims) -> (Vec<f64>, Vec<f64>) {
    let (n, c, h, w) = d;
    let count = (n * h * w) as f64;
    let mean: Vec<f64> = channel_sums(xs, d).iter().map(|s| s / count).collect();
    let mut var = vec![0.0; c];
    for b in 0..n {
        for ch in 0..c {
            for p in 0..h * w {
                let v = xs[(b * c + ch) * h * w + p] - mean[ch];
                var[ch] += v * v / count;
            }
        }
    }
    (mean, var)
}

/// `(x - mean) / sqrt(var + eps) * gamma + beta` per channel.
fn bn_apply(
    xs: &[f64],
    d: Dims,
    mean: &[f64],
    var: &[f64],
    gamma: Option<&[f64]>,
    beta: Option<&[f64]>,
    eps: f64,
) -> Vec<f64> {
    let (n, c, h, w) = d;
    let mut y = vec![0.0; xs.len()];
    for b in 0..n {
        for ch in 0..c {
            for p in 0..h * w {
                let i = (b * c + ch) * h * w + p;
                let mut v = (xs[i] - mean[ch]) / (var[ch] + eps).sqrt();
                if let Some(g) = gamma {
                    v *= g[ch];
                }
                if let Some(bb) = beta {
                    v += bb[ch];
                }
                y[i] = v;
            }
        }
    }
    y
}

fn bn_config(momentum: f64, epsilon: f64, center: bool, scale: bool) -> BnConfig {
    BnConfig {
        momentum,
        epsilon,
        center,
        scale,
    }
}

#[test]
fn batch_norm_train_step_and_moving_statistics_follow_keras() -> Result {
    let mut r = rng(15);
    let d = (3, 2, 2, 3);
    let (_, c, h, w) = d;
    let count = 18.0;
    let (m, eps) = (0.9, 1e-3);
    let gamma = uniform(&mut r, c, 0.5, 1.5);
    let beta = uniform(&mut r, c, -0.5, 0.5);
    let mm0 = uniform(&mut r, c, -0.5, 0.5);
    let mv0 = uniform(&mut r, c, 0.5, 2.0);
    let weights = Weights::new();
    weights.set("weight", &gamma, c);
    weights.set("bias", &beta, c);
    weights.set("running_mean", &mm0, c);
    weights.set("running_var", &mv0, c);
    let bn = BatchNorm::new(
        weights.vb(),
        feature(c, h, w),
        &bn_config(m, eps, true, true),
    )?;

    let (mut mm, mut mv) = (mm0, mv0);
    for step in 0..2 {
        let mut xs = uniform(&mut r, numel(d), -1.0, 3.0);
        xs.iter_mut().skip(6).step_by(12).for_each(|v| *v *= 4.0);
        let y = bn.forward(&tensor(&xs, d), true)?;
        let (mean, var) = batch_moments(&xs, d);
        let y_ref = bn_apply(&xs, d, &mean, &var, Some(&gamma), Some(&beta), eps);
        assert_close(&values(&y), &y_ref, EXACT, 1e-12, "train output");
        for ch in 0..c {
            mm[ch] = mm[ch] * m + mean[ch] * (1.0 - m);
            mv[ch] = mv[ch] * m + var[ch] * count / (count - 1.0) * (1.0 - m);
        }
        let what = format!("after train step {}", step + 1);
        assert_close(&values(bn.running_mean()), &mm, EXACT, 0.0, &what);
        assert_close(&values(bn.running_var()), &mv, EXACT, 0.0, &what);
    }

    // Inference uses the moving statistics and leaves them alone.
    let xs = uniform(&mut r, numel(d), -2.0, 2.0);
    let y = bn.forward(&tensor(&xs, d), false)?;
    let y_ref = bn_apply(&xs, d, &mm, &mv, Some(&gamma), Some(&beta), eps);
    assert_close(&values(&y), &y_ref, EXACT, 1e-12, "inference output");
    assert_close(&values(bn.running_mean()), &mm, EXACT, 0.0, "inference mm");
    assert_close(&values(bn.running_var()), &mv, EXACT, 0.0, "inference mv");
    Ok(())
}

#[test]
fn batch_norm_defaults_and_missing_center_and_scale() -> Result {
    let mut r = rng(16);
    let d = (2, 3, 2, 2);
    let xs = uniform(&mut r, numel(d), -2.0, 2.0);

    // A fresh map: gamma 1, beta 0, moving mean 0, moving variance 1.
    let weights = Weights::new();
    let cfg = bn_config(0.99, 1e-3, true, true);
    let bn = BatchNorm::new(weights.vb(), feature(3, 2, 2), &cfg)?;
    assert_eq!(weights.get("weight"), Some((vec![3], vec![1.0; 3])));
    assert_eq!(weights.get("bias"), Some((vec![3], vec![0.0; 3])));
    assert_eq!(weights.get("running_mean"), Some((vec![3], vec![0.0; 3])));
    assert_eq!(weights.get("running_var"), Some((vec![3], vec![1.0; 3])));
    let y = bn.forward(&tensor(&xs, d), false)?;
    let y_ref: Vec<f64> = xs.iter().map(|v| v / (1.0f64 + 1e-3).sqrt()).collect();
    assert_close(&values(&y), &y_ref, EXACT, 0.0, "default inference");

    // No center, no scale: no gamma or beta tensors, plain normalisation.
    let weights = Weights::new();
    let bn = BatchNorm::new(
        weights.vb(),
        feature(3, 2, 2),
        &bn_config(0.9, 1e-3, false, false),
    )?;
    assert!(weights.get("weight").is_none() && weights.get("bias").is_none());
    let y = bn.forward(&tensor(&xs, d), true)?;
    let (mean, var) = batch_moments(&xs, d);
    let y_ref = bn_apply(&xs, d, &mean, &var, None, None, 1e-3);
    assert_close(&values(&y), &y_ref, EXACT, 1e-12, "no center/scale");
    // Only scale.
    let weights = Weights::new();
    let gamma = uniform(&mut r, 3, 0.5, 2.0);
    weights.set("weight", &gamma, 3);
    let bn = BatchNorm::new(
        weights.vb(),
        feature(3, 2, 2),
        &bn_config(0.9, 1e-3, false, true),
    )?;
    assert!(weights.get("bias").is_none());
    let y = bn.forward(&tensor(&xs, d), true)?;
    let y_ref = bn_apply(&xs, d, &mean, &var, Some(&gamma), None, 1e-3);
    assert_close(&values(&y), &y_ref, EXACT, 1e-12, "scale only");
    Ok(())
}

#[test]
fn batch_norm_epsilon_is_at_least_keras_minimum() -> Result {
    let mut r = rng(17);
    let d = (2, 2, 3, 3);
    let xs = uniform(&mut r, numel(d), -1.0, 1.0);
    // Zero moving variance makes epsilon the whole denominator.
    for (eps, effective) in [(1e-5, 1.001e-5f64), (0.0, 1.001e-5), (2e-3, 2e-3)] {
        let weights = Weights::new();
        weights.set("running_var", &[0.0, 0.0], 2);
        let cfg = bn_config(0.99, eps, false, false);
        let bn = BatchNorm::new(weights.vb(), feature(2, 3, 3), &cfg)?;
        let y = values(&bn.forward(&tensor(&xs, d), false)?);
        let y_ref: Vec<f64> = xs.iter().map(|v| v / effective.sqrt()).collect();
        assert_close(&y, &y_ref, EXACT, 0.0, &format!("inference eps {eps}"));
        // Train mode on a tiny-variance batch, where epsilon matters.
        let small: Vec<f64> = xs.iter().map(|v| v * 3e-3).collect();
        let y = values(&bn.forward(&tensor(&small, d), true)?);
        let (mean, var) = batch_moments(&small, d);
        let y_ref = bn_apply(&small, d, &mean, &var, None, None, effective);
        assert_close(&y, &y_ref, 1e-10, 1e-12, &format!("train eps {eps}"));
    }
    Ok(())
}

#[test]
fn batch_norm_train_gradients_match_finite_differences() -> Result {
    let mut r = rng(18);
    let d = (2, 3, 2, 3);
    let (_, c, h, w) = d;
    let eps = 1e-3;
    let gamma = uniform(&mut r, c, 0.5, 1.5);
    let beta = uniform(&mut r, c, -0.5, 0.5);
    let weights = Weights::new();
    let gv = weights.set("weight", &gamma, c);
    let bv = weights.set("bias", &beta, c);
    let bn = BatchNorm::new(
        weights.vb(),
        feature(c, h, w),
        &bn_config(0.99, eps, true, true),
    )?;
    let xs = uniform(&mut r, numel(d), -1.0, 2.0);
    let x = var(&xs, d);
    let y = bn.forward(x.as_tensor(), true)?;
    let g = uniform(&mut r, numel(d), -1.0, 1.0);
    let grads = backward(&y, &g)?;
    let loss = |xs: &[f64], gamma: &[f64], beta: &[f64]| {
        let (mean, var) = batch_moments(xs, d);
        dot(
            &g,
            &bn_apply(xs, d, &mean, &var, Some(gamma), Some(beta), eps),
        )
    };
    let fd = numeric_gradient(&xs, |p| loss(p, &gamma, &beta));
    assert_close(&grad(&grads, &x), &fd, FD_RTOL, FD_ATOL, "bn d/dx");
    let fd = numeric_gradient(&gamma, |p| loss(&xs, p, &beta));
    assert_close(&grad(&grads, &gv), &fd, FD_RTOL, FD_ATOL, "bn d/dgamma");
    let fd = numeric_gradient(&beta, |p| loss(&xs, &gamma, p));
    assert_close(&grad(&grads, &bv), &fd, FD_RTOL, FD_ATOL, "bn d/dbeta");
    Ok(())
}

// ------------------------------------------------------------------------------------------
// 8. ReLU, PReLU, Bias, Dense
// ------------------------------------------------------------------------------------------

#[test]
fn relu_gradient_is_zero_at_zero_and_one_above() -> Result {
    let xs = [-2.0, -1e-300, -0.0, 0.0, 1e-300, 3.5];
    let x = var(&xs, 6);
    let y = layers::relu(x.as_tensor())?;
    assert_exact(&values(&y), &[0.0, 0.0, 0.0, 0.0, 1e-300, 3.5], "relu");
    let g = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8];
    let grads = backward(&y, &g)?;
    assert_exact(
        &grad(&grads, &x),
        &[0.0, 0.0, 0.0, 0.0, 0.7, 0.8],
        "relu grad",
    );
    Ok(())
}

#[test]
fn prelu_forward_and_gradients_match_hand_formulas() -> Result {
    let mut r = rng(19);
    let d = (2, 3, 3, 4);
    let (_, c, h, w) = d;
    let mut xs = uniform(&mut r, numel(d), -2.0, 2.0);
    plant(&mut xs, &[0.0, -0.0, 0.0, 0.0]);
    let alpha = [0.25, -0.4, 1.3];
    let weights = Weights::new();
    let av = weights.set("weight", &alpha, c);
    let layer = PRelu::new(weights.vb(), feature(c, h, w), &PReluConfig { alpha: 0.7 })?;
    let x = var(&xs, d);
    let y = layer.forward(x.as_tensor())?;
    let ch = |i: usize| (i / (h * w)) % c;
    let y_ref: Vec<f64> = (0..xs.len())
        .map(|i| {
            if xs[i] > 0.0 {
                xs[i]
            } else {
                alpha[ch(i)] * xs[i]
            }
        })
        .collect();
    assert_close(&values(&y), &y_ref, 1e-15, 0.0, "prelu forward");
    let g = uniform(&mut r, numel(d), -1.0, 1.0);
    let grads = backward(&y, &g)?;
    let dx: Vec<f64> = (0..xs.len())
        .map(|i| match xs[i] {
            v if v > 0.0 => g[i],
            v if v < 0.0 => g[i] * alpha[ch(i)],
            _ => 0.0,
        })
        .collect();
    assert_close(&grad(&grads, &x), &dx, 1e-15, 0.0, "prelu d/dx");
    let mut da = vec![0.0; c];
    for i in 0..xs.len() {
        if xs[i] < 0.0 {
            da[ch(i)] += g[i] * xs[i];
        }
    }
    assert_close(&grad(&grads, &av), &da, EXACT, 0.0, "prelu d/dalpha");

    // A fresh map starts from the configured slope.
    let weights = Weights::new();
    PRelu::new(weights.vb(), feature(c, h, w), &PReluConfig { alpha: 0.25 })?;
    assert_eq!(weights.get("weight"), Some((vec![3], vec![0.25; 3])));
    Ok(())
}

#[test]
fn bias_forward_and_gradients() -> Result {
    let mut r = rng(20);
    let d = (2, 3, 2, 5);
    let xs = uniform(&mut r, numel(d), -1.0, 1.0);
    let bs = uniform(&mut r, 3, -1.0, 1.0);
    let weights = Weights::new();
    let bv = weights.set("bias", &bs, 3);
    let layer = Bias::new(weights.vb(), feature(3, 2, 5))?;
    let x = var(&xs, d);
    let y = layer.forward(x.as_tensor())?;
    let mut y_ref = xs.clone();
    add_bias(&mut y_ref, d, &bs);
    assert_exact(&values(&y), &y_ref, "bias forward");
    let g = uniform(&mut r, numel(d), -1.0, 1.0);
    let grads = backward(&y, &g)?;
    assert_exact(&grad(&grads, &x), &g, "bias d/dx");
    assert_close(
        &grad(&grads, &bv),
        &channel_sums(&g, d),
        EXACT,
        0.0,
        "bias d/db",
    );
    let weights = Weights::new();
    Bias::new(weights.vb(), feature(4, 1, 1))?;
    assert_eq!(weights.get("bias"), Some((vec![4], vec![0.0; 4])));
    Ok(())
}

#[test]
fn dense_forward_and_gradients_match_hand_formulas() -> Result {
    let mut r = rng(21);
    let (n, c) = (3, 4);
    for (units, classes, bias) in [(Units::Fixed(5), 10, true), (Units::Classes, 7, false)] {
        let u = units.resolve(classes);
        let cfg = DenseConfig {
            units,
            bias,
            init: Init::GlorotUniform,
        };
        let xs = uniform(&mut r, n * c, -1.0, 1.0);
        let ws = uniform(&mut r, u * c, -1.0, 1.0);
        let bs = uniform(&mut r, u, -1.0, 1.0);
        let weights = Weights::new();
        let wv = weights.set("weight", &ws, (u, c));
        let bv = bias.then(|| weights.set("bias", &bs, u));
        let layer = Dense::new(weights.vb(), feature(c, 1, 1), &cfg, classes)?;
        let x = var(&xs, (n, c, 1, 1));
        let y = layer.forward(x.as_tensor())?;
        assert_eq!(y.dims4()?, (n, u, 1, 1));
        let mut y_ref = vec![0.0; n * u];
        for s in 0..n {
            for o in 0..u {
                y_ref[s * u + o] = (0..c).map(|k| xs[s * c + k] * ws[o * c + k]).sum::<f64>()
                    + if bias { bs[o] } else { 0.0 };
            }
        }
        assert_close(&values(&y), &y_ref, EXACT, 1e-15, "dense forward");
        let g = uniform(&mut r, n * u, -1.0, 1.0);
        let grads = backward(&y, &g)?;
        let mut dx = vec![0.0; n * c];
        let mut dw = vec![0.0; u * c];
        let mut db = vec![0.0; u];
        for s in 0..n {
            for o in 0..u {
                db[o] += g[s * u + o];
                for k in 0..c {
                    dx[s * c + k] += g[s * u + o] * ws[o * c + k];
                    dw[o * c + k] += g[s * u + o] * xs[s * c + k];
                }
            }
        }
        assert_close(&grad(&grads, &x), &dx, EXACT, 1e-15, "dense d/dx");
        assert_close(&grad(&grads, &wv), &dw, EXACT, 1e-15, "dense d/dw");
        if let Some(bv) = &bv {
            assert_close(&grad(&grads, bv), &db, EXACT, 1e-15, "dense d/db");
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// 9. Pooling and the parameter-free layers.
// ------------------------------------------------------------------------------------------

/// Window, stride, padding, input height and width.
type PoolCase = ([usize; 2], [usize; 2], Padding, usize, usize);

const POOL_CASES: [PoolCase; 9] = [
    ([3, 3], [2, 2], Padding::Same, 6, 6),
    ([3, 3], [2, 2], Padding::Same, 7, 7),
    ([3, 3], [1, 1], Padding::Same, 5, 6),
    ([2, 2], [2, 2], Padding::Valid, 5, 5),
    ([2, 2], [2, 2], Padding::Same, 5, 5),
    ([2, 3], [1, 2], Padding::Same, 5, 7),
    ([3, 3], [2, 2], Padding::Valid, 7, 6),
    ([1, 1], [2, 2], Padding::Same, 5, 6),
    ([4, 4], [1, 1], Padding::Same, 4, 5),
];

fn pool_config(size: [usize; 2], stride: [usize; 2], padding: Padding) -> Pool {
    Pool {
        size,
        stride,
        padding,
    }
}

#[test]
fn pooling_shapes_and_values_match_tensorflow() -> Result {
    let mut r = rng(22);
    for (size, stride, padding, h, w) in POOL_CASES {
        let d = (2, 2, h, w);
        let p = pool_config(size, stride, padding);
        let geom = Geom::new(size, stride, tf_pads(h, w, size, stride, padding));
        let expected_hw = match padding {
            Padding::Same => (h.div_ceil(stride[0]), w.div_ceil(stride[1])),
            Padding::Valid => ((h - size[0]) / stride[0] + 1, (w - size[1]) / stride[1] + 1),
        };
        // All-negative input: a padded zero must never win a SAME max window.
        for (lo, hi) in [(-2.0, -0.5), (-1.0, 1.0)] {
            let xs = uniform(&mut r, numel(d), lo, hi);
            let x = tensor(&xs, d);
            let what = format!("{p:?} on {h}x{w}");
            let (y_ref, yd, _) = naive_pool(&xs, d, &geom, PoolKind::Max);
            assert_eq!((yd.2, yd.3), expected_hw, "{what}: reference shape");
            let y = layers::max_pool2d(&x, &p)?;
            assert_eq!(y.dims4()?, yd, "{what}: max shape");
            assert_exact(&values(&y), &y_ref, &format!("{what}: max"));
            let (y_ref, _, _) = naive_pool(&xs, d, &geom, PoolKind::Avg);
            let y = layers::avg_pool2d(&x, &p)?;
            assert_eq!(y.dims4()?, yd, "{what}: avg shape");
            assert_close(&values(&y), &y_ref, EXACT, 0.0, &format!("{what}: avg"));
        }
    }
    // SAME average of a constant is that constant, also in the border windows.
    let p = pool_config([3, 3], [2, 2], Padding::Same);
    let y = layers::avg_pool2d(&Tensor::full(2.5f64, (1, 1, 6, 6), &Device::Cpu)?, &p)?;
    assert_exact(&values(&y), &[2.5; 9], "avg of a constant");
    Ok(())
}

#[test]
fn max_pool_gradient_goes_to_the_first_maximum_of_each_window() -> Result {
    let mut r = rng(23);
    for (size, stride, padding, h, w) in POOL_CASES {
        let d = (1, 2, h, w);
        let p = pool_config(size, stride, padding);
        let geom = Geom::new(size, stride, tf_pads(h, w, size, stride, padding));
        let what = format!("{p:?} on {h}x{w}");
        // All zeros: every window is one big tie. Integer values: many ties.
        let ties: Vec<f64> = (0..numel(d)).map(|_| r.random_range(0..3) as f64).collect();
        for xs in [vec![0.0; numel(d)], ties] {
            let x = var(&xs, d);
            let y = layers::max_pool2d(x.as_tensor(), &p)?;
            let (_, _, firsts) = naive_pool(&xs, d, &geom, PoolKind::Max);
            // Unit output gradients: each window adds exactly one 1.
            let ones = vec![1.0; firsts.len()];
            let grads = backward(&y, &ones)?;
            let mut expected = vec![0.0; xs.len()];
            for f in &firsts {
                expected[f[0]] += 1.0;
            }
            let got = grad(&grads, &x);
            assert_exact(&got, &expected, &format!("{what}: first max, unit g"));
            assert_eq!(got.iter().sum::<f64>(), firsts.len() as f64);
            // Random output gradients.
            let g = uniform(&mut r, firsts.len(), -1.0, 1.0);
            let grads = backward(&y, &g)?;
            let mut expected = vec![0.0; xs.len()];
            for (f, gv) in firsts.iter().zip(&g) {
                expected[f[0]] += gv;
            }
            assert_close(&grad(&grads, &x), &expected, EXACT, 0.0, &what);
        }
    }
    Ok(())
}

#[test]
fn pooling_gradients_match_finite_differences() -> Result {
    let mut r = rng(24);
    for (size, stride, padding, h, w) in POOL_CASES {
        let d = (1, 2, h, w);
        let p = pool_config(size, stride, padding);
        let geom = Geom::new(size, stride, tf_pads(h, w, size, stride, padding));
        let what = format!("{p:?} on {h}x{w}");
        // Distinct values: max pooling is locally linear.
        let xs = uniform(&mut r, numel(d), -1.0, 1.0);
        for (kind, y) in [
            (
                PoolKind::Avg,
                layers::avg_pool2d as fn(&Tensor, &Pool) -> Result<Tensor>,
            ),
            (PoolKind::Max, layers::max_pool2d),
        ] {
            let x = var(&xs, d);
            let y = y(x.as_tensor(), &p)?;
            let g = uniform(&mut r, y.elem_count(), -1.0, 1.0);
            let grads = backward(&y, &g)?;
            let fd = numeric_gradient(&xs, |q| dot(&g, &naive_pool(q, d, &geom, kind).0));
            let got = grad(&grads, &x);
            assert_close(&got, &fd, FD_RTOL, FD_ATOL, &format!("{what}: {kind:?}"));
        }
    }
    Ok(())
}

#[test]
fn pooling_works_in_f32() -> Result {
    let xs: Vec<f32> = (0..2 * 5 * 5)
        .map(|i| ((i * 7) % 11) as f32 - 5.0)
        .collect();
    let x = Tensor::from_slice(&xs, (1, 2, 5, 5), &Device::Cpu)?;
    let p = pool_config([3, 3], [2, 2], Padding::Same);
    let x64: Vec<f64> = xs.iter().map(|&v| v as f64).collect();
    let geom = Geom::new([3, 3], [2, 2], [1, 1, 1, 1]);
    for (kind, y) in [
        (PoolKind::Max, layers::max_pool2d(&x, &p)?),
        (PoolKind::Avg, layers::avg_pool2d(&x, &p)?),
    ] {
        assert_eq!(y.dtype(), DType::F32);
        let (y_ref, _, _) = naive_pool(&x64, (1, 2, 5, 5), &geom, kind);
        assert_close(&values(&y), &y_ref, 1e-6, 0.0, &format!("f32 {kind:?}"));
    }
    Ok(())
}

#[test]
fn blur_pool_is_a_binomial_depthwise_blur_with_same_zero_padding() -> Result {
    let mut r = rng(25);
    let taps: Vec<f64> = [1.0, 2.0, 1.0, 2.0, 4.0, 2.0, 1.0, 2.0, 1.0]
        .iter()
        .map(|t| t / 16.0)
        .collect();
    for (d, stride) in [((2, 3, 6, 7), 2), ((1, 2, 5, 5), 2), ((1, 2, 5, 4), 1)] {
        let (_, c, h, w) = d;
        let mut geom = Geom::new(
            [3, 3],
            [stride; 2],
            tf_pads(h, w, [3, 3], [stride; 2], Padding::Same),
        );
        geom.groups = c;
        let kernel = taps.repeat(c);
        let xs = uniform(&mut r, numel(d), -1.0, 1.0);
        let x = var(&xs, d);
        let y = layers::blur_pool(x.as_tensor(), &BlurPool { stride })?;
        let (y_ref, yd) = naive_conv(&xs, d, &kernel, c, &geom);
        assert_eq!(y.dims4()?, yd);
        assert_eq!((yd.2, yd.3), (h.div_ceil(stride), w.div_ceil(stride)));
        assert_close(&values(&y), &y_ref, EXACT, 1e-15, "blur_pool forward");
        let g = uniform(&mut r, y_ref.len(), -1.0, 1.0);
        let grads = backward(&y, &g)?;
        let fd = numeric_gradient(&xs, |p| dot(&g, &naive_conv(p, d, &kernel, c, &geom).0));
        assert_close(&grad(&grads, &x), &fd, FD_RTOL, FD_ATOL, "blur_pool grad");
    }
    Ok(())
}

#[test]
fn global_avg_pool_means_over_height_and_width() -> Result {
    let mut r = rng(26);
    let d = (2, 3, 4, 5);
    let xs = uniform(&mut r, numel(d), -1.0, 1.0);
    let x = var(&xs, d);
    let y = layers::global_avg_pool(x.as_tensor())?;
    assert_eq!(y.dims4()?, (2, 3, 1, 1));
    let y_ref: Vec<f64> = xs
        .chunks(20)
        .map(|p| p.iter().sum::<f64>() / 20.0)
        .collect();
    assert_close(&values(&y), &y_ref, EXACT, 1e-15, "global_avg_pool");
    let g = uniform(&mut r, 6, -1.0, 1.0);
    let grads = backward(&y, &g)?;
    let dx: Vec<f64> = (0..xs.len()).map(|i| g[i / 20] / 20.0).collect();
    assert_close(&grad(&grads, &x), &dx, EXACT, 0.0, "global_avg_pool grad");
    Ok(())
}

#[test]
fn flatten_uses_keras_height_width_channel_order() -> Result {
    let mut r = rng(27);
    let d = (2, 3, 2, 4);
    let (n, c, h, w) = d;
    let xs = uniform(&mut r, numel(d), -1.0, 1.0);
    let x = var(&xs, d);
    let y = layers::flatten(x.as_tensor())?;
    assert_eq!(y.dims4()?, (n, h * w * c, 1, 1));
    let mut y_ref = vec![0.0; xs.len()];
    let mut dx_of = vec![0usize; xs.len()];
    for s in 0..n {
        for ch in 0..c {
            for i in 0..h {
                for j in 0..w {
                    let out = s * h * w * c + (i * w + j) * c + ch;
                    y_ref[out] = xs[((s * c + ch) * h + i) * w + j];
                    dx_of[((s * c + ch) * h + i) * w + j] = out;
                }
            }
        }
    }
    assert_exact(&values(&y), &y_ref, "flatten");
    let g = uniform(&mut r, xs.len(), -1.0, 1.0);
    let grads = backward(&y, &g)?;
    let dx: Vec<f64> = dx_of.iter().map(|&o| g[o]).collect();
    assert_exact(&grad(&grads, &x), &dx, "flatten grad");
    Ok(())
}

#[test]
fn duplicate_concatenates_the_input_with_itself() -> Result {
    let mut r = rng(28);
    let d = (2, 3, 2, 2);
    let xs = uniform(&mut r, numel(d), -1.0, 1.0);
    let x = var(&xs, d);
    let y = layers::duplicate(x.as_tensor())?;
    assert_eq!(y.dims4()?, (2, 6, 2, 2));
    let y_ref: Vec<f64> = xs.chunks(12).flat_map(|s| s.repeat(2)).collect();
    assert_exact(&values(&y), &y_ref, "duplicate");
    let g = uniform(&mut r, y_ref.len(), -1.0, 1.0);
    let grads = backward(&y, &g)?;
    let dx: Vec<f64> = (0..xs.len())
        .map(|i| {
            let (s, rest) = (i / 12, i % 12);
            g[s * 24 + rest] + g[s * 24 + 12 + rest]
        })
        .collect();
    assert_close(&grad(&grads, &x), &dx, 1e-15, 0.0, "duplicate grad");
    Ok(())
}

#[test]
fn pad2d_pads_with_the_given_value() -> Result {
    let mut r = rng(29);
    let d = (2, 2, 3, 4);
    let (n, c, h, w) = d;
    let xs = uniform(&mut r, numel(d), -1.0, 1.0);
    for (pads, value) in [
        ([1, 2, 0, 3], 1.0),
        ([0, 1, 2, 0], 1.0),
        ([1, 1, 1, 1], 0.0),
        ([2, 0, 0, 1], -2.5),
        ([0, 0, 0, 0], 1.0),
    ] {
        let [t, b, left, right] = pads;
        let (ph, pw) = (h + t + b, w + left + right);
        let x = var(&xs, d);
        let y = layers::pad2d(x.as_tensor(), pads, value)?;
        assert_eq!(y.dims4()?, (n, c, ph, pw));
        let geom = Geom::new([1, 1], [1, 1], pads);
        let mut y_ref = Vec::new();
        let mut dx_of = vec![0usize; xs.len()];
        for plane in 0..n * c {
            for py in 0..ph {
                for px in 0..pw {
                    y_ref.push(match geom.source(py, px, h, w) {
                        Some((iy, ix)) => {
                            dx_of[(plane * h + iy) * w + ix] = y_ref.len();
                            xs[(plane * h + iy) * w + ix]
                        }
                        None => value,
                    });
                }
            }
        }
        assert_exact(&values(&y), &y_ref, &format!("pad2d {pads:?} {value}"));
        let g = uniform(&mut r, y_ref.len(), -1.0, 1.0);
        let grads = backward(&y, &g)?;
        let dx: Vec<f64> = dx_of.iter().map(|&o| g[o]).collect();
        assert_exact(&grad(&grads, &x), &dx, "pad2d grad");
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// LAB as one fused op (`zoo_kernels::lab`, behind `Lab::forward`) against the composed ops
// ------------------------------------------------------------------------------------------

/// A LAB layer of `dtype` for `c` channels with random tensors, and those tensors as `Var`s
/// (`weight`, `bias`, `beta`).
fn lab_of_dtype(
    r: &mut StdRng,
    input: FeatureShape,
    pairing: LabPairing,
    dtype: DType,
) -> Result<(Lab, [Var; 3])> {
    let c = input.channels;
    let map = VarMap::new();
    let put = |name: &str, data: Vec<f64>, shape: &[usize]| -> Result<Var> {
        let v = Var::from_tensor(&tensor(&data, shape).to_dtype(dtype)?)?;
        map.data()
            .lock()
            .unwrap()
            .insert(name.to_string(), v.clone());
        Ok(v)
    };
    let beta = r.random_range(-1.5..1.5);
    let vars = [
        put("weight", uniform(r, 18 * c, -1.0, 1.0), &[2 * c, 1, 3, 3])?,
        put("bias", uniform(r, 2 * c, -0.5, 0.5), &[2 * c])?,
        put("beta", vec![beta], &[1])?,
    ];
    let lab = Lab::new(
        VarBuilder::from_varmap(&map, dtype, &Device::Cpu),
        input,
        pairing,
    )?;
    Ok((lab, vars))
}

/// The composed LAB (the implementation before the fused op): `lab_sign(beta*y1 - beta*y0)`
/// on the scores of the plain candle ops.
fn lab_composed(lab: &Lab, xs: &Tensor) -> Result<Tensor> {
    let (s0, s1) = lab.scores(xs)?;
    zoo_kernels::lab_sign(&s1.sub(&s0)?)
}

#[test]
fn lab_fused_op_matches_the_composed_ops() -> Result {
    let mut r = rng(71);
    for (dtype, rtol) in [(DType::F64, 1e-5), (DType::F32, 1e-4)] {
        for n in 1..=3 {
            for c in [1, 2, 3, 5] {
                for (h, w) in [(1, 1), (3, 5), (7, 7), (2, 9)] {
                    for pairing in PAIRINGS {
                        let what = format!("LAB {dtype:?} {pairing:?} {n}x{c}x{h}x{w}");
                        let (lab, vars) = lab_of_dtype(&mut r, feature(c, h, w), pairing, dtype)?;
                        let d = (n, c, h, w);
                        let x = Var::from_tensor(
                            &tensor(&uniform(&mut r, numel(d), -1.0, 1.0), d).to_dtype(dtype)?,
                        )?;
                        let fused = lab.forward(&x)?;
                        let composed = lab_composed(&lab, &x)?;
                        assert_eq!(fused.dtype(), dtype, "{what}");
                        assert_exact(&values(&fused), &values(&composed), &what);
                        let g = uniform(&mut r, numel(d), -1.0, 1.0);
                        let (gf, gc) = (backward(&fused, &g)?, backward(&composed, &g)?);
                        let named = [("x", &x), ("weight", &vars[0]), ("bias", &vars[1])];
                        for (name, v) in named.into_iter().chain([("beta", &vars[2])]) {
                            let expected = grad(&gc, v);
                            // Relative, with a floor for entries that cancel to near zero.
                            let floor = expected.iter().fold(0f64, |m, e| m.max(e.abs())) / 100.0;
                            assert_close(
                                &grad(&gf, v),
                                &expected,
                                rtol,
                                rtol * floor,
                                &format!("{what} d/d{name}"),
                            );
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

#[test]
fn lab_fused_op_gradients_match_finite_differences() -> Result {
    let mut r = rng(72);
    for pairing in PAIRINGS {
        for (n, c, h, w) in [(2, 3, 3, 5), (1, 5, 2, 9), (2, 2, 1, 1)] {
            let d = (n, c, h, w);
            let beta = r.random_range(-1.5..1.5);
            let s = lab_setup(&mut r, c, beta, Weights::new(), "");
            let lab = Lab::new(s.weights.vb(), feature(c, h, w), pairing)?;
            let xs = uniform(&mut r, numel(d), -1.0, 1.0);
            let x = var(&xs, d);
            let g = uniform(&mut r, numel(d), -1.0, 1.0);
            let grads = backward(&lab.forward(&x)?, &g)?;
            let loss = |xs: &[f64], w: &[f64], b: &[f64], beta: f64| {
                let (y0, y1) = lab_reference(xs, d, w, b, beta, pairing);
                dot(&g, &lab_soft(&y0, &y1))
            };
            // Central differences with a fixed step h = 1e-6.
            let fd = |p: &[f64], f: &dyn Fn(&[f64]) -> f64| -> Vec<f64> {
                let mut q = p.to_vec();
                (0..p.len())
                    .map(|i| {
                        q[i] = p[i] + 1e-6;
                        let up = f(&q);
                        q[i] = p[i] - 1e-6;
                        let down = f(&q);
                        q[i] = p[i];
                        (up - down) / 2e-6
                    })
                    .collect()
            };
            let what = |t: &str| format!("fused LAB d/d{t} ({pairing:?}, {d:?})");
            let [wv, bv, betav] = &s.vars;
            let fd_x = fd(&xs, &|p| loss(p, &s.w, &s.b, s.beta));
            assert_close(&grad(&grads, &x), &fd_x, FD_RTOL, FD_ATOL, &what("x"));
            let fd_w = fd(&s.w, &|p| loss(&xs, p, &s.b, s.beta));
            assert_close(&grad(&grads, wv), &fd_w, FD_RTOL, FD_ATOL, &what("w"));
            let fd_b = fd(&s.b, &|p| loss(&xs, &s.w, p, s.beta));
            assert_close(&grad(&grads, bv), &fd_b, FD_RTOL, FD_ATOL, &what("b"));
            let fd_beta = fd(&[s.beta], &|p| loss(&xs, &s.w, &s.b, p[0]));
            assert_close(
                &grad(&grads, betav),
                &fd_beta,
                FD_RTOL,
                FD_ATOL,
                &what("beta"),
            );
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// QuantConv2d on the fused binary convolution (`zoo_kernels::binary_conv2d`)
// ------------------------------------------------------------------------------------------

/// The general path the fused op replaces: binarize, pad, quantize the kernel, convolve.
fn quant_conv_composed(x: &Tensor, w: &Tensor, b: &Tensor, cfg: &Conv) -> Result<Tensor> {
    let xs = match cfg.input {
        Activation::Sign { clip } => ste_sign(x, clip)?,
        Activation::ApproxSign => approx_sign(x)?,
        Activation::SwishSign { beta } => swish_sign(x, beta)?,
        other => panic!("no composed reference for {other:?} here"),
    };
    let (_, _, h, wd) = x.dims4()?;
    let pads = tf_pads(h, wd, cfg.kernel, cfg.stride, cfg.padding);
    let xs = layers::pad2d(&xs, pads, cfg.pad_value)?;
    let kernel = layers::quantize_kernel(w, &cfg.kernel_quantizer)?;
    zoo_kernels::conv2d_gemm(&xs, &kernel, cfg.stride)?.broadcast_add(&b.reshape((1, (), 1, 1))?)
}

#[test]
fn quant_conv_on_the_binary_conv_op_matches_the_composed_path() -> Result {
    use KernelQuantizer as K;
    let mut r = rng(91);
    let inputs = [
        Activation::Sign { clip: 0.9 },
        Activation::ApproxSign,
        Activation::SwishSign { beta: 5.0 },
    ];
    let kernels = [
        K::SteSign { clip: 0.8 },
        K::MagnitudeAwareSign { clip: 1.1 },
    ];
    let shapes = [
        ((2, 3, 7, 6), 4, [3, 3]),
        ((2, 65, 5, 5), 3, [3, 3]),
        ((3, 5, 6, 7), 6, [1, 1]),
    ];
    let mut cases = Vec::new();
    for shape in shapes {
        for input in inputs {
            for quantizer in kernels {
                cases.push((shape, input, quantizer));
            }
        }
    }
    for (i, ((d, filters, kernel), input, quantizer)) in cases.into_iter().enumerate() {
        for (stride, pad_value) in [(1, 1.0), (2, 0.0), (1, 0.0), (2, 1.0)] {
            let padding = if i % 2 == 0 {
                Padding::Same
            } else {
                Padding::Valid
            };
            let cfg = conv_config(
                filters, kernel, stride, padding, pad_value, input, quantizer,
            );
            let what = format!("binary conv op {d:?} {cfg:?}");
            let (_, c, h, w) = d;
            let wd = (filters, c, kernel[0], kernel[1]);
            let mut xs = uniform(&mut r, numel(d), -1.5, 1.5);
            plant(&mut xs, &[0.0, -0.0, 0.9, -0.9]);
            let mut ws = uniform(&mut r, numel(wd), -1.5, 1.5);
            plant(&mut ws, &[0.0, 0.8, -0.8, 1.1, -1.1]);
            let bs = uniform(&mut r, filters, -0.5, 0.5);
            let weights = Weights::new();
            let wv = weights.set("weight", &ws, wd);
            let bv = weights.set("bias", &bs, filters);
            let layer = QuantConv2d::new(weights.vb(), feature(c, h, w), &cfg)?;
            let x = var(&xs, d);
            let y = layer.forward(x.as_tensor())?;
            let y_ref = quant_conv_composed(x.as_tensor(), wv.as_tensor(), bv.as_tensor(), &cfg)?;
            assert_eq!(y.dims(), y_ref.dims(), "{what}: shape");
            assert_close(
                &values(&y),
                &values(&y_ref),
                EXACT,
                1e-12,
                &format!("{what}: forward"),
            );
            let gy = uniform(&mut r, y.elem_count(), -1.0, 1.0);
            let (grads, grads_ref) = (backward(&y, &gy)?, backward(&y_ref, &gy)?);
            for (name, v) in [("x", &x), ("w", &wv), ("b", &bv)] {
                assert_close(
                    &grad(&grads, v),
                    &grad(&grads_ref, v),
                    1e-10,
                    1e-12,
                    &format!("{what}: d/d{name}"),
                );
            }
        }
    }
    Ok(())
}

//! Activation binarizers: the straight-through sign estimators and LAB.
//!
//! Every binarizer returns exactly ±1 in the forward pass and a surrogate gradient in the
//! backward pass, via [`straight_through`].

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::spec::{Activation, DepthwiseConv, FeatureShape, Init, LabPairing, Padding};

use super::DepthwiseConv2d;

/// `hard` in the forward pass, the gradient of `surrogate` in the backward pass.
///
/// Computed as `hard + (surrogate - surrogate)` with the second term detached: `s - s` is exactly
/// zero, so the forward value is exactly `hard`.
pub fn straight_through(hard: &Tensor, surrogate: &Tensor) -> Result<Tensor> {
    hard.detach().add(&surrogate.sub(&surrogate.detach())?)
}

/// `x * g` where `g` is detached: its gradient with respect to `x` is `g`. `x` is clamped to
/// `±1e30` first so that an infinite input gives a finite surrogate (and `sign(±inf) = ±1`).
fn with_gradient(xs: &Tensor, gradient: &Tensor) -> Result<Tensor> {
    xs.clamp(-1e30, 1e30)?.mul(&gradient.detach())
}

/// `sign(x)`, gradient `1{|x| <= clip}` (Larq's `ste_sign`).
pub fn ste_sign(xs: &Tensor, clip: f64) -> Result<Tensor> {
    zoo_kernels::ste_sign(xs, clip)
}

/// `sign(x)`, gradient `2 - 2|x|` inside `[-1, 1]` and 0 outside (Bi-Real Net's ApproxSign):
/// one op each way on the CPU, candle ops elsewhere.
pub fn approx_sign(xs: &Tensor) -> Result<Tensor> {
    if zoo_kernels::fused_on(xs.device()) {
        return zoo_kernels::approx_sign(xs);
    }
    let abs = xs.abs()?;
    let slope = abs
        .le(1.0)?
        .where_cond(&abs.affine(-2.0, 2.0)?, &xs.zeros_like()?)?;
    straight_through(&zoo_kernels::sign(xs)?, &with_gradient(xs, &slope)?)
}

/// `sign(x)`, gradient `beta (2 - beta x tanh(beta x / 2)) / (1 + cosh(beta x))` (SwishSign).
pub fn swish_sign(xs: &Tensor, beta: f64) -> Result<Tensor> {
    // With 1 + cosh(z) = e^|z| (1 + e^-|z|)^2 / 2 the slope stays finite for any z = beta x.
    let z = xs.clamp(-1e30, 1e30)?.affine(beta, 0.0)?;
    let decay = z.abs()?.neg()?.exp()?;
    let numerator = z
        .mul(&z.affine(0.5, 0.0)?.tanh()?)?
        .affine(-2.0 * beta, 4.0 * beta)?;
    let slope = numerator
        .mul(&decay)?
        .div(&decay.affine(1.0, 1.0)?.sqr()?)?;
    straight_through(&zoo_kernels::sign(xs)?, &with_gradient(xs, &slope)?)
}

/// The Learnable Activation Binarizer.
///
/// A depthwise 3x3 convolution (stride 1, SAME zero padding, two kernels and two biases per
/// channel) gives `y0, y1`; both are multiplied by the learnable scalar `beta`. The output is
/// `+1` where `beta*y1 > beta*y0` and `-1` elsewhere (ties give `-1`); the gradient is that of
/// `tanh((beta*y1 - beta*y0) / 2)`, i.e. of `2 softmax(beta*y)[1] - 1`.
///
/// Tensors: `weight` (`2C x 1 x 3 x 3`, output `2k + q` reads channel `k`), `bias` (`2C`),
/// `beta` (`1`).
///
/// [`Lab::forward`] runs the fused op [`zoo_kernels::lab`] (one pass each way); [`Lab::scores`]
/// keeps the plain composition of candle ops as a reference.
#[derive(Clone, Debug)]
pub struct Lab {
    conv: DepthwiseConv2d,
    /// The convolution's kernel and bias, the very tensors `conv` holds.
    weight: Tensor,
    bias: Tensor,
    beta: Tensor,
    pairing: LabPairing,
}

impl Lab {
    /// The depthwise convolution inside LAB.
    pub const CONV: DepthwiseConv = DepthwiseConv {
        kernel: [3, 3],
        stride: [1, 1],
        padding: Padding::Same,
        multiplier: 2,
        bias: true,
        init: Init::GlorotUniform,
    };

    /// Creates or loads the LAB tensors for an input of shape `input` under `vb`.
    pub fn new(vb: VarBuilder, input: FeatureShape, pairing: LabPairing) -> Result<Self> {
        let conv = DepthwiseConv2d::new(vb.clone(), input, &Self::CONV)?;
        // Created (or loaded) just above: these return the same tensors.
        let maps = 2 * input.channels;
        let weight = vb.get((maps, 1, 3, 3), "weight")?;
        let bias = vb.get(maps, "bias")?;
        Ok(Lab {
            conv,
            weight,
            bias,
            beta: vb.get_with_hints(1, "beta", candle_nn::Init::Const(1.0))?,
            pairing,
        })
    }

    /// The two scaled depthwise outputs `(beta*y0, beta*y1)`, each `N x C x H x W`, from the
    /// composition of candle ops (depthwise convolution, bias, `beta`, pairing): the reference
    /// that the fused [`Lab::forward`] matches bit for bit after `zoo_kernels::lab_sign(y1 - y0)`.
    pub fn scores(&self, xs: &Tensor) -> Result<(Tensor, Tensor)> {
        let (n, c, h, w) = xs.dims4()?;
        let ys = self.conv.forward(xs)?.broadcast_mul(&self.beta)?;
        let pairs = match self.pairing {
            // Output 2k + q comes from channel k: pair the two outputs of each channel.
            LabPairing::Channel => ys.reshape((n, c, 2, h, w))?.transpose(1, 2)?,
            // The official code reshapes the 2C outputs as (2, C).
            LabPairing::Official => ys.reshape((n, 2, c, h, w))?,
        };
        Ok((
            pairs.narrow(1, 0, 1)?.squeeze(1)?,
            pairs.narrow(1, 1, 1)?.squeeze(1)?,
        ))
    }

    /// The learnable scale `beta`.
    pub fn beta(&self) -> &Tensor {
        &self.beta
    }

    /// Binarizes `xs` (`N x C x H x W`) to ±1.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let pairing = match self.pairing {
            LabPairing::Channel => zoo_kernels::Pairing::Channel,
            LabPairing::Official => zoo_kernels::Pairing::Official,
        };
        zoo_kernels::lab(xs, &self.weight, &self.bias, &self.beta, pairing)
    }
}

/// An activation binarizer chosen by the spec.
#[derive(Clone, Debug)]
pub enum Binarizer {
    /// Full precision: the identity.
    None,
    /// `ste_sign` with this clip value.
    Sign(f64),
    /// ApproxSign.
    ApproxSign,
    /// SwishSign with this beta.
    SwishSign(f64),
    /// LAB.
    Lab(Lab),
}

impl Binarizer {
    /// The spec's name of this binarizer: `none`, `sign`, `approx_sign`, `swish_sign`, `lab`.
    pub fn name(&self) -> &'static str {
        match self {
            Binarizer::None => "none",
            Binarizer::Sign(_) => "sign",
            Binarizer::ApproxSign => "approx_sign",
            Binarizer::SwishSign(_) => "swish_sign",
            Binarizer::Lab(_) => "lab",
        }
    }

    /// Builds the binarizer for an input of shape `input`; LAB's tensors live under `vb`.
    pub fn new(vb: VarBuilder, input: FeatureShape, activation: &Activation) -> Result<Self> {
        Ok(match *activation {
            Activation::None => Binarizer::None,
            Activation::Sign { clip } => Binarizer::Sign(clip),
            Activation::ApproxSign => Binarizer::ApproxSign,
            Activation::SwishSign { beta } => Binarizer::SwishSign(beta),
            Activation::Lab(pairing) => Binarizer::Lab(Lab::new(vb, input, pairing)?),
        })
    }

    /// Applies the binarizer.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Binarizer::None => Ok(xs.clone()),
            Binarizer::Sign(clip) => ste_sign(xs, *clip),
            Binarizer::ApproxSign => approx_sign(xs),
            Binarizer::SwishSign(beta) => swish_sign(xs, *beta),
            Binarizer::Lab(lab) => lab.forward(xs),
        }
    }
}

//! Convolutions: the (binarized) 2D convolution and the depthwise convolution.

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

use crate::spec::{Activation, Conv, DepthwiseConv, FeatureShape, KernelQuantizer};

use super::functional::padding_amounts;
use super::{init_hint, pad2d, ste_sign, straight_through, Binarizer};

/// The effective kernel of a binarized convolution (`out x in x kh x kw`, scales per output
/// channel), with Larq's gradients.
pub fn quantize_kernel(weight: &Tensor, quantizer: &KernelQuantizer) -> Result<Tensor> {
    // |w| with TensorFlow's gradient sign(w), which is 0 at w = 0.
    let abs = |w: &Tensor| straight_through(&w.abs()?, &w.mul(&w.sign()?.detach())?);
    let mean_abs = |w: &Tensor| abs(w)?.mean_keepdim(1)?.mean_keepdim(2)?.mean_keepdim(3);
    match *quantizer {
        KernelQuantizer::None => Ok(weight.clone()),
        KernelQuantizer::SteSign { clip } => ste_sign(weight, clip),
        KernelQuantizer::MagnitudeAwareSign { clip } => mean_abs(weight)?
            .detach()
            .broadcast_mul(&ste_sign(weight, clip)?),
        KernelQuantizer::XnorWeightScale => {
            // clip_by_value: the gradient passes inside [-1, 1], bounds included.
            let inside = weight.abs()?.le(1.0)?.to_dtype(weight.dtype())?;
            let clipped =
                straight_through(&weight.clamp(-1.0, 1.0)?, &weight.mul(&inside.detach())?)?;
            mean_abs(&clipped)?.broadcast_mul(&ste_sign(&clipped, 1.0)?)
        }
    }
}

/// A 2D convolution with an optional input binarizer and kernel quantizer (Larq's
/// `QuantConv2D`): binarize the input, pad it with the spec's pad value (TensorFlow SAME), and
/// convolve with the quantized kernel.
///
/// Tensors: `weight` (`filters x in x kh x kw`), `bias` (`filters`) when enabled, and LAB's
/// tensors under `lab` when the input binarizer is LAB.
#[derive(Clone, Debug)]
pub struct QuantConv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    binarizer: Binarizer,
    config: Conv,
}

impl QuantConv2d {
    /// Creates or loads the layer for an input of shape `input`.
    pub fn new(vb: VarBuilder, input: FeatureShape, config: &Conv) -> Result<Self> {
        if config.stride[0] != config.stride[1] {
            candle_core::bail!(
                "conv {}: only equal vertical and horizontal strides are supported, found {:?}",
                vb.prefix(),
                config.stride
            );
        }
        let [kh, kw] = config.kernel;
        let c = input.channels;
        let fans = (kh * kw * c, kh * kw * config.filters);
        let weight = vb.get_with_hints(
            (config.filters, c, kh, kw),
            "weight",
            init_hint(config.init, fans),
        )?;
        let bias = match config.bias {
            true => Some(vb.get_with_hints(config.filters, "bias", candle_nn::Init::Const(0.0))?),
            false => None,
        };
        Ok(QuantConv2d {
            weight,
            bias,
            binarizer: Binarizer::new(vb.pp("lab"), input, &config.input)?,
            config: config.clone(),
        })
    }

    /// The latent (unquantized) kernel.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The binarizer of the layer's input.
    pub fn binarizer(&self) -> &Binarizer {
        &self.binarizer
    }

    /// Applies the layer to `N x C x H x W` input.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if let Some(ys) = self.binary_forward(xs)? {
            return self.add_bias(ys);
        }
        let xs = self.binarizer.forward(xs)?;
        let pads = padding_amounts(
            &xs,
            self.config.kernel,
            self.config.stride,
            self.config.padding,
        )?;
        let xs = pad2d(&xs, pads, self.config.pad_value)?;
        // Drop rows and columns no window reaches (VALID with a stride), so that candle's
        // convolution backward sees the same remainder in both directions.
        let [kh, kw] = self.config.kernel;
        let s = self.config.stride[0];
        let (_, _, h, w) = xs.dims4()?;
        if h < kh || w < kw {
            candle_core::bail!("conv: a {kh}x{kw} kernel does not fit a padded {h}x{w} input");
        }
        let xs = xs
            .narrow(2, 0, (h - kh) / s * s + kh)?
            .narrow(3, 0, (w - kw) / s * s + kw)?;
        let kernel = quantize_kernel(&self.weight, &self.config.kernel_quantizer)?;
        let ys = conv2d(&xs, &kernel, self.config.stride)?;
        self.add_bias(ys)
    }

    fn add_bias(&self, ys: Tensor) -> Result<Tensor> {
        match &self.bias {
            Some(b) => ys.broadcast_add(&b.reshape((1, (), 1, 1))?),
            None => Ok(ys),
        }
    }

    /// The convolution as one [`zoo_kernels::binary_conv2d`] (exact bit-packed forward, GEMM
    /// backward with the straight-through masks fused) when the layer is one it covers: a
    /// binary input, a `ste_sign` or magnitude-aware kernel, pad value 0 or 1, f32 or f64 on
    /// the CPU or a CUDA GPU. `None` otherwise (the caller then takes the general path).
    fn binary_forward(&self, xs: &Tensor) -> Result<Option<Tensor>> {
        let cfg = &self.config;
        let (kernel_clip, magnitude) = match cfg.kernel_quantizer {
            KernelQuantizer::SteSign { clip } => (clip, false),
            KernelQuantizer::MagnitudeAwareSign { clip } => (clip, true),
            KernelQuantizer::None | KernelQuantizer::XnorWeightScale => return Ok(None),
        };
        let covered = (xs.device().is_cpu() || xs.device().is_cuda())
            && matches!(xs.dtype(), DType::F32 | DType::F64)
            && xs.dtype() == self.weight.dtype()
            && (cfg.pad_value == 0.0 || cfg.pad_value == 1.0);
        let (xs, input_clip) = match cfg.input {
            _ if !covered => return Ok(None),
            Activation::None => return Ok(None),
            // The op binarizes the input itself, with this straight-through mask.
            Activation::Sign { clip } => (xs.clone(), Some(clip)),
            // Other binarizers bring their own gradient: the op sees their ±1 output.
            Activation::ApproxSign | Activation::SwishSign { .. } | Activation::Lab(_) => {
                (self.binarizer.forward(xs)?, None)
            }
        };
        let pads = padding_amounts(&xs, cfg.kernel, cfg.stride, cfg.padding)?;
        let conv = zoo_kernels::BinaryConv2d {
            stride: cfg.stride,
            pads,
            pad_value: cfg.pad_value,
            input_clip,
            kernel_clip,
        };
        let ys = zoo_kernels::binary_conv2d(&xs, &self.weight, &conv)?;
        if !magnitude {
            return Ok(Some(ys));
        }
        // Bi-Real Net's scale: mean |w| per output channel, without gradient.
        let scale = self.weight.detach().abs()?.flatten_from(1)?.mean(1)?;
        Ok(Some(ys.broadcast_mul(&scale.reshape((1, (), 1, 1))?)?))
    }
}

/// Largest im2col matrix (elements) [`conv2d`] builds in host memory (256 MiB of f32); larger
/// convolutions use candle's own.
const MAX_PATCH_ELEMENTS: usize = 1 << 26;

/// [`MAX_PATCH_ELEMENTS`] on a GPU (4 GiB of f32), where candle's convolution has a slow
/// backward pass (a direct transposed convolution).
const MAX_GPU_PATCH_ELEMENTS: usize = 1 << 30;

/// A VALID convolution of an already padded input: im2col + GEMM (fast forward and backward)
/// while the patch matrix stays below [`MAX_PATCH_ELEMENTS`] ([`MAX_GPU_PATCH_ELEMENTS`] on a
/// GPU), candle's convolution beyond.
pub fn conv2d(xs: &Tensor, kernel: &Tensor, stride: [usize; 2]) -> Result<Tensor> {
    let (n, c, h, w) = xs.dims4()?;
    let (_, _, kh, kw) = kernel.dims4()?;
    let patches = n * ((h - kh) / stride[0] + 1) * ((w - kw) / stride[1] + 1) * c * kh * kw;
    let limit = match xs.device().is_cuda() {
        true => MAX_GPU_PATCH_ELEMENTS,
        false => MAX_PATCH_ELEMENTS,
    };
    if patches <= limit {
        zoo_kernels::conv2d_gemm(xs, kernel, stride)
    } else {
        xs.conv2d(kernel, 0, stride[0], 1, 1)
    }
}

/// Depthwise convolution of an already padded `N x C x H x W` input with a `C x 1 x kh x kw`
/// kernel (VALID, stride `[sy, sx]`), as direct loops forward and backward
/// ([`zoo_kernels::depthwise_conv2d`]).
pub fn depthwise_conv2d(xs: &Tensor, kernel: &Tensor, stride: [usize; 2]) -> Result<Tensor> {
    zoo_kernels::depthwise_conv2d(xs, kernel, stride)
}

/// A depthwise 2D convolution (Keras' `DepthwiseConv2D`), zero padding.
///
/// Tensors: `weight` (`C*multiplier x 1 x kh x kw`, output `k*multiplier + q` reads channel
/// `k`) and `bias` when enabled.
#[derive(Clone, Debug)]
pub struct DepthwiseConv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    config: DepthwiseConv,
}

impl DepthwiseConv2d {
    /// Creates or loads the layer for an input of shape `input`.
    pub fn new(vb: VarBuilder, input: FeatureShape, config: &DepthwiseConv) -> Result<Self> {
        let [kh, kw] = config.kernel;
        let out = input.channels * config.multiplier;
        let fans = (kh * kw * input.channels, kh * kw * config.multiplier);
        let weight = vb.get_with_hints((out, 1, kh, kw), "weight", init_hint(config.init, fans))?;
        let bias = match config.bias {
            true => Some(vb.get_with_hints(out, "bias", candle_nn::Init::Const(0.0))?),
            false => None,
        };
        Ok(DepthwiseConv2d {
            weight,
            bias,
            config: config.clone(),
        })
    }

    /// Applies the layer to `N x C x H x W` input.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = xs.dims4()?;
        let m = self.config.multiplier;
        let xs = match m {
            1 => xs.clone(),
            _ => xs
                .unsqueeze(2)?
                .broadcast_as((n, c, m, h, w))?
                .reshape((n, c * m, h, w))?,
        };
        let pads = padding_amounts(
            &xs,
            self.config.kernel,
            self.config.stride,
            self.config.padding,
        )?;
        let ys = depthwise_conv2d(&pad2d(&xs, pads, 0.0)?, &self.weight, self.config.stride)?;
        match &self.bias {
            Some(b) => ys.broadcast_add(&b.reshape((1, (), 1, 1))?),
            None => Ok(ys),
        }
    }
}

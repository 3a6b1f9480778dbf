//! Per-channel layers (PReLU, learnable bias) and the dense layer.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::spec::{Dense as Config, FeatureShape, PRelu as PReluConfig};

use super::init_hint;

/// Parametric ReLU, one slope per channel shared over height and width (Keras' `PReLU` with
/// `shared_axes=[1, 2]`): `relu(x) - alpha * relu(-x)`. Tensor: `weight` (alpha, `C`).
#[derive(Clone, Debug)]
pub struct PRelu {
    alpha: Tensor,
}

impl PRelu {
    /// Creates or loads the layer for an input of shape `input`.
    pub fn new(vb: VarBuilder, input: FeatureShape, config: &PReluConfig) -> Result<Self> {
        let alpha = vb.get_with_hints(
            input.channels,
            "weight",
            candle_nn::Init::Const(config.alpha),
        )?;
        Ok(PRelu { alpha })
    }

    /// Applies the layer.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        zoo_kernels::prelu(xs, &self.alpha)
    }
}

/// A learnable per-channel bias added to the input (ReActNet's "LearnableBias"). Tensor: `bias`.
#[derive(Clone, Debug)]
pub struct Bias {
    bias: Tensor,
}

impl Bias {
    /// Creates or loads the layer for an input of shape `input`.
    pub fn new(vb: VarBuilder, input: FeatureShape) -> Result<Self> {
        Ok(Bias {
            bias: vb.get_with_hints(input.channels, "bias", candle_nn::Init::Const(0.0))?,
        })
    }

    /// Applies the layer.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        zoo_kernels::channel_bias(xs, &self.bias)
    }
}

/// A fully connected layer on `N x C x 1 x 1` input, giving `N x units x 1 x 1`.
/// Tensors: `weight` (`units x C`), `bias` (`units`) when enabled.
#[derive(Clone, Debug)]
pub struct Dense {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Dense {
    /// Creates or loads the layer for an input of shape `input` and `classes` classes.
    pub fn new(
        vb: VarBuilder,
        input: FeatureShape,
        config: &Config,
        classes: usize,
    ) -> Result<Self> {
        let units = config.units.resolve(classes);
        let c = input.channels;
        let weight = vb.get_with_hints((units, c), "weight", init_hint(config.init, (c, units)))?;
        let bias = match config.bias {
            true => Some(vb.get_with_hints(units, "bias", candle_nn::Init::Const(0.0))?),
            false => None,
        };
        Ok(Dense { weight, bias })
    }

    /// Applies the layer.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let n = xs.dim(0)?;
        let ys = xs.flatten_from(1)?.matmul(&self.weight.t()?)?;
        let ys = match &self.bias {
            Some(b) => ys.broadcast_add(b)?,
            None => ys,
        };
        ys.reshape((n, (), 1, 1))
    }
}

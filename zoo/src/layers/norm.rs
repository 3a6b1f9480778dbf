//! Batch normalisation with Keras semantics.

use candle_core::{Result, Tensor, Var};
use candle_nn::VarBuilder;

use crate::spec::{BatchNorm as Config, FeatureShape};

/// Keras' fused batch norm never uses an epsilon below this (a cuDNN requirement).
pub(crate) const MIN_EPSILON: f64 = 1.001e-5;

/// Batch normalisation as Keras' (fused, 4D) `BatchNormalization` computes it.
///
/// Training normalises with the batch mean and biased variance and updates
/// `moving = moving * momentum + batch * (1 - momentum)`, where the variance used for the update
/// is the unbiased one (`n / (n - 1)`); inference uses the moving statistics. Epsilon is at least
/// `1.001e-5`, as in Keras.
///
/// Tensors: `weight` (gamma, when `scale`), `bias` (beta, when `center`), `running_mean`,
/// `running_var`.
#[derive(Clone, Debug)]
pub struct BatchNorm {
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    running_mean: Var,
    running_var: Var,
    momentum: f64,
    epsilon: f64,
}

impl BatchNorm {
    /// Creates or loads the layer for an input of shape `input`.
    pub fn new(vb: VarBuilder, input: FeatureShape, config: &Config) -> Result<Self> {
        let c = input.channels;
        let get =
            |name: &str, value: f64| vb.get_with_hints(c, name, candle_nn::Init::Const(value));
        Ok(BatchNorm {
            weight: config.scale.then(|| get("weight", 1.0)).transpose()?,
            bias: config.center.then(|| get("bias", 0.0)).transpose()?,
            running_mean: Var::from_tensor(&get("running_mean", 0.0)?)?,
            running_var: Var::from_tensor(&get("running_var", 1.0)?)?,
            momentum: config.momentum,
            epsilon: config.epsilon.max(MIN_EPSILON),
        })
    }

    /// The moving mean.
    pub fn running_mean(&self) -> &Tensor {
        self.running_mean.as_tensor()
    }

    /// The moving variance.
    pub fn running_var(&self) -> &Tensor {
        self.running_var.as_tensor()
    }

    /// Normalises `N x C x H x W` input; in training also updates the moving statistics.
    pub fn forward(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        if train {
            let c = xs.dim(1)?;
            let ones;
            let zeros;
            let gamma = match &self.weight {
                Some(g) => g,
                None => {
                    ones = Tensor::ones(c, xs.dtype(), xs.device())?;
                    &ones
                }
            };
            let beta = match &self.bias {
                Some(b) => b,
                None => {
                    zeros = Tensor::zeros(c, xs.dtype(), xs.device())?;
                    &zeros
                }
            };
            let (ys, mean, var) = zoo_kernels::batch_norm_train(xs, gamma, beta, self.epsilon)?;
            let (n, _, h, w) = xs.dims4()?;
            let count = (n * h * w) as f64;
            let unbiased = var.affine(count / (count - 1.0).max(1.0), 0.0)?;
            let m = self.momentum;
            for (moving, batch) in [(&self.running_mean, &mean), (&self.running_var, &unbiased)] {
                moving.set(&(moving.as_tensor().affine(m, 0.0)? + batch.affine(1.0 - m, 0.0)?)?)?;
            }
            return Ok(ys);
        }
        let channel = |t: &Tensor| t.reshape((1, (), 1, 1));
        let std = self
            .running_var
            .as_tensor()
            .affine(1.0, self.epsilon)?
            .sqrt()?;
        let ys = xs
            .broadcast_sub(&channel(self.running_mean.as_tensor())?)?
            .broadcast_div(&channel(&std)?)?;
        let ys = match &self.weight {
            Some(g) => ys.broadcast_mul(&channel(g)?)?,
            None => ys,
        };
        match &self.bias {
            Some(b) => ys.broadcast_add(&channel(b)?),
            None => Ok(ys),
        }
    }
}

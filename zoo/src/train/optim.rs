//! Adam and AdamW over named variables, with Keras' update rule and a saveable state.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use zoo_kernels::{adam_step, AdamStep};

use crate::spec::Optimizer;

pub use zoo_kernels::{BETA1, BETA2, EPSILON};

/// A trainable tensor and what the optimizer does with it.
pub struct Slot {
    /// The tensor's name in the model.
    pub name: String,
    /// The tensor.
    pub var: Var,
    /// Clip to `[-c, c]` after every step (the spec's `weight_clip`).
    pub clip: Option<f64>,
    /// Add `l2 * w^2` to the loss (Keras `kernel_regularizer`), through its gradient `2 l2 w`.
    pub l2: f64,
    /// The first-moment estimate, then the second, stacked: `[2, ..the tensor's shape]`, on
    /// the tensor's device (see [`Slot::moments`]).
    pub moments: Tensor,
}

impl Slot {
    /// The stacked moments of `var` from the first (`m`) and second (`v`) estimates, or zeros.
    pub fn moments(var: &Var, resumed: Option<(&Tensor, &Tensor)>) -> candle_core::Result<Tensor> {
        match resumed {
            Some((m, v)) => {
                let (dev, dtype) = (var.device(), var.dtype());
                Tensor::stack(&[m.to_dtype(dtype)?, v.to_dtype(dtype)?], 0)?.to_device(dev)
            }
            None => {
                let dims: Vec<usize> = [2].iter().chain(var.dims()).copied().collect();
                Tensor::zeros(dims, var.dtype(), var.device())
            }
        }
    }

    /// The first-moment estimate.
    pub fn m(&self) -> candle_core::Result<Tensor> {
        self.moments.get(0)
    }

    /// The second-moment estimate.
    pub fn v(&self) -> candle_core::Result<Tensor> {
        self.moments.get(1)
    }
}

/// Adam (Keras' form: `w -= lr * sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps)`), or AdamW with
/// decoupled decay `w -= lr * weight_decay * w` before the Adam update.
pub struct Adam {
    /// Adam or AdamW.
    pub kind: Optimizer,
    /// Decoupled weight decay (AdamW).
    pub weight_decay: f64,
    /// The variables, in a fixed order.
    pub slots: Vec<Slot>,
    /// Steps taken.
    pub t: u64,
}

impl Adam {
    /// Applies one update with learning rate `lr` from `grads`, then clips, in place on each
    /// tensor's device (`zoo_kernels::adam_step`). Variables without a gradient (unused by the
    /// loss) are left alone.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> candle_core::Result<()> {
        self.t += 1;
        let t = self.t as i32;
        let alpha = lr * (1.0 - BETA2.powi(t)).sqrt() / (1.0 - BETA1.powi(t));
        let decay = match self.kind {
            Optimizer::AdamW => 1.0 - lr * self.weight_decay,
            Optimizer::Adam => 1.0,
        };
        for slot in &self.slots {
            let Some(grad) = grads.get(slot.var.as_tensor()) else {
                continue;
            };
            let step = AdamStep {
                alpha,
                decay,
                l2: slot.l2,
                clip: slot.clip.unwrap_or(f64::INFINITY),
            };
            adam_step(
                slot.var.as_tensor(),
                &grad.to_dtype(slot.var.dtype())?,
                &slot.moments,
                step,
            )?;
        }
        Ok(())
    }
}

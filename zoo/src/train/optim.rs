//! Adam and AdamW over named variables, with Keras' update rule and a saveable state.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::spec::Optimizer;

/// Keras' Adam defaults.
pub const BETA1: f64 = 0.9;
/// Keras' Adam defaults.
pub const BETA2: f64 = 0.999;
/// Keras' Adam epsilon (added to `sqrt(v)` after bias correction).
pub const EPSILON: f64 = 1e-7;

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
    /// First-moment estimate.
    pub m: Tensor,
    /// Second-moment estimate.
    pub v: Tensor,
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
    /// Applies one update with learning rate `lr` from `grads`, then clips. Variables without
    /// a gradient (unused by the loss) are left alone.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> candle_core::Result<()> {
        self.t += 1;
        let t = self.t as i32;
        let alpha = lr * (1.0 - BETA2.powi(t)).sqrt() / (1.0 - BETA1.powi(t));
        for slot in &mut self.slots {
            let Some(grad) = grads.get(slot.var.as_tensor()) else {
                continue;
            };
            let w = slot.var.as_tensor();
            let grad = if slot.l2 > 0.0 {
                (grad + (w * (2.0 * slot.l2))?)?
            } else {
                grad.clone()
            };
            slot.m = ((&slot.m * BETA1)? + (&grad * (1.0 - BETA1))?)?;
            slot.v = ((&slot.v * BETA2)? + (grad.sqr()? * (1.0 - BETA2))?)?;
            let mut w = w.clone();
            if self.kind == Optimizer::AdamW && self.weight_decay > 0.0 {
                w = (&w * (1.0 - lr * self.weight_decay))?;
            }
            let update = ((&slot.m * alpha)? / (slot.v.sqrt()? + EPSILON)?)?;
            let mut w = (w - update)?;
            if let Some(c) = slot.clip {
                w = w.clamp(-c, c)?;
            }
            slot.var.set(&w)?;
        }
        Ok(())
    }
}

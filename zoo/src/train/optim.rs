//! Adam and AdamW over named variables, with Keras' update rule and a saveable state.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use rayon::prelude::*;

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
        let decay = match self.kind {
            Optimizer::AdamW => 1.0 - lr * self.weight_decay,
            Optimizer::Adam => 1.0,
        };
        for slot in &mut self.slots {
            let Some(grad) = grads.get(slot.var.as_tensor()) else {
                continue;
            };
            match slot.var.dtype() {
                DType::F32 => update::<f32>(slot, grad, alpha, decay)?,
                DType::F64 => update::<f64>(slot, grad, alpha, decay)?,
                other => candle_core::bail!("adam: expected f32 or f64 weights, found {other:?}"),
            }
        }
        Ok(())
    }
}

/// One slot's update in the tensors' own dtype, each element computed in f64 (the values and
/// roundings are those of converting to f64 and back, without the converted copies).
fn update<T: candle_core::WithDType>(
    slot: &mut Slot,
    grad: &Tensor,
    alpha: f64,
    decay: f64,
) -> candle_core::Result<()> {
    let read = |t: &Tensor| t.flatten_all()?.to_vec1::<T>();
    let shape = slot.var.shape().clone();
    let mut w = read(slot.var.as_tensor())?;
    let g = read(&grad.to_dtype(T::DTYPE)?)?;
    let mut m = read(&slot.m)?;
    let mut v = read(&slot.v)?;
    let (l2, clip) = (slot.l2, slot.clip.unwrap_or(f64::INFINITY));
    const CHUNK: usize = 1 << 14;
    w.par_chunks_mut(CHUNK)
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK))
        .for_each(|(((w, m), v), g)| {
            for i in 0..w.len() {
                let wi = w[i].to_f64();
                let g = g[i].to_f64() + 2.0 * l2 * wi;
                let mi = BETA1 * m[i].to_f64() + (1.0 - BETA1) * g;
                let vi = BETA2 * v[i].to_f64() + (1.0 - BETA2) * g * g;
                let updated = wi * decay - alpha * mi / (vi.sqrt() + EPSILON);
                m[i] = T::from_f64(mi);
                v[i] = T::from_f64(vi);
                w[i] = T::from_f64(updated.clamp(-clip, clip));
            }
        });
    let dev = slot.var.device().clone();
    slot.var.set(&Tensor::from_vec(w, shape.clone(), &dev)?)?;
    slot.m = Tensor::from_vec(m, shape.clone(), &dev)?;
    slot.v = Tensor::from_vec(v, shape, &dev)?;
    Ok(())
}

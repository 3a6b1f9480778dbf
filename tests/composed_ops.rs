//! The composition of candle ops that a GPU runs in place of a fused CPU kernel (the binary
//! convolution's backward pass as GEMMs on im2col patches), checked on the CPU: a whole
//! training step of every registered model with it against the same step with the fused
//! kernels (the step and its tolerances: `support/training_step.rs`). The GPU runs it with
//! our im2col kernels and cuBLAS; `gpu_training` checks that on a GPU.

#[path = "support/training_step.rs"]
mod training_step;

use candle_core::{Device, Result};
use training_step::Side;

#[test]
fn a_training_step_with_the_composed_ops_matches_the_fused_kernels() -> Result<()> {
    training_step::every_model_matches(&Side {
        device: Device::Cpu,
        composed: true,
    })
}

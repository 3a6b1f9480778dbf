//! The compositions of candle ops that a GPU runs in place of fused CPU kernels (batch norm, the
//! GEMM convolution, the binary convolution's backward pass), checked on the CPU: a whole
//! training step of every registered model with them against the same step with the fused
//! kernels (the step and its tolerances: `support/training_step.rs`). The GPU runs these
//! compositions with candle's CUDA ops; `gpu_training` checks those on a GPU.

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

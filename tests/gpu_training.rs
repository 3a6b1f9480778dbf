//! A whole training step of every registered model on the GPU against the same step on the
//! CPU (feature `cuda`; the step and its tolerances: `support/training_step.rs`).
//!
//! Without a GPU the test prints why it did not run and passes. Build and run with
//! `kernels/cuda/build.sh test --release --features cuda -p zoo --test gpu_training`.
#![cfg(feature = "cuda")]

#[path = "support/training_step.rs"]
mod training_step;

use candle_core::Result;
use training_step::Side;

#[test]
fn a_training_step_of_every_registered_model_on_the_gpu_matches_the_cpu() -> Result<()> {
    match zoo::device::parse("cuda") {
        Ok(device) => training_step::every_model_matches(&Side {
            device,
            composed: false,
        }),
        Err(e) => {
            println!("skipped: {e}");
            Ok(())
        }
    }
}

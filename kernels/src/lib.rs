//! Compute kernels of the zoo, exposed to candle as custom ops.
//!
//! CPU kernels for the operations whose exact semantics candle does not offer:
//! - [`sign`]: Larq's `sign`, `+1` for `x >= 0` and `-1` otherwise (never 0);
//! - [`lab_sign`]: LAB's strict threshold of the score difference with its `tanh` surrogate;
//! - [`ste_sign`]: `sign` with Larq's straight-through gradient `1{|x| <= clip}`, fused;
//! - [`approx_sign`]: `sign` with Bi-Real Net's gradient `2 - 2|x|` inside `[-1, 1]`, fused;
//! - [`max_pool2d`] and [`avg_pool2d`]: pooling with explicit (TensorFlow SAME) padding, whose
//!   backward passes follow TensorFlow: the max-pool gradient goes to the first maximum of each
//!   window, the average over a SAME window counts only the pixels inside the image.
//!
//! - [`batch_norm_train`]: batch normalisation with batch statistics, fused forward and backward;
//! - [`unfold`] (im2col) with its adjoint as gradient, and [`conv2d_gemm`]: convolution as one
//!   matrix multiply, so that training convolutions use candle's GEMM forward and backward.
//! - [`depthwise_conv2d`]: depthwise convolution (VALID, strided) as direct loops, with both
//!   gradients (input and kernel) as direct loops too.
//! - [`packed`]: candle-free bit-packed XNOR-popcount kernels (binary convolution, LAB, max
//!   pooling) for CPU inference.
//! - [`lab`]: the Learnable Activation Binarizer (depthwise 3x3 pair, scale, strict threshold)
//!   fused into one op, with all four gradients (input, kernel, bias, beta) in one backward op.
//! - [`adam_step`]: the fused Adam (and AdamW) update of a weight and its moments, in place.
//! - [`binary_conv2d`]: the training-time binary convolution, bit-packed exact forward and GEMM
//!   backward with the straight-through masks fused.
//! - [`channel_bias`] and [`prelu`]: a learnable bias per channel and the parametric ReLU, whose
//!   parameters' gradients sum each channel's planes contiguously (on the CPU).
//!
//! Every op works on `f32` and `f64` tensors in NCHW layout. With the `cuda` feature, the
//! binarizers, LAB, the binary convolution's forward pass, the depthwise convolution, pooling,
//! batch norm, im2col and its adjoint, and the Adam update also run on NVIDIA GPUs through the
//! zoo's own kernels (`kernels/cuda/*.cu`, compiled by NVRTC at run time); the GEMMs run there
//! on candle's matrix multiply (cuBLAS).

mod adam;
mod batch_norm;
mod binary_conv;
mod channel;
#[cfg(feature = "cuda")]
mod cuda;
mod depthwise;
mod lab;
mod pool;
mod sign;
mod unfold;

pub mod packed;

pub use adam::{adam_step, AdamStep, BETA1, BETA2, EPSILON};
pub use batch_norm::batch_norm_train;
pub use binary_conv::{binary_conv2d, BinaryConv2d};
pub use channel::{channel_bias, prelu};
pub use depthwise::depthwise_conv2d;
pub use lab::{lab, Pairing};
pub use pool::{avg_pool2d, max_pool2d, Pool2d};
pub use sign::{approx_sign, lab_sign, sign, ste_sign};
pub use unfold::{conv2d_gemm, unfold};

/// Set by [`compose_on_cpu`].
static COMPOSED_ON_CPU: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes the CPU run the composition of candle ops that the GPU runs in place of a fused CPU
/// kernel (the binary convolution's backward pass: GEMMs on im2col patches), process-wide, so
/// that a test can check it against the fused kernel without a GPU. Ops that have kernels of
/// their own on both devices are unaffected.
pub fn compose_on_cpu(on: bool) {
    COMPOSED_ON_CPU.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether ops on `dev` run their fused CPU kernels: on the CPU unless [`compose_on_cpu`] says
/// otherwise.
pub fn fused_on(dev: &candle_core::Device) -> bool {
    dev.is_cpu() && !COMPOSED_ON_CPU.load(std::sync::atomic::Ordering::Relaxed)
}

/// The storage of a CPU tensor as a contiguous slice of `T`, or an error naming the op.
fn contiguous_slice<'a, T: candle_core::WithDType>(
    op: &str,
    storage: &'a candle_core::CpuStorage,
    layout: &candle_core::Layout,
) -> candle_core::Result<&'a [T]> {
    let data = storage.as_slice::<T>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: the input must be contiguous"),
    }
}

/// Runs `f32_op` or `f64_op` on a contiguous f32 or f64 tensor, naming `op` in errors.
fn dispatch1(
    op: &str,
    (s, l): (&candle_core::CpuStorage, &candle_core::Layout),
    f32_op: impl FnOnce(&[f32]) -> Vec<f32>,
    f64_op: impl FnOnce(&[f64]) -> Vec<f64>,
) -> candle_core::Result<candle_core::CpuStorage> {
    use candle_core::{backend::BackendStorage, CpuStorage, DType};
    Ok(match s.dtype() {
        DType::F32 => CpuStorage::F32(f32_op(contiguous_slice(op, s, l)?)),
        DType::F64 => CpuStorage::F64(f64_op(contiguous_slice(op, s, l)?)),
        other => candle_core::bail!("{op}: expected f32 or f64, found {other:?}"),
    })
}

/// [`dispatch1`] for two tensors of the same dtype.
fn dispatch2(
    op: &str,
    (s1, l1): (&candle_core::CpuStorage, &candle_core::Layout),
    (s2, l2): (&candle_core::CpuStorage, &candle_core::Layout),
    f32_op: impl FnOnce(&[f32], &[f32]) -> Vec<f32>,
    f64_op: impl FnOnce(&[f64], &[f64]) -> Vec<f64>,
) -> candle_core::Result<candle_core::CpuStorage> {
    use candle_core::{backend::BackendStorage, CpuStorage, DType};
    Ok(match (s1.dtype(), s2.dtype()) {
        (DType::F32, DType::F32) => CpuStorage::F32(f32_op(
            contiguous_slice(op, s1, l1)?,
            contiguous_slice(op, s2, l2)?,
        )),
        (DType::F64, DType::F64) => CpuStorage::F64(f64_op(
            contiguous_slice(op, s1, l1)?,
            contiguous_slice(op, s2, l2)?,
        )),
        (a, b) => {
            candle_core::bail!("{op}: expected two f32 or two f64 tensors, found {a:?} and {b:?}")
        }
    })
}

/// [`dispatch1`] for three tensors of the same dtype.
fn dispatch3(
    op: &str,
    (s1, l1): (&candle_core::CpuStorage, &candle_core::Layout),
    (s2, l2): (&candle_core::CpuStorage, &candle_core::Layout),
    (s3, l3): (&candle_core::CpuStorage, &candle_core::Layout),
    f32_op: impl FnOnce(&[f32], &[f32], &[f32]) -> Vec<f32>,
    f64_op: impl FnOnce(&[f64], &[f64], &[f64]) -> Vec<f64>,
) -> candle_core::Result<candle_core::CpuStorage> {
    use candle_core::{backend::BackendStorage, CpuStorage, DType};
    Ok(match (s1.dtype(), s2.dtype(), s3.dtype()) {
        (DType::F32, DType::F32, DType::F32) => CpuStorage::F32(f32_op(
            contiguous_slice(op, s1, l1)?,
            contiguous_slice(op, s2, l2)?,
            contiguous_slice(op, s3, l3)?,
        )),
        (DType::F64, DType::F64, DType::F64) => CpuStorage::F64(f64_op(
            contiguous_slice(op, s1, l1)?,
            contiguous_slice(op, s2, l2)?,
            contiguous_slice(op, s3, l3)?,
        )),
        (a, b, c) => candle_core::bail!(
            "{op}: expected three f32 or three f64 tensors, found {a:?}, {b:?} and {c:?}"
        ),
    })
}

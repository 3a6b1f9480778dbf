//! The fused Adam update, in place: Keras' rule (`epsilon` added to `sqrt(v)` after the bias
//! correction, folded into the step size), with an L2 penalty through its gradient, AdamW's
//! decoupled decay and a weight clip.
//!
//! Two in-place ops over contiguous tensors, each element computed in f64 and stored in the
//! tensors' own dtype:
//! 1. the moments `[m; v]` (one tensor of twice the weight's elements): with
//!    `g' = g + 2 l2 w`, `m = b1 m + (1 - b1) g'` and `v = b2 v + (1 - b2) g'^2`;
//! 2. the weight: `w = clamp(decay w - alpha m / (sqrt(v) + eps), -clip, clip)`.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Tensor, WithDType};
use rayon::prelude::*;

/// Keras' Adam defaults.
pub const BETA1: f64 = 0.9;
/// Keras' Adam defaults.
pub const BETA2: f64 = 0.999;
/// Keras' Adam epsilon (added to `sqrt(v)` after bias correction).
pub const EPSILON: f64 = 1e-7;

/// Elements per parallel task on the CPU.
const CHUNK: usize = 1 << 14;

/// One Adam step of one tensor.
#[derive(Clone, Copy, Debug)]
pub struct AdamStep {
    /// The step size with the bias corrections folded in: `lr sqrt(1 - b2^t) / (1 - b1^t)`.
    pub alpha: f64,
    /// The factor on the weight before the update: `1 - lr weight_decay` (AdamW), else 1.
    pub decay: f64,
    /// The L2 penalty `l2 w^2` added to the loss (Keras' `kernel_regularizer`).
    pub l2: f64,
    /// The weight is clipped to `[-clip, clip]` after the update (infinite: no clip).
    pub clip: f64,
}

/// Updates `weight` and `moments` (`[m; v]`, of twice the weight's elements, any shape) in place
/// from `grad`. All three must have one dtype (f32 or f64), on one device.
pub fn adam_step(weight: &Tensor, grad: &Tensor, moments: &Tensor, step: AdamStep) -> Result<()> {
    let n = weight.elem_count();
    if grad.elem_count() != n || moments.elem_count() != 2 * n {
        candle_core::bail!(
            "adam: a weight of {:?} needs a gradient of its shape and moments of twice its \
             elements, found {:?} and {:?}",
            weight.shape(),
            grad.shape(),
            moments.shape()
        );
    }
    if !weight.is_contiguous() || !moments.is_contiguous() {
        candle_core::bail!("adam: the weight and the moments must be contiguous");
    }
    let grad = grad.contiguous()?;
    moments.inplace_op3(&grad, weight, &Moments { l2: step.l2 })?;
    weight.inplace_op2(moments, &Weights(step))
}

/// `f()` compiled for AVX-512 or AVX2 where the CPU has them, so that its element-wise loops
/// (f64 division and square root above all) run on vectors of that width. The same IEEE
/// operations in the same order: the results do not depend on the width.
#[inline(always)]
fn vectorized(f: impl FnOnce()) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512(f: impl FnOnce()) {
            f()
        }
        #[target_feature(enable = "avx2")]
        unsafe fn avx2(f: impl FnOnce()) {
            f()
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512 F.
            return unsafe { avx512(f) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// Step 1: the moments from the gradient (and the weight, for the L2 term).
struct Moments {
    l2: f64,
}

impl Moments {
    fn update<T: WithDType>(&self, mv: &mut [T], g: &[T], w: &[T]) {
        let (m, v) = mv.split_at_mut(w.len());
        m.par_chunks_mut(CHUNK)
            .zip(v.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK).zip(w.par_chunks(CHUNK)))
            .for_each(|((m, v), (g, w))| {
                vectorized(
                    #[inline(always)]
                    || {
                        for ((m, v), (g, w)) in m.iter_mut().zip(v).zip(g.iter().zip(w)) {
                            let g = g.to_f64() + 2.0 * self.l2 * w.to_f64();
                            *m = T::from_f64(BETA1 * m.to_f64() + (1.0 - BETA1) * g);
                            *v = T::from_f64(BETA2 * v.to_f64() + (1.0 - BETA2) * g * g);
                        }
                    },
                )
            });
    }
}

impl candle_core::InplaceOp3 for Moments {
    fn name(&self) -> &'static str {
        "adam-moments"
    }

    fn cpu_fwd(
        &self,
        mv: &mut CpuStorage,
        lmv: &Layout,
        g: &CpuStorage,
        lg: &Layout,
        w: &CpuStorage,
        lw: &Layout,
    ) -> Result<()> {
        let range = |l: &Layout| l.contiguous_offsets().expect("adam: checked contiguous");
        let ((a, b), (ga, gb), (wa, wb)) = (range(lmv), range(lg), range(lw));
        match (mv, g, w) {
            (CpuStorage::F32(mv), CpuStorage::F32(g), CpuStorage::F32(w)) => {
                self.update(&mut mv[a..b], &g[ga..gb], &w[wa..wb])
            }
            (CpuStorage::F64(mv), CpuStorage::F64(g), CpuStorage::F64(w)) => {
                self.update(&mut mv[a..b], &g[ga..gb], &w[wa..wb])
            }
            (mv, g, w) => candle_core::bail!(
                "adam: expected f32 or f64 moments, gradient and weight of one dtype, found \
                 {:?}, {:?} and {:?}",
                mv.dtype(),
                g.dtype(),
                w.dtype()
            ),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        mv: &mut candle_core::CudaStorage,
        lmv: &Layout,
        g: &candle_core::CudaStorage,
        lg: &Layout,
        w: &candle_core::CudaStorage,
        lw: &Layout,
    ) -> Result<()> {
        gpu::moments(self.l2, (mv, lmv), (g, lg), (w, lw))
    }
}

/// Step 2: the weight from the moments.
struct Weights(AdamStep);

impl Weights {
    fn update<T: WithDType>(&self, w: &mut [T], mv: &[T]) {
        let AdamStep {
            alpha, decay, clip, ..
        } = self.0;
        assert!(clip >= 0.0, "adam: a clip of {clip}");
        let (m, v) = mv.split_at(w.len());
        w.par_chunks_mut(CHUNK)
            .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
            .for_each(|(w, (m, v))| {
                vectorized(
                    #[inline(always)]
                    || {
                        for (w, (m, v)) in w.iter_mut().zip(m.iter().zip(v)) {
                            let step = alpha * m.to_f64() / (v.to_f64().sqrt() + EPSILON);
                            // `f64::clamp` without its check of the bounds, which is done once
                            // above and would stop the loop from vectorizing here.
                            let x = decay * w.to_f64() - step;
                            let x = if x < -clip { -clip } else { x };
                            *w = T::from_f64(if x > clip { clip } else { x });
                        }
                    },
                )
            });
    }
}

impl candle_core::InplaceOp2 for Weights {
    fn name(&self) -> &'static str {
        "adam-weights"
    }

    fn cpu_fwd(
        &self,
        w: &mut CpuStorage,
        lw: &Layout,
        mv: &CpuStorage,
        lmv: &Layout,
    ) -> Result<()> {
        let range = |l: &Layout| l.contiguous_offsets().expect("adam: checked contiguous");
        let ((a, b), (ma, mb)) = (range(lw), range(lmv));
        match (w, mv) {
            (CpuStorage::F32(w), CpuStorage::F32(mv)) => self.update(&mut w[a..b], &mv[ma..mb]),
            (CpuStorage::F64(w), CpuStorage::F64(mv)) => self.update(&mut w[a..b], &mv[ma..mb]),
            (w, mv) => candle_core::bail!(
                "adam: expected an f32 or f64 weight and moments of one dtype, found {:?} and {:?}",
                w.dtype(),
                mv.dtype()
            ),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        w: &mut candle_core::CudaStorage,
        lw: &Layout,
        mv: &candle_core::CudaStorage,
        lmv: &Layout,
    ) -> Result<()> {
        gpu::weights(self.0, (w, lw), (mv, lmv))
    }
}

/// The GPU passes (`kernels/cuda/adam.cu`).
#[cfg(feature = "cuda")]
mod gpu {
    use super::AdamStep;
    use crate::cuda::{by_dtype, elementwise, launch, view, Real, ADAM};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::CudaStorage;
    use candle_core::{Layout, Result};

    /// The contiguous elements of a mutable tensor.
    fn view_mut<'a, T: Real>(
        storage: &'a mut CudaStorage,
        layout: &Layout,
    ) -> Result<candle_core::cuda_backend::cudarc::driver::CudaViewMut<'a, T>> {
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("adam: checked contiguous".into()))?;
        Ok(storage.as_cuda_slice_mut::<T>()?.slice_mut(start..end))
    }

    pub(super) fn moments(
        l2: f64,
        (mv, lmv): (&mut CudaStorage, &Layout),
        (g, lg): (&CudaStorage, &Layout),
        (w, lw): (&CudaStorage, &Layout),
    ) -> Result<()> {
        fn run<T: Real>(
            l2: f64,
            (mv, lmv): (&mut CudaStorage, &Layout),
            (g, lg): (&CudaStorage, &Layout),
            (w, lw): (&CudaStorage, &Layout),
        ) -> Result<()> {
            let dev = g.device().clone();
            let (g, w) = (view::<T>("adam", g, lg)?, view::<T>("adam", w, lw)?);
            let n = lw.shape().elem_count();
            let mut mv = view_mut::<T>(mv, lmv)?;
            if n > 0 {
                let len = n as u64;
                // SAFETY: `adam_moments(T* mv, const T* g, const T* w, u64 n, double l2)`, with
                // `2n` moments and `n` gradients and weights.
                launch!(&dev, ADAM, &T::kernel("adam_moments"), elementwise(n);
                    &mut mv, &g, &w, &len, &l2);
            }
            Ok(())
        }
        if mv.dtype() != g.dtype() || mv.dtype() != w.dtype() {
            candle_core::bail!("adam: the moments, gradient and weight differ in dtype");
        }
        by_dtype!("adam", g, run(l2, (mv, lmv), (g, lg), (w, lw)))
    }

    pub(super) fn weights(
        step: AdamStep,
        (w, lw): (&mut CudaStorage, &Layout),
        (mv, lmv): (&CudaStorage, &Layout),
    ) -> Result<()> {
        fn run<T: Real>(
            step: AdamStep,
            (w, lw): (&mut CudaStorage, &Layout),
            (mv, lmv): (&CudaStorage, &Layout),
        ) -> Result<()> {
            let dev = mv.device().clone();
            let mv = view::<T>("adam", mv, lmv)?;
            let n = lw.shape().elem_count();
            let mut w = view_mut::<T>(w, lw)?;
            if n > 0 {
                let AdamStep {
                    alpha, decay, clip, ..
                } = step;
                let len = n as u64;
                // SAFETY: `adam_weights(T* w, const T* mv, u64 n, double alpha, double decay,
                // double clip)`, with `n` weights and `2n` moments.
                launch!(&dev, ADAM, &T::kernel("adam_weights"), elementwise(n);
                    &mut w, &mv, &len, &alpha, &decay, &clip);
            }
            Ok(())
        }
        if w.dtype() != mv.dtype() {
            candle_core::bail!("adam: the weight and the moments differ in dtype");
        }
        by_dtype!("adam", mv, run(step, (w, lw), (mv, lmv)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// The rule written out in f64, element by element.
    fn reference(w: f64, g: f64, m: f64, v: f64, s: AdamStep) -> (f64, f64, f64) {
        let g = g + 2.0 * s.l2 * w;
        let m = BETA1 * m + (1.0 - BETA1) * g;
        let v = BETA2 * v + (1.0 - BETA2) * g * g;
        let w = (s.decay * w - s.alpha * m / (v.sqrt() + EPSILON)).clamp(-s.clip, s.clip);
        (w, m, v)
    }

    #[test]
    fn the_fused_step_follows_the_rule_in_both_dtypes() -> Result<()> {
        let n = 3 * CHUNK + 17;
        let values = |k: f64| -> Vec<f64> { (0..n).map(|i| (i as f64 * k).sin() * 0.3).collect() };
        let (w, g, m) = (values(0.7), values(1.3), values(2.1));
        let v: Vec<f64> = values(0.4).iter().map(|x| x * x).collect();
        let step = AdamStep {
            alpha: 2e-3,
            decay: 1.0 - 2e-3 * 1e-4,
            l2: 1e-5,
            clip: 0.25,
        };
        for dtype in [DType::F64, DType::F32] {
            let dev = Device::Cpu;
            let wt = Tensor::new(w.as_slice(), &dev)?.to_dtype(dtype)?;
            let gt = Tensor::new(g.as_slice(), &dev)?.to_dtype(dtype)?;
            let mv = Tensor::cat(
                &[
                    Tensor::new(m.as_slice(), &dev)?,
                    Tensor::new(v.as_slice(), &dev)?,
                ],
                0,
            )?
            .to_dtype(dtype)?;
            // What the tensors hold, in f64 (the f32 inputs rounded).
            let held = |t: &Tensor| t.to_dtype(DType::F64)?.to_vec1::<f64>();
            let (w0, g0, mv0) = (held(&wt)?, held(&gt)?, held(&mv)?);
            adam_step(&wt, &gt, &mv, step)?;
            let (w1, mv1) = (held(&wt)?, held(&mv)?);
            let tol = if dtype == DType::F64 { 1e-15 } else { 1e-6 };
            for i in 0..n {
                let (w, m, v) = reference(w0[i], g0[i], mv0[i], mv0[n + i], step);
                for (got, want) in [(w1[i], w), (mv1[i], m), (mv1[n + i], v)] {
                    assert!(
                        (got - want).abs() <= tol * want.abs().max(1e-3),
                        "{dtype:?} element {i}: {got} against {want}"
                    );
                }
            }
            assert!(w1.iter().all(|w| w.abs() <= 0.25), "the clip holds");
        }
        Ok(())
    }

    #[test]
    fn mismatched_shapes_are_refused() -> Result<()> {
        let w = Tensor::zeros(4, DType::F32, &Device::Cpu)?;
        let err = adam_step(
            &w,
            &w,
            &w,
            AdamStep {
                alpha: 1.0,
                decay: 1.0,
                l2: 0.0,
                clip: 1.0,
            },
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("twice its elements"), "{err}");
        Ok(())
    }
}

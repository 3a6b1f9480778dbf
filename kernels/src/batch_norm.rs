//! Batch normalisation in training mode as one fused op, forward and backward: per-channel
//! statistics, normalisation, scale and shift in two passes over the data, where composite
//! candle ops spend most of their time in strided reductions of broadcast gradients. On a GPU
//! (feature `cuda`) the same op runs `kernels/cuda/batch_norm.cu`, its statistics kept there.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::dispatch3;

/// Per-channel batch mean and biased variance of one forward pass, on its device.
#[derive(Clone)]
enum Saved {
    /// `(mean, var)` in host memory.
    Host(Vec<f64>, Vec<f64>),
    /// `[mean..., var...]` on the GPU.
    #[cfg(feature = "cuda")]
    Device(Arc<candle_core::cuda_backend::cudarc::driver::CudaSlice<f64>>),
}

/// Where the forward pass leaves its statistics for the caller and the backward pass.
type Stats = Arc<Mutex<Option<Saved>>>;

/// Normalises `N x C x H x W` input with its batch statistics, then scales by `gamma` and
/// shifts by `beta` (both of length `C`): `y = gamma (x - mean) / sqrt(var + eps) + beta`, mean
/// and biased variance over `N, H, W`. Returns `y` and the batch mean and variance (`C` each,
/// detached), for the moving averages. Gradients flow to `xs`, `gamma` and `beta`.
pub fn batch_norm_train(
    xs: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    epsilon: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (_, c, _, _) = xs.dims4()?;
    if gamma.dims() != [c] || beta.dims() != [c] {
        candle_core::bail!(
            "batch_norm_train: gamma {:?} and beta {:?} must have the input's {c} channels",
            gamma.dims(),
            beta.dims()
        );
    }
    let dev = xs.device();
    if !(dev.is_cpu() || dev.is_cuda()) {
        return composed(xs, gamma, beta, epsilon);
    }
    let op = BatchNormTrain {
        epsilon,
        stats: Stats::default(),
    };
    let ys = xs.contiguous()?.apply_op3(
        &gamma.to_dtype(xs.dtype())?.contiguous()?,
        &beta.to_dtype(xs.dtype())?.contiguous()?,
        op.clone(),
    )?;
    let (mean, var) = match saved(&op.stats) {
        Saved::Host(mean, var) => (
            Tensor::from_vec(mean, c, dev)?,
            Tensor::from_vec(var, c, dev)?,
        ),
        #[cfg(feature = "cuda")]
        Saved::Device(stats) => {
            let both = gpu::tensor(&stats, dev)?;
            (both.narrow(0, 0, c)?, both.narrow(0, c, c)?)
        }
    };
    Ok((ys, mean.to_dtype(xs.dtype())?, var.to_dtype(xs.dtype())?))
}

/// The statistics the forward pass stored.
fn saved(stats: &Stats) -> Saved {
    stats
        .lock()
        .expect("the stats lock is not poisoned")
        .clone()
        .expect("the forward pass stored its statistics")
}

/// [`batch_norm_train`] in candle's own ops (their autograd gives the gradients), for tensors on
/// devices without kernels of ours; checked against the fused op on the CPU.
fn composed(
    xs: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    epsilon: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let c = xs.dim(1)?;
    let per_channel = |t: &Tensor| t.to_dtype(xs.dtype())?.reshape((1, c, 1, 1));
    let mean = xs.mean_keepdim((0, 2, 3))?;
    let centered = xs.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim((0, 2, 3))?;
    let ys = centered
        .broadcast_div(&(&var + epsilon)?.sqrt()?)?
        .broadcast_mul(&per_channel(gamma)?)?
        .broadcast_add(&per_channel(beta)?)?;
    Ok((
        ys,
        mean.detach().flatten_all()?,
        var.detach().flatten_all()?,
    ))
}

#[derive(Clone)]
struct BatchNormTrain {
    epsilon: f64,
    stats: Stats,
}

/// Mean and biased variance of each channel (two-pass, in f64).
fn channel_stats<T: WithDType>(
    x: &[T],
    (n, c, h, w): (usize, usize, usize, usize),
) -> (Vec<f64>, Vec<f64>) {
    let plane = h * w;
    let count = (n * plane) as f64;
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let planes = || (0..n).map(move |i| &x[(i * c + ch) * plane..][..plane]);
            let mean = planes().flatten().map(|v| v.to_f64()).sum::<f64>() / count;
            let var = planes()
                .flatten()
                .map(|v| (v.to_f64() - mean).powi(2))
                .sum::<f64>()
                / count;
            (mean, var)
        })
        .unzip()
}

fn forward<T: WithDType>(
    op: &BatchNormTrain,
    x: &[T],
    gamma: &[T],
    beta: &[T],
    dims: (usize, usize, usize, usize),
) -> Vec<T> {
    let (_, c, h, w) = dims;
    let plane = h * w;
    let (mean, var) = channel_stats(x, dims);
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(plane).enumerate().for_each(|(p, out)| {
        let ch = p % c;
        let scale = gamma[ch].to_f64() / (var[ch] + op.epsilon).sqrt();
        let shift = beta[ch].to_f64() - mean[ch] * scale;
        let (scale, shift) = (T::from_f64(scale), T::from_f64(shift));
        for (o, &v) in out.iter_mut().zip(&x[p * plane..][..plane]) {
            *o = v * scale + shift;
        }
    });
    *op.stats.lock().expect("the stats lock is not poisoned") = Some(Saved::Host(mean, var));
    y
}

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = l1.shape().dims4()?;
        let out = dispatch3(
            self.name(),
            (s1, l1),
            (s2, l2),
            (s3, l3),
            |x, a, b| forward(self, x, a, b, dims),
            |x, a, b| forward(self, x, a, b, dims),
        )?;
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dims = l1.shape().dims4()?;
        let (y, stats) = gpu::forward(
            self.name(),
            dims,
            self.epsilon,
            (s1, l1),
            (s2, l2),
            (s3, l3),
        )?;
        *self.stats.lock().expect("the stats lock is not poisoned") =
            Some(Saved::Device(Arc::new(stats)));
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _ys: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let backward = Backward {
            epsilon: self.epsilon,
            stats: saved(&self.stats),
        };
        // One op computes the input gradient and, appended, the gamma and beta gradients.
        let packed =
            xs.detach()
                .apply_op3_no_bwd(&gamma.detach(), &grad.contiguous()?, &backward)?;
        let c = gamma.dim(0)?;
        let n = xs.elem_count();
        let grad_x = packed.narrow(0, 0, n)?.reshape(xs.dims())?;
        let grad_gamma = packed.narrow(0, n, c)?;
        let grad_beta = packed.narrow(0, n + c, c)?;
        Ok((Some(grad_x), Some(grad_gamma), Some(grad_beta)))
    }
}

struct Backward {
    epsilon: f64,
    stats: Saved,
}

/// `grad_x = gamma / std * (g - mean(g) - x_hat * mean(g x_hat))`, `grad_gamma = sum(g x_hat)`,
/// `grad_beta = sum(g)`, packed as `[grad_x..., grad_gamma..., grad_beta...]`.
fn backward<T: WithDType>(
    epsilon: f64,
    (mean, var): (&[f64], &[f64]),
    x: &[T],
    gamma: &[T],
    g: &[T],
    (n, c, h, w): (usize, usize, usize, usize),
) -> Vec<T> {
    let plane = h * w;
    let count = (n * plane) as f64;
    let inv_std: Vec<f64> = var.iter().map(|v| 1.0 / (v + epsilon).sqrt()).collect();
    let sums: Vec<(f64, f64)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let (mut sum_g, mut sum_gx) = (0.0, 0.0);
            for i in 0..n {
                let at = (i * c + ch) * plane;
                for (&gv, &xv) in g[at..at + plane].iter().zip(&x[at..at + plane]) {
                    let gv = gv.to_f64();
                    sum_g += gv;
                    sum_gx += gv * (xv.to_f64() - mean[ch]) * inv_std[ch];
                }
            }
            (sum_g, sum_gx)
        })
        .collect();
    let mut out = vec![T::zero(); x.len() + 2 * c];
    let (grad_x, grad_params) = out.split_at_mut(x.len());
    grad_x
        .par_chunks_mut(plane)
        .enumerate()
        .for_each(|(p, dst)| {
            let ch = p % c;
            let (sum_g, sum_gx) = sums[ch];
            let k = gamma[ch].to_f64() * inv_std[ch];
            let (mean_g, mean_gx) = (sum_g / count, sum_gx / count);
            let at = p * plane;
            for ((d, &gv), &xv) in dst
                .iter_mut()
                .zip(&g[at..at + plane])
                .zip(&x[at..at + plane])
            {
                let x_hat = (xv.to_f64() - mean[ch]) * inv_std[ch];
                *d = T::from_f64(k * (gv.to_f64() - mean_g - x_hat * mean_gx));
            }
        });
    for ch in 0..c {
        grad_params[ch] = T::from_f64(sums[ch].1);
        grad_params[c + ch] = T::from_f64(sums[ch].0);
    }
    out
}

impl CustomOp3 for Backward {
    fn name(&self) -> &'static str {
        "batch-norm-train-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = l1.shape().dims4()?;
        let stats = match &self.stats {
            Saved::Host(mean, var) => (mean.as_slice(), var.as_slice()),
            #[cfg(feature = "cuda")]
            Saved::Device(_) => candle_core::bail!("{}: statistics on the GPU", self.name()),
        };
        let eps = self.epsilon;
        let out = dispatch3(
            self.name(),
            (s1, l1),
            (s2, l2),
            (s3, l3),
            |x, a, b| backward(eps, stats, x, a, b, dims),
            |x, a, b| backward(eps, stats, x, a, b, dims),
        )?;
        Ok((out, Shape::from(l1.shape().elem_count() + 2 * dims.1)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dims = l1.shape().dims4()?;
        let Saved::Device(stats) = &self.stats else {
            candle_core::bail!("{}: statistics in host memory", self.name())
        };
        let out = gpu::backward(
            self.name(),
            dims,
            self.epsilon,
            stats,
            (s1, l1),
            (s2, l2),
            (s3, l3),
        )?;
        Ok((out, Shape::from(l1.shape().elem_count() + 2 * dims.1)))
    }
}

/// The GPU passes (`kernels/cuda/batch_norm.cu`).
#[cfg(feature = "cuda")]
mod gpu {
    use crate::cuda::{by_dtype, elementwise, launch, view, zeros, Real, BATCH_NORM, BLOCK};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig};
    use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
    use candle_core::{Device, Layout, Result, Storage, Tensor};

    /// `struct Norm` of `batch_norm.cu`.
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Norm {
        n: i64,
        c: i64,
        plane: i64,
        parts: i64,
    }

    // SAFETY: plain data, laid out as the kernel's `struct Norm`.
    unsafe impl DeviceRepr for Norm {}

    impl Norm {
        /// Blocks per channel: each thread of a part sums at least 16 values.
        fn new((n, c, h, w): (usize, usize, usize, usize)) -> Norm {
            let count = n * h * w;
            let parts = count.div_ceil(BLOCK as usize * 16).clamp(1, 256);
            Norm {
                n: n as i64,
                c: c as i64,
                plane: (h * w) as i64,
                parts: parts as i64,
            }
        }

        /// One block of `BLOCK` threads per (part, channel).
        fn partial_launch(&self) -> LaunchConfig {
            LaunchConfig {
                grid_dim: (self.parts as u32, self.c as u32, 1),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: 0,
            }
        }

        fn partials(&self, slots: usize) -> usize {
            slots * self.parts as usize
        }
    }

    /// `out[s] = sum of the parts of slot s / divisor` for the first `slots` slots.
    fn finish(
        dev: &CudaDevice,
        d: &Norm,
        partial: &CudaSlice<f64>,
        slots: usize,
        divisor: f64,
        out: &mut candle_core::cuda_backend::cudarc::driver::CudaViewMut<f64>,
    ) -> Result<()> {
        let n = slots as i64;
        // SAFETY: `batch_norm_finish(Norm, const double* partial, i64 slots, double divisor,
        // double* out)`; `partial` holds slots * parts values, `out` at least `slots`.
        launch!(dev, BATCH_NORM, "batch_norm_finish", elementwise(slots);
            d, partial, &n, &divisor, out);
        Ok(())
    }

    /// The normalised output and the statistics (`[mean..., var...]`, doubles).
    pub(super) fn forward(
        op: &str,
        dims: (usize, usize, usize, usize),
        epsilon: f64,
        x: (&CudaStorage, &Layout),
        gamma: (&CudaStorage, &Layout),
        beta: (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, CudaSlice<f64>)> {
        fn typed<T: Real>(
            op: &str,
            dims: (usize, usize, usize, usize),
            epsilon: f64,
            (sx, lx): (&CudaStorage, &Layout),
            (sg, lg): (&CudaStorage, &Layout),
            (sb, lb): (&CudaStorage, &Layout),
        ) -> Result<(CudaStorage, CudaSlice<f64>)> {
            let dev = sx.device();
            let (x, gamma, beta) = (
                view::<T>(op, sx, lx)?,
                view::<T>(op, sg, lg)?,
                view::<T>(op, sb, lb)?,
            );
            let d = Norm::new(dims);
            let (c, len) = (dims.1, lx.shape().elem_count());
            let count = (dims.0 * dims.2 * dims.3) as f64;
            let mut stats = zeros::<f64>(dev, 2 * c)?;
            let mut partial = zeros::<f64>(dev, d.partials(c))?;
            let mut y = zeros::<T>(dev, len)?;
            if len > 0 {
                let moments = T::kernel("batch_norm_moments");
                for (centered, at) in [(0i32, 0), (1, c)] {
                    // SAFETY: `batch_norm_moments(Norm, const T* x, const double* stats,
                    // int centered, double* partial)` over (parts, C) blocks; `x` holds
                    // N*C*H*W values, `stats` 2C, `partial` C * parts.
                    launch!(dev, BATCH_NORM, &moments, d.partial_launch();
                        &d, &x, &stats, &centered, &mut partial);
                    finish(
                        dev,
                        &d,
                        &partial,
                        c,
                        count,
                        &mut stats.slice_mut(at..at + c),
                    )?;
                }
                // SAFETY: `batch_norm_normalize(Norm, const T* x, const T* gamma, const T* beta,
                // const double* stats, double eps, T* y)`; `gamma` and `beta` hold C values,
                // `x` and `y` N*C*H*W.
                launch!(dev, BATCH_NORM, &T::kernel("batch_norm_normalize"), elementwise(len);
                    &d, &x, &gamma, &beta, &stats, &epsilon, &mut y);
            }
            Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), stats))
        }
        by_dtype!(op, x.0, typed(op, dims, epsilon, x, gamma, beta))
    }

    /// `[dx..., dgamma..., dbeta...]` from the forward pass's statistics.
    pub(super) fn backward(
        op: &str,
        dims: (usize, usize, usize, usize),
        epsilon: f64,
        stats: &CudaSlice<f64>,
        x: (&CudaStorage, &Layout),
        gamma: (&CudaStorage, &Layout),
        grad: (&CudaStorage, &Layout),
    ) -> Result<CudaStorage> {
        fn typed<T: Real>(
            op: &str,
            dims: (usize, usize, usize, usize),
            epsilon: f64,
            stats: &CudaSlice<f64>,
            (sx, lx): (&CudaStorage, &Layout),
            (sg, lg): (&CudaStorage, &Layout),
            (sd, ld): (&CudaStorage, &Layout),
        ) -> Result<CudaStorage> {
            let dev = sx.device();
            let (x, gamma, g) = (
                view::<T>(op, sx, lx)?,
                view::<T>(op, sg, lg)?,
                view::<T>(op, sd, ld)?,
            );
            let d = Norm::new(dims);
            let (c, len) = (dims.1, lx.shape().elem_count());
            let mut sums = zeros::<f64>(dev, 2 * c)?;
            let mut partial = zeros::<f64>(dev, d.partials(2 * c))?;
            let mut out = zeros::<T>(dev, len + 2 * c)?;
            if len > 0 {
                // SAFETY: `batch_norm_grad_sums(Norm, const T* x, const T* g, const double*
                // stats, double eps, double* partial)` over (parts, C) blocks; `x` and `g` hold
                // N*C*H*W values, `stats` 2C, `partial` 2C * parts.
                launch!(dev, BATCH_NORM, &T::kernel("batch_norm_grad_sums"), d.partial_launch();
                    &d, &x, &g, stats, &epsilon, &mut partial);
                finish(dev, &d, &partial, 2 * c, 1.0, &mut sums.slice_mut(..))?;
                // SAFETY: `batch_norm_grad_input(Norm, const T* x, const T* gamma, const T* g,
                // const double* stats, const double* sums, double eps, T* out)`; `out` holds
                // N*C*H*W + 2C values, `sums` and `stats` 2C.
                launch!(dev, BATCH_NORM, &T::kernel("batch_norm_grad_input"), elementwise(len + c);
                    &d, &x, &gamma, &g, stats, &sums, &epsilon, &mut out);
            }
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }
        by_dtype!(op, x.0, typed(op, dims, epsilon, stats, x, gamma, grad))
    }

    /// A copy of the statistics as a tensor (`2C` doubles) on `dev`.
    pub(super) fn tensor(stats: &CudaSlice<f64>, dev: &Device) -> Result<Tensor> {
        let Device::Cuda(cuda) = dev else {
            candle_core::bail!("batch_norm_train: statistics on the GPU for a tensor on {dev:?}");
        };
        let copy = stats.try_clone().w()?;
        let len = copy.len();
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(copy, cuda.clone()));
        Ok(Tensor::from_storage(
            storage,
            len,
            candle_core::op::BackpropOp::none(),
            false,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_candle_ops_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        for shape in [(2, 3, 5, 4), (1, 2, 1, 1), (3, 5, 2, 7), (4, 1, 3, 3)] {
            let c = shape.1;
            let x = Var::from_tensor(&(Tensor::randn(0f64, 2.0, shape, &dev)? + 0.7)?)?;
            let gamma = Var::from_tensor(&Tensor::randn(1f64, 0.5, c, &dev)?)?;
            let beta = Var::from_tensor(&Tensor::randn(0f64, 0.5, c, &dev)?)?;
            let (ours, mean, var) = batch_norm_train(&x, &gamma, &beta, 1e-3)?;
            // The other devices' path, in candle's ops, run here on the CPU.
            let (theirs, their_mean, their_var) = composed(&x, &gamma, &beta, 1e-3)?;
            let max_diff = |a: &Tensor, b: &Tensor| -> Result<f64> {
                (a - b)?.abs()?.max_all()?.to_scalar::<f64>()
            };
            let diff = max_diff(&ours, &theirs)?;
            assert!(diff < 1e-12, "{shape:?}: forward differs by {diff}");
            assert!(max_diff(&mean, &their_mean)? < 1e-12, "{shape:?}: mean");
            assert!(max_diff(&var, &their_var)? < 1e-12, "{shape:?}: variance");
            assert!(var.min(0)?.to_scalar::<f64>()? >= 0.0);
            let weights = Tensor::randn(0f64, 1.0, shape, &dev)?;
            let g_ours = (ours * &weights)?.sum_all()?.backward()?;
            let g_theirs = (theirs * &weights)?.sum_all()?.backward()?;
            for v in [&x, &gamma, &beta] {
                let a = g_ours.get(v.as_tensor()).expect("a gradient");
                let b = g_theirs.get(v.as_tensor()).expect("a gradient");
                let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f64>()?;
                assert!(diff < 1e-10, "{shape:?}: gradient differs by {diff}");
            }
        }
        Ok(())
    }
}

//! Batch normalisation in training mode as one fused op, forward and backward: per-channel
//! statistics, normalisation, scale and shift in two passes over the data, where composite
//! candle ops spend most of their time in strided reductions of broadcast gradients.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::dispatch3;

/// Per-channel batch mean and biased variance of one forward pass.
type Stats = Arc<Mutex<Option<(Vec<f64>, Vec<f64>)>>>;

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
    if !crate::fused_on(xs.device()) {
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
    let (mean, var) = op
        .stats
        .lock()
        .expect("the stats lock is not poisoned")
        .clone()
        .expect("the forward pass stored its statistics");
    let dev = xs.device();
    Ok((
        ys,
        Tensor::from_vec(mean, c, dev)?.to_dtype(xs.dtype())?,
        Tensor::from_vec(var, c, dev)?.to_dtype(xs.dtype())?,
    ))
}

/// [`batch_norm_train`] in candle's own ops (their autograd gives the gradients), for tensors on
/// other devices than the CPU; checked against the fused op on the CPU.
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
    *op.stats.lock().expect("the stats lock is not poisoned") = Some((mean, var));
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

    fn bwd(
        &self,
        xs: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _ys: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (mean, var) = self
            .stats
            .lock()
            .expect("the stats lock is not poisoned")
            .clone()
            .expect("the forward pass stored its statistics");
        let backward = Backward {
            epsilon: self.epsilon,
            mean,
            var,
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
    mean: Vec<f64>,
    var: Vec<f64>,
}

/// `grad_x = gamma / std * (g - mean(g) - x_hat * mean(g x_hat))`, `grad_gamma = sum(g x_hat)`,
/// `grad_beta = sum(g)`, packed as `[grad_x..., grad_gamma..., grad_beta...]`.
fn backward<T: WithDType>(
    op: &Backward,
    x: &[T],
    gamma: &[T],
    g: &[T],
    (n, c, h, w): (usize, usize, usize, usize),
) -> Vec<T> {
    let plane = h * w;
    let count = (n * plane) as f64;
    let inv_std: Vec<f64> = op
        .var
        .iter()
        .map(|v| 1.0 / (v + op.epsilon).sqrt())
        .collect();
    let sums: Vec<(f64, f64)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let (mut sum_g, mut sum_gx) = (0.0, 0.0);
            for i in 0..n {
                let at = (i * c + ch) * plane;
                for (&gv, &xv) in g[at..at + plane].iter().zip(&x[at..at + plane]) {
                    let gv = gv.to_f64();
                    sum_g += gv;
                    sum_gx += gv * (xv.to_f64() - op.mean[ch]) * inv_std[ch];
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
                let x_hat = (xv.to_f64() - op.mean[ch]) * inv_std[ch];
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
        let out = dispatch3(
            self.name(),
            (s1, l1),
            (s2, l2),
            (s3, l3),
            |x, a, b| backward(self, x, a, b, dims),
            |x, a, b| backward(self, x, a, b, dims),
        )?;
        Ok((out, Shape::from(l1.shape().elem_count() + 2 * dims.1)))
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

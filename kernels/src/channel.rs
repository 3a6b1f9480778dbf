//! Per-channel layers of the training graph on `N x C x H x W` maps: a learnable bias per
//! channel (ReActNet's "LearnableBias") and the parametric ReLU, each one op forward and one
//! backward on the CPU.
//!
//! candle's broadcast ops compute the same values, but the gradient of a per-channel parameter
//! is then a sum over the batch and the pixels that candle reduces with an index division per
//! value (it reduces non-trailing dimensions that way): 18% of a ReActNet-LAB training step at
//! 32x32. Here each `(image, channel)` plane is summed contiguously, image by image in order.
//! On other devices, or under [`crate::compose_on_cpu`], both functions are candle's broadcast
//! ops (their gradient reductions are the device's own).

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

use crate::{dispatch1, dispatch2, dispatch3};

/// `x + bias[c]` for `x` of `N x C x H x W` and `bias` of `C`; the gradients are the output's
/// for `x` and its sum over each channel for `bias`.
pub fn channel_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let c = channels("channel_bias", x, bias)?;
    if !crate::fused_on(x.device()) {
        return composed_bias(x, bias, c);
    }
    x.contiguous()?
        .apply_op2(&bias.contiguous()?, PerChannel::Bias)
}

/// [`channel_bias`] as candle's broadcast ops.
fn composed_bias(x: &Tensor, bias: &Tensor, c: usize) -> Result<Tensor> {
    x.broadcast_add(&bias.reshape((1, c, 1, 1))?)
}

/// Keras' `PReLU` shared over height and width: `relu(x) - alpha[c] * relu(-x)` for `x` of
/// `N x C x H x W` and `alpha` of `C`, with TensorFlow's ReLU gradient (0 at `x == 0`): the
/// input gradient is the output's where `x > 0`, `alpha[c]` times it where `x < 0` and 0 at 0;
/// `alpha`'s is the sum over each channel of the output's gradient times `-relu(-x)`.
pub fn prelu(x: &Tensor, alpha: &Tensor) -> Result<Tensor> {
    let c = channels("prelu", x, alpha)?;
    if !crate::fused_on(x.device()) {
        return composed_prelu(x, alpha, c);
    }
    x.contiguous()?
        .apply_op2(&alpha.contiguous()?, PerChannel::PRelu)
}

/// [`prelu`] as candle ops (`zoo::layers::relu`'s ReLU).
fn composed_prelu(x: &Tensor, alpha: &Tensor, c: usize) -> Result<Tensor> {
    let relu = |t: &Tensor| t.gt(0.0)?.where_cond(t, &t.zeros_like()?);
    let negative = relu(&x.neg()?)?.broadcast_mul(&alpha.reshape((1, c, 1, 1))?)?;
    relu(x)?.sub(&negative)
}

/// The channel count of `x` (`N x C x H x W`), checked against the parameter's length.
fn channels(op: &str, x: &Tensor, param: &Tensor) -> Result<usize> {
    let (_, c, _, _) = x.dims4()?;
    if param.dims() != [c] {
        candle_core::bail!(
            "{op}: a parameter of shape {:?} for an input of {c} channels",
            param.dims()
        );
    }
    Ok(c)
}

/// The `(image, channel)` planes of a contiguous `N x C x H x W` layout: `(C, H * W)`.
fn planes(layout: &Layout) -> Result<(usize, usize)> {
    let (_, c, h, w) = layout.shape().dims4()?;
    Ok((c, h * w))
}

/// `out[p] = f(x[p], param[channel of p])` over the planes, in parallel.
fn map_planes<T: WithDType>(
    x: &[T],
    param: &[T],
    (c, hw): (usize, usize),
    f: impl Fn(T, T) -> T + Sync,
) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    if hw > 0 {
        out.par_chunks_mut(hw)
            .zip(x.par_chunks(hw))
            .enumerate()
            .for_each(|(plane, (out, x))| {
                let p = param[plane % c];
                for (o, &v) in out.iter_mut().zip(x) {
                    *o = f(v, p);
                }
            });
    }
    out
}

/// Sums `f(x, g)` over each plane in order, in parallel over the planes, then over the images
/// in order: one value per channel.
fn channel_sums<T: WithDType>(
    x: &[T],
    g: &[T],
    (c, hw): (usize, usize),
    f: impl Fn(T, T) -> T + Sync,
) -> Vec<T> {
    let mut sums = vec![T::zero(); c];
    if hw == 0 {
        return sums;
    }
    let per_plane: Vec<T> = x
        .par_chunks(hw)
        .zip(g.par_chunks(hw))
        .map(|(x, g)| x.iter().zip(g).fold(T::zero(), |s, (&x, &g)| s + f(x, g)))
        .collect();
    for (plane, s) in per_plane.into_iter().enumerate() {
        sums[plane % c] += s;
    }
    sums
}

/// `relu(v)` with the comparison of `zoo::layers::relu`: `v` where `v > 0`, else 0.
fn relu<T: WithDType>(v: T) -> T {
    if v > T::zero() {
        v
    } else {
        T::zero()
    }
}

/// A per-channel layer on the CPU: the value of each output from its input and its channel's
/// parameter, and the gradients.
#[derive(Clone, Copy)]
enum PerChannel {
    /// [`channel_bias`].
    Bias,
    /// [`prelu`]: `relu(x) - alpha * relu(-x)`, the composition's operations in its order.
    PRelu,
}

impl PerChannel {
    /// The outputs for `x` and the parameters `p`.
    fn forward<T: WithDType>(self, x: &[T], p: &[T], dims: (usize, usize)) -> Vec<T> {
        match self {
            PerChannel::Bias => map_planes(x, p, dims, |v, b| v + b),
            PerChannel::PRelu => map_planes(x, p, dims, |v, a| relu(v) - a * relu(T::zero() - v)),
        }
    }
}

impl CustomOp2 for PerChannel {
    fn name(&self) -> &'static str {
        match self {
            PerChannel::Bias => "channel-bias",
            PerChannel::PRelu => "prelu",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = planes(l1)?;
        let out = dispatch2(
            self.name(),
            (s1, l1),
            (s2, l2),
            |x, p| self.forward(x, p, dims),
            |x, p| self.forward(x, p, dims),
        )?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        p: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        if let PerChannel::Bias = self {
            let sums = grad.apply_op1_no_bwd(&ChannelSums)?;
            return Ok((Some(grad), Some(sums)));
        }
        let both = x.apply_op3_no_bwd(p, &grad, &PReluBackward)?;
        let (nx, c) = (x.elem_count(), p.elem_count());
        Ok((
            Some(both.narrow(0, 0, nx)?.reshape(x.shape())?),
            Some(both.narrow(0, nx, c)?),
        ))
    }
}

/// The sum of each channel of an `N x C x H x W` map: the bias gradient.
struct ChannelSums;

impl CustomOp1 for ChannelSums {
    fn name(&self) -> &'static str {
        "channel-sums"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = planes(layout)?;
        let out = dispatch1(
            self.name(),
            (storage, layout),
            |g| channel_sums(g, g, dims, |g, _| g),
            |g| channel_sums(g, g, dims, |g, _| g),
        )?;
        Ok((out, Shape::from(dims.0)))
    }
}

/// Both gradients of [`prelu`], concatenated flat (input first).
struct PReluBackward;

/// The input's gradient then alpha's, as the composition computes them: the ReLU's masked
/// gradient plus `-((-g) * alpha)` through `relu(-x)`, and `(-g) * relu(-x)` summed.
fn prelu_backward<T: WithDType>(x: &[T], alpha: &[T], g: &[T], dims: (usize, usize)) -> Vec<T> {
    let (zero, (c, hw)) = (T::zero(), dims);
    let mut out = Vec::with_capacity(x.len() + c);
    out.resize(x.len(), zero);
    if hw > 0 {
        out.par_chunks_mut(hw)
            .zip(x.par_chunks(hw).zip(g.par_chunks(hw)))
            .enumerate()
            .for_each(|(plane, (dx, (x, g)))| {
                let a = alpha[plane % c];
                for ((d, &x), &g) in dx.iter_mut().zip(x).zip(g) {
                    let through_negative = if zero - x > zero {
                        zero - (zero - g) * a
                    } else {
                        zero
                    };
                    *d = if x > zero { g } else { zero } + through_negative;
                }
            });
    }
    out.extend(channel_sums(x, g, dims, |x, g| (zero - g) * relu(zero - x)));
    out
}

impl CustomOp3 for PReluBackward {
    fn name(&self) -> &'static str {
        "prelu-backward"
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
        let dims = planes(l1)?;
        let out = dispatch3(
            self.name(),
            (s1, l1),
            (s2, l2),
            (s3, l3),
            |x, a, g| prelu_backward(x, a, g, dims),
            |x, a, g| prelu_backward(x, a, g, dims),
        )?;
        Ok((out, Shape::from(l1.shape().elem_count() + dims.0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    type Op = fn(&Tensor, &Tensor) -> Result<Tensor>;

    /// The output and both gradients of `op` for the loss `sum(op(x, p) * r)`.
    fn run(op: Op, x: &Tensor, p: &Tensor, r: &Tensor) -> Result<[Tensor; 3]> {
        let (xv, pv) = (Var::from_tensor(x)?, Var::from_tensor(p)?);
        let y = op(xv.as_tensor(), pv.as_tensor())?;
        let grads = y.mul(r)?.sum_all()?.backward()?;
        let grad = |v: &Var| grads.get(v.as_tensor()).expect("a gradient").clone();
        Ok([y, grad(&xv), grad(&pv)])
    }

    /// Random values, every fifth exactly 0 (ReLU's kink), in `dtype`.
    fn random(shape: &[usize], seed: u64, dtype: DType) -> Result<Tensor> {
        let mut state = seed;
        let values: Vec<f64> = (0..shape.iter().product())
            .map(|i| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let v = (state >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 2.0;
                if i % 5 == 0 {
                    0.0
                } else {
                    v
                }
            })
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu)?.to_dtype(dtype)
    }

    /// The fused ops against candle's broadcast compositions: the outputs and the input
    /// gradients equal, the parameter gradients (summed in another order) within rounding.
    #[test]
    fn match_the_broadcast_compositions() -> Result<()> {
        let ops: [(&str, Op, Op); 2] = [
            ("channel_bias", channel_bias, |x, b| {
                composed_bias(x, b, b.elem_count())
            }),
            ("prelu", prelu, |x, a| composed_prelu(x, a, a.elem_count())),
        ];
        for dtype in [DType::F64, DType::F32] {
            for (i, &[n, c, h, w]) in [[3, 5, 4, 3], [2, 7, 1, 1], [1, 1, 6, 5]]
                .iter()
                .enumerate()
            {
                let seed = i as u64 * 3;
                let x = random(&[n, c, h, w], seed, dtype)?;
                let r = random(&[n, c, h, w], seed + 1, dtype)?;
                let p = random(&[c], seed + 2, dtype)?;
                for (name, fused, composed) in ops {
                    let [y, dx, dp] = run(fused, &x, &p, &r)?;
                    let [y0, dx0, dp0] = run(composed, &x, &p, &r)?;
                    let at = format!("{name} {dtype:?} {n}x{c}x{h}x{w}");
                    let values =
                        |t: &Tensor| t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>();
                    assert_eq!(values(&y)?, values(&y0)?, "{at}: output");
                    assert_eq!(values(&dx)?, values(&dx0)?, "{at}: input gradient");
                    let bound = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
                    for (a, b) in values(&dp)?.into_iter().zip(values(&dp0)?) {
                        assert!(
                            (a - b).abs() <= bound * (1.0 + b.abs()),
                            "{at}: parameter gradient {a} against {b}"
                        );
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn take_empty_maps_and_reject_a_parameter_of_another_length() -> Result<()> {
        let p = Tensor::zeros(3, DType::F32, &Device::Cpu)?;
        let empty = Tensor::zeros((4, 3, 0, 2), DType::F32, &Device::Cpu)?;
        for op in [channel_bias, prelu] {
            assert_eq!(op(&empty, &p)?.dims(), [4, 3, 0, 2]);
        }
        let x = Tensor::zeros((2, 4, 2, 2), DType::F32, &Device::Cpu)?;
        for result in [channel_bias(&x, &p), prelu(&x, &p)] {
            let message = result.unwrap_err().to_string();
            assert!(
                message.contains("[3]") && message.contains("4 channels"),
                "{message}"
            );
        }
        Ok(())
    }
}

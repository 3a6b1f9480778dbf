//! im2col ("unfold") and its adjoint col2im ("fold"): they turn a convolution into one matrix
//! multiply, so that training convolutions run on candle's fast GEMM, forward and backward.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::dispatch1;

/// The patches of an (already padded) `N x C x H x W` input under a `kh x kw` window moved by
/// `stride` (VALID): an `(N * OH * OW) x (C * kh * kw)` matrix whose row `(n, oy, ox)` holds
/// the window at output `(oy, ox)` in `(c, i, j)` order, the order of a `O x C x kh x kw`
/// kernel. The gradient folds the rows back, summing where windows overlap.
pub fn unfold(xs: &Tensor, kernel: [usize; 2], stride: [usize; 2]) -> Result<Tensor> {
    let (_, _, h, w) = xs.dims4()?;
    if h < kernel[0] || w < kernel[1] || stride.contains(&0) || kernel.contains(&0) {
        candle_core::bail!(
            "unfold: a {}x{} window with stride {:?} does not fit a {h}x{w} input",
            kernel[0],
            kernel[1],
            stride
        );
    }
    xs.contiguous()?.apply_op1(Unfold {
        kernel,
        stride,
        input: (0, 0, 0, 0),
    })
}

#[derive(Clone, Copy)]
struct Unfold {
    kernel: [usize; 2],
    stride: [usize; 2],
    /// The input's dimensions (set for the fold of the backward pass).
    input: (usize, usize, usize, usize),
}

impl Unfold {
    fn output_hw(&self, h: usize, w: usize) -> (usize, usize) {
        (
            (h - self.kernel[0]) / self.stride[0] + 1,
            (w - self.kernel[1]) / self.stride[1] + 1,
        )
    }
}

fn unfold_into<T: WithDType>(
    op: &Unfold,
    x: &[T],
    (n, c, h, w): (usize, usize, usize, usize),
) -> Vec<T> {
    let [kh, kw] = op.kernel;
    let [sy, sx] = op.stride;
    let (oh, ow) = op.output_hw(h, w);
    let k = c * kh * kw;
    let mut cols = vec![T::zero(); n * oh * ow * k];
    // One chunk per (image, output row).
    cols.par_chunks_mut(ow * k)
        .enumerate()
        .for_each(|(row, out)| {
            let (img, oy) = (row / oh, row % oh);
            let image = &x[img * c * h * w..(img + 1) * c * h * w];
            for ox in 0..ow {
                let patch = &mut out[ox * k..(ox + 1) * k];
                for ch in 0..c {
                    for i in 0..kh {
                        let src = ch * h * w + (oy * sy + i) * w + ox * sx;
                        let dst = (ch * kh + i) * kw;
                        patch[dst..dst + kw].copy_from_slice(&image[src..src + kw]);
                    }
                }
            }
        });
    cols
}

fn fold_into<T: WithDType>(op: &Unfold, cols: &[T]) -> Vec<T> {
    let (n, c, h, w) = op.input;
    let [kh, kw] = op.kernel;
    let [sy, sx] = op.stride;
    let (oh, ow) = op.output_hw(h, w);
    let k = c * kh * kw;
    let mut x = vec![T::zero(); n * c * h * w];
    // One chunk per image: windows of different images never overlap.
    x.par_chunks_mut(c * h * w)
        .enumerate()
        .for_each(|(img, image)| {
            for oy in 0..oh {
                for ox in 0..ow {
                    let patch = &cols[((img * oh + oy) * ow + ox) * k..][..k];
                    for ch in 0..c {
                        for i in 0..kh {
                            let dst = ch * h * w + (oy * sy + i) * w + ox * sx;
                            let src = (ch * kh + i) * kw;
                            for (d, s) in image[dst..dst + kw].iter_mut().zip(&patch[src..src + kw])
                            {
                                *d += *s;
                            }
                        }
                    }
                }
            }
        });
    x
}

impl CustomOp1 for Unfold {
    fn name(&self) -> &'static str {
        "unfold"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = layout.shape().dims4()?;
        let (n, c, h, w) = dims;
        let (oh, ow) = self.output_hw(h, w);
        let out = dispatch1(
            self.name(),
            (storage, layout),
            |x| unfold_into(self, x, dims),
            |x| unfold_into(self, x, dims),
        )?;
        Ok((
            out,
            Shape::from((n * oh * ow, c * self.kernel[0] * self.kernel[1])),
        ))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let fold = Fold(Unfold {
            input: arg.dims4()?,
            ..*self
        });
        Ok(Some(grad_res.contiguous()?.apply_op1_no_bwd(&fold)?))
    }
}

/// The adjoint of [`Unfold`]: sums patch rows back into an image.
struct Fold(Unfold);

impl CustomOp1 for Fold {
    fn name(&self) -> &'static str {
        "fold"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = dispatch1(
            self.name(),
            (storage, layout),
            |cols| fold_into(&self.0, cols),
            |cols| fold_into(&self.0, cols),
        )?;
        Ok((out, Shape::from(self.0.input)))
    }
}

/// A VALID convolution of an already padded `N x C x H x W` input with an `O x C x kh x kw`
/// kernel, as [`unfold`] followed by one matrix multiply (forward and backward on GEMMs).
pub fn conv2d_gemm(xs: &Tensor, kernel: &Tensor, stride: [usize; 2]) -> Result<Tensor> {
    if !crate::fused_on(xs.device()) {
        return candle_conv2d("conv2d_gemm", xs, kernel, stride, 1);
    }
    let (n, c, h, w) = xs.dims4()?;
    let (o, kc, kh, kw) = kernel.dims4()?;
    if kc != c {
        candle_core::bail!(
            "conv2d_gemm: a kernel for {kc} channels does not fit a {c}-channel input"
        );
    }
    let cols = if kh == 1 && kw == 1 && stride == [1, 1] {
        // A 1x1 convolution needs no patches: only the channels-last view of the input.
        xs.permute((0, 2, 3, 1))?.reshape((n * h * w, c))?
    } else {
        unfold(xs, [kh, kw], stride)?
    };
    let (oh, ow) = ((h - kh) / stride[0] + 1, (w - kw) / stride[1] + 1);
    let ys = cols.matmul(&kernel.reshape((o, c * kh * kw))?.t()?)?;
    ys.reshape((n, oh, ow, o))?
        .permute((0, 3, 1, 2))?
        .contiguous()
}

/// A VALID strided convolution of an already padded input in candle's own convolution op (and
/// its autograd), for tensors on other devices than the CPU: the rows and columns no window
/// reaches are cropped first (candle's backward needs them gone). `op` names the caller in
/// errors; equal strides only.
pub(crate) fn candle_conv2d(
    op: &str,
    xs: &Tensor,
    kernel: &Tensor,
    stride: [usize; 2],
    groups: usize,
) -> Result<Tensor> {
    let (_, _, h, w) = xs.dims4()?;
    let (_, _, kh, kw) = kernel.dims4()?;
    if stride[0] != stride[1] {
        candle_core::bail!("{op}: strides {stride:?} differ, which only the CPU supports");
    }
    if h < kh || w < kw {
        candle_core::bail!("{op}: a {kh}x{kw} kernel does not fit a {h}x{w} input");
    }
    let reached = |size: usize, k: usize, s: usize| (size - k) / s * s + k;
    xs.narrow(2, 0, reached(h, kh, stride[0]))?
        .narrow(3, 0, reached(w, kw, stride[1]))?
        .conv2d(kernel, 0, stride[0], 1, groups)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_candle_convolution_and_its_gradients() -> Result<()> {
        let dev = Device::Cpu;
        for (shape, kshape, stride) in [
            ((2, 3, 7, 6), (4, 3, 3, 3), [1, 1]),
            ((2, 3, 7, 7), (5, 3, 3, 3), [2, 2]),
            ((2, 3, 7, 6), (5, 3, 3, 3), [2, 2]),
            ((1, 2, 5, 5), (3, 2, 1, 1), [1, 1]),
            ((2, 2, 6, 6), (3, 2, 1, 1), [2, 2]),
            ((1, 1, 9, 9), (2, 1, 5, 5), [3, 3]),
        ] {
            let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, shape, &dev)?)?;
            let k = Var::from_tensor(&Tensor::randn(0f64, 1.0, kshape, &dev)?)?;
            let ours = conv2d_gemm(&x, &k, stride)?;
            // Candle's convolution: the other devices' path, run here on the CPU.
            let theirs = candle_conv2d("test", &x, &k, stride, 1)?;
            assert_eq!(ours.dims(), theirs.dims());
            let diff = (&ours - &theirs)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(diff < 1e-12, "forward differs by {diff}");
            let weights = Tensor::randn(0f64, 1.0, ours.dims(), &dev)?;
            let g_ours = (ours * &weights)?.sum_all()?.backward()?;
            let g_theirs = (theirs * &weights)?.sum_all()?.backward()?;
            for v in [&x, &k] {
                let a = g_ours.get(v.as_tensor()).expect("a gradient");
                let b = g_theirs.get(v.as_tensor()).expect("a gradient");
                let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f64>()?;
                assert!(
                    diff < 1e-10,
                    "gradient differs by {diff} for {shape:?} {kshape:?} {stride:?}"
                );
            }
        }
        Ok(())
    }
}

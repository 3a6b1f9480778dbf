//! Depthwise 2D convolution (VALID, strided) with direct loops, forward and backward.
//!
//! Every `(image, channel)` plane is convolved with its channel's own `kh x kw` kernel. The
//! forward pass and the input gradient run in parallel over planes (which never overlap); the
//! kernel gradient runs in parallel over channels, each channel summing over all images.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::dispatch2;

/// Shapes of one depthwise convolution: input `n x c x h x w`, kernel `c x 1 x kh x kw`.
#[derive(Clone, Copy, Debug)]
struct Dims {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    stride: [usize; 2],
}

impl Dims {
    fn oh(&self) -> usize {
        (self.h - self.kh) / self.stride[0] + 1
    }

    fn ow(&self) -> usize {
        (self.w - self.kw) / self.stride[1] + 1
    }
}

/// One of the op's three passes, which decides the shape of what it computes.
#[derive(Clone, Copy)]
enum Pass {
    /// `(input, kernel) -> output`.
    Forward,
    /// `(output gradient, kernel) -> input gradient`.
    GradInput,
    /// `(input, output gradient) -> kernel gradient`.
    GradKernel,
}

impl Pass {
    /// The shape of what this pass computes for `d`.
    fn output(self, d: &Dims) -> Shape {
        match self {
            Pass::Forward => Shape::from((d.n, d.c, d.oh(), d.ow())),
            Pass::GradInput => Shape::from((d.n, d.c, d.h, d.w)),
            Pass::GradKernel => Shape::from((d.c, 1, d.kh, d.kw)),
        }
    }
}

/// Items per rayon task so that each task does at least about this many multiply-adds.
fn min_len(work_per_item: usize) -> usize {
    const MIN_WORK: usize = 1 << 14;
    (MIN_WORK / work_per_item.max(1)).max(1)
}

/// `out[o] += k * x[o * step]` for every `o` of `out`.
#[inline(always)]
fn axpy_strided<T: WithDType>(out: &mut [T], k: T, x: &[T], step: usize) {
    if step == 1 {
        for (o, &v) in out.iter_mut().zip(x) {
            *o += k * v;
        }
    } else {
        for (o, &v) in out.iter_mut().zip(x.iter().step_by(step)) {
            *o += k * v;
        }
    }
}

/// `acc[o] += a[o] * b[o * step]` for every `o` of `acc`.
#[inline(always)]
fn mul_acc_strided<T: WithDType>(acc: &mut [T], a: &[T], b: &[T], step: usize) {
    if step == 1 {
        for ((s, &u), &v) in acc.iter_mut().zip(a).zip(b) {
            *s += u * v;
        }
    } else {
        for ((s, &u), &v) in acc.iter_mut().zip(a).zip(b.iter().step_by(step)) {
            *s += u * v;
        }
    }
}

/// With stride 1 a plane is processed "wide": output `(oy, ox)` lives at `oy * w + ox`, so
/// that each tap `(i, j)` is one long shifted multiply-add over the plane (offset `i * w + j`)
/// instead of one short one per row; the `kw - 1` columns past each output row are scratch.
/// This is the length of such a wide output.
fn wide_len(d: &Dims) -> usize {
    (d.oh() - 1) * d.w + d.ow()
}

fn forward<T: WithDType>(d: &Dims, x: &[T], k: &[T]) -> Vec<T> {
    let (oh, ow) = (d.oh(), d.ow());
    let [sy, sx] = d.stride;
    let (h, w, kh, kw) = (d.h, d.w, d.kh, d.kw);
    let mut out = vec![T::zero(); d.n * d.c * oh * ow];
    if out.is_empty() {
        return out;
    }
    let wide = d.stride == [1, 1];
    let len = wide_len(d);
    out.par_chunks_mut(oh * ow)
        .with_min_len(min_len(oh * ow * kh * kw))
        .enumerate()
        .for_each_init(
            || vec![T::zero(); if wide { len } else { 0 }],
            |scratch, (p, plane_out)| {
                let plane = &x[p * h * w..(p + 1) * h * w];
                let taps = &k[(p % d.c) * kh * kw..][..kh * kw];
                if wide {
                    scratch.fill(T::zero());
                    for i in 0..kh {
                        for j in 0..kw {
                            axpy_strided(scratch, taps[i * kw + j], &plane[i * w + j..], 1);
                        }
                    }
                    for (oy, row_out) in plane_out.chunks_exact_mut(ow).enumerate() {
                        row_out.copy_from_slice(&scratch[oy * w..][..ow]);
                    }
                    return;
                }
                for (oy, row_out) in plane_out.chunks_exact_mut(ow).enumerate() {
                    for i in 0..kh {
                        let row = &plane[(oy * sy + i) * w..][..w];
                        for j in 0..kw {
                            axpy_strided(row_out, taps[i * kw + j], &row[j..], sx);
                        }
                    }
                }
            },
        );
    out
}

/// Copies the `oh x ow` output gradient plane `g` into `wide` with row stride `w`, zeroing the
/// scratch columns.
fn widen<T: WithDType>(wide: &mut [T], g: &[T], w: usize, ow: usize) {
    wide.fill(T::zero());
    for (oy, grow) in g.chunks_exact(ow).enumerate() {
        wide[oy * w..][..ow].copy_from_slice(grow);
    }
}

/// The input gradient: every output gradient scattered back onto the taps of its window.
fn grad_input<T: WithDType>(d: &Dims, g: &[T], k: &[T]) -> Vec<T> {
    let (oh, ow) = (d.oh(), d.ow());
    let [sy, sx] = d.stride;
    let (h, w, kh, kw) = (d.h, d.w, d.kh, d.kw);
    let mut dx = vec![T::zero(); d.n * d.c * h * w];
    if dx.is_empty() {
        return dx;
    }
    let wide = d.stride == [1, 1];
    let len = wide_len(d);
    dx.par_chunks_mut(h * w)
        .with_min_len(min_len(oh * ow * kh * kw))
        .enumerate()
        .for_each_init(
            || vec![T::zero(); if wide { len } else { 0 }],
            |gwide, (p, dplane)| {
                let gplane = &g[p * oh * ow..(p + 1) * oh * ow];
                let taps = &k[(p % d.c) * kh * kw..][..kh * kw];
                if wide {
                    widen(gwide, gplane, w, ow);
                    for i in 0..kh {
                        for j in 0..kw {
                            let kv = taps[i * kw + j];
                            for (dv, &gv) in dplane[i * w + j..].iter_mut().zip(gwide.iter()) {
                                *dv += kv * gv;
                            }
                        }
                    }
                    return;
                }
                for (oy, grow) in gplane.chunks_exact(ow).enumerate() {
                    for i in 0..kh {
                        let drow = &mut dplane[(oy * sy + i) * w..][..w];
                        for j in 0..kw {
                            let kv = taps[i * kw + j];
                            for (dv, &gv) in drow[j..].iter_mut().step_by(sx).zip(grow) {
                                *dv += kv * gv;
                            }
                        }
                    }
                }
            },
        );
    dx
}

/// The kernel gradient: per channel and tap, the sum over images and outputs of the output
/// gradient times the input under the tap.
fn grad_kernel<T: WithDType>(d: &Dims, x: &[T], g: &[T]) -> Vec<T> {
    let (oh, ow) = (d.oh(), d.ow());
    let [sy, sx] = d.stride;
    let (n, c, h, w, kh, kw) = (d.n, d.c, d.h, d.w, d.kh, d.kw);
    let mut dk = vec![T::zero(); c * kh * kw];
    if dk.is_empty() {
        return dk;
    }
    let wide = d.stride == [1, 1];
    // One row of partial sums per tap, reduced at the end: the inner loops stay element-wise
    // multiply-adds (vectorisable) instead of dot products.
    let row = if wide { wide_len(d) } else { ow };
    dk.par_chunks_mut(kh * kw)
        .enumerate()
        .for_each(|(ch, dtaps)| {
            let mut acc = vec![T::zero(); kh * kw * row];
            let mut gwide = vec![T::zero(); if wide { row } else { 0 }];
            for img in 0..n {
                let p = img * c + ch;
                let plane = &x[p * h * w..(p + 1) * h * w];
                let gplane = &g[p * oh * ow..(p + 1) * oh * ow];
                if wide {
                    widen(&mut gwide, gplane, w, ow);
                    for (t, a) in acc.chunks_exact_mut(row).enumerate() {
                        let (i, j) = (t / kw, t % kw);
                        mul_acc_strided(a, &gwide, &plane[i * w + j..], 1);
                    }
                    continue;
                }
                for (oy, grow) in gplane.chunks_exact(ow).enumerate() {
                    for i in 0..kh {
                        let xrow = &plane[(oy * sy + i) * w..][..w];
                        for j in 0..kw {
                            let a = &mut acc[(i * kw + j) * ow..][..ow];
                            mul_acc_strided(a, grow, &xrow[j..], sx);
                        }
                    }
                }
            }
            for (dt, a) in dtaps.iter_mut().zip(acc.chunks_exact(row)) {
                *dt = a.iter().fold(T::zero(), |s, &v| s + v);
            }
        });
    dk
}

/// One pass of the op on its two tensors (in the pass's order).
struct Depthwise {
    pass: Pass,
    dims: Dims,
}

impl Pass {
    /// The pass on CPU slices `a` and `b`.
    fn run_cpu<T: WithDType>(self, d: &Dims, a: &[T], b: &[T]) -> Vec<T> {
        match self {
            Pass::Forward => forward(d, a, b),
            Pass::GradInput => grad_input(d, a, b),
            Pass::GradKernel => grad_kernel(d, a, b),
        }
    }
}

impl CustomOp2 for Depthwise {
    fn name(&self) -> &'static str {
        match self.pass {
            Pass::Forward => "depthwise-conv2d",
            Pass::GradInput => "depthwise-conv2d-grad-input",
            Pass::GradKernel => "depthwise-conv2d-grad-kernel",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (pass, d) = (self.pass, &self.dims);
        let out = dispatch2(
            self.name(),
            (s1, l1),
            (s2, l2),
            |a, b| pass.run_cpu(d, a, b),
            |a, b| pass.run_cpu(d, a, b),
        )?;
        Ok((out, pass.output(d)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (pass, d) = (self.pass, &self.dims);
        Ok((
            gpu::run(self.name(), pass, d, (s1, l1), (s2, l2))?,
            pass.output(d),
        ))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        kernel: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if !matches!(self.pass, Pass::Forward) {
            candle_core::bail!("{}: no second-order gradient", self.name());
        }
        let grad = grad_res.contiguous()?;
        let (xs, kernel) = (xs.detach(), kernel.detach());
        let pass = |pass| Depthwise {
            pass,
            dims: self.dims,
        };
        let dx = grad.apply_op2_no_bwd(&kernel, &pass(Pass::GradInput))?;
        let dk = xs.apply_op2_no_bwd(&grad, &pass(Pass::GradKernel))?;
        Ok((Some(dx), Some(dk)))
    }
}

/// The GPU passes (`kernels/cuda/depthwise.cu`).
#[cfg(feature = "cuda")]
mod gpu {
    use super::{Dims, Pass};
    use crate::cuda::{by_dtype, elementwise, launch, view, zeros, Real, BLOCK, DEPTHWISE};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig};
    use candle_core::cuda_backend::CudaStorage;
    use candle_core::{Layout, Result};

    /// `struct Depthwise` of `depthwise.cu`.
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Shape {
        n: i64,
        c: i64,
        h: i64,
        w: i64,
        kh: i64,
        kw: i64,
        sy: i64,
        sx: i64,
        oh: i64,
        ow: i64,
    }

    // SAFETY: plain data, laid out as the kernel's `struct Depthwise`.
    unsafe impl DeviceRepr for Shape {}

    /// Runs `pass` on the two contiguous tensors `a` and `b` (in the pass's order).
    pub(super) fn run(
        op: &str,
        pass: Pass,
        d: &Dims,
        a: (&CudaStorage, &Layout),
        b: (&CudaStorage, &Layout),
    ) -> Result<CudaStorage> {
        fn typed<T: Real>(
            op: &str,
            (pass, len): (Pass, usize),
            shape: Shape,
            (s1, l1): (&CudaStorage, &Layout),
            (s2, l2): (&CudaStorage, &Layout),
        ) -> Result<CudaStorage> {
            let dev = s1.device();
            let (a, b) = (view::<T>(op, s1, l1)?, view::<T>(op, s2, l2)?);
            let mut out = zeros::<T>(dev, len)?;
            if len > 0 {
                match pass {
                    // SAFETY: `depthwise_forward(Depthwise, const T* x, const T* k, T* out)`;
                    // `x` holds N*C*H*W values, `k` C*kh*kw, `out` N*C*OH*OW.
                    Pass::Forward => {
                        launch!(dev, DEPTHWISE, &T::kernel("depthwise_forward"),
                            elementwise(len); &shape, &a, &b, &mut out)
                    }
                    // SAFETY: `depthwise_grad_input(Depthwise, const T* g, const T* k, T* dx)`;
                    // `g` holds N*C*OH*OW values, `k` C*kh*kw, `dx` N*C*H*W.
                    Pass::GradInput => {
                        launch!(dev, DEPTHWISE, &T::kernel("depthwise_grad_input"),
                            elementwise(len); &shape, &a, &b, &mut out)
                    }
                    // SAFETY: `depthwise_grad_kernel(Depthwise, const T* x, const T* g, T* dk)`
                    // with one block of BLOCK threads per (channel, tap); `x` holds N*C*H*W
                    // values, `g` N*C*OH*OW, `dk` C*kh*kw.
                    Pass::GradKernel => {
                        let cfg = LaunchConfig {
                            grid_dim: (len as u32, 1, 1),
                            block_dim: (BLOCK, 1, 1),
                            shared_mem_bytes: 0,
                        };
                        launch!(dev, DEPTHWISE, &T::kernel("depthwise_grad_kernel"), cfg;
                            &shape, &a, &b, &mut out)
                    }
                }
            }
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }
        let shape = Shape {
            n: d.n as i64,
            c: d.c as i64,
            h: d.h as i64,
            w: d.w as i64,
            kh: d.kh as i64,
            kw: d.kw as i64,
            sy: d.stride[0] as i64,
            sx: d.stride[1] as i64,
            oh: d.oh() as i64,
            ow: d.ow() as i64,
        };
        let len = pass.output(d).elem_count();
        by_dtype!(op, a.0, typed(op, (pass, len), shape, a, b))
    }
}

/// A depthwise VALID convolution of an already padded `N x C x H x W` input with a
/// `C x 1 x kh x kw` kernel and stride `[sy, sx]`: output channel `c` is input channel `c`
/// correlated with kernel `c`, giving `N x C x OH x OW` with `OH = (H - kh) / sy + 1` and
/// `OW = (W - kw) / sx + 1`. Both gradients (input and kernel) are direct loops too.
pub fn depthwise_conv2d(xs: &Tensor, kernel: &Tensor, stride: [usize; 2]) -> Result<Tensor> {
    let (n, c, h, w) = xs.dims4()?;
    let (kc, km, kh, kw) = kernel.dims4()?;
    if kc != c || km != 1 || h < kh || w < kw || kh == 0 || kw == 0 || stride.contains(&0) {
        candle_core::bail!(
            "depthwise_conv2d: a {kc}x{km}x{kh}x{kw} kernel with stride {stride:?} does not fit \
             a {n}x{c}x{h}x{w} input (expected a {c}x1xkhxkw kernel, kh <= {h}, kw <= {w})"
        );
    }
    if !(xs.device().is_cpu() || xs.device().is_cuda()) {
        // Devices without kernels of ours (Metal): candle's grouped convolution.
        return crate::unfold::candle_conv2d("depthwise_conv2d", xs, kernel, stride, c);
    }
    let dims = Dims {
        n,
        c,
        h,
        w,
        kh,
        kw,
        stride,
    };
    xs.contiguous()?.apply_op2(
        &kernel.contiguous()?,
        Depthwise {
            pass: Pass::Forward,
            dims,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// Plain-loop f64 reference of the forward pass.
    fn reference(x: &Tensor, k: &Tensor, stride: [usize; 2]) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let (_, _, kh, kw) = k.dims4()?;
        let (oh, ow) = ((h - kh) / stride[0] + 1, (w - kw) / stride[1] + 1);
        let xv = x.flatten_all()?.to_vec1::<f64>()?;
        let kv = k.flatten_all()?.to_vec1::<f64>()?;
        let mut out = vec![0f64; n * c * oh * ow];
        for img in 0..n {
            for ch in 0..c {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut s = 0f64;
                        for i in 0..kh {
                            for j in 0..kw {
                                let y = oy * stride[0] + i;
                                let xx = ox * stride[1] + j;
                                s += xv[((img * c + ch) * h + y) * w + xx]
                                    * kv[(ch * kh + i) * kw + j];
                            }
                        }
                        out[((img * c + ch) * oh + oy) * ow + ox] = s;
                    }
                }
            }
        }
        Tensor::from_vec(out, (n, c, oh, ow), x.device())
    }

    /// Plain-loop f64 reference of both gradients of `sum(out * weights)`.
    fn reference_grads(
        x: &Tensor,
        k: &Tensor,
        weights: &Tensor,
        stride: [usize; 2],
    ) -> Result<(Tensor, Tensor)> {
        let (n, c, h, w) = x.dims4()?;
        let (_, _, kh, kw) = k.dims4()?;
        let (_, _, oh, ow) = weights.dims4()?;
        let xv = x.flatten_all()?.to_vec1::<f64>()?;
        let kv = k.flatten_all()?.to_vec1::<f64>()?;
        let gv = weights.flatten_all()?.to_vec1::<f64>()?;
        let mut dx = vec![0f64; xv.len()];
        let mut dk = vec![0f64; kv.len()];
        for img in 0..n {
            for ch in 0..c {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let g = gv[((img * c + ch) * oh + oy) * ow + ox];
                        for i in 0..kh {
                            for j in 0..kw {
                                let xi = ((img * c + ch) * h + oy * stride[0] + i) * w
                                    + ox * stride[1]
                                    + j;
                                let ki = (ch * kh + i) * kw + j;
                                dx[xi] += g * kv[ki];
                                dk[ki] += g * xv[xi];
                            }
                        }
                    }
                }
            }
        }
        Ok((
            Tensor::from_vec(dx, x.dims(), x.device())?,
            Tensor::from_vec(dk, k.dims(), k.device())?,
        ))
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
        assert_eq!(a.dims(), b.dims());
        (a - b)?.abs()?.max_all()?.to_scalar::<f64>()
    }

    #[test]
    fn matches_reference_forward_and_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let mut cases = Vec::new();
        for (h, w) in [(7, 5), (9, 9), (6, 8)] {
            for c in [1, 2, 3, 16] {
                for k in [1, 3, 5] {
                    for stride in [[1, 1], [2, 2], [1, 2]] {
                        let n = 1 + (h + c + k + stride[1]) % 3;
                        cases.push(((n, c, h, w), (c, 1, k, k), stride));
                    }
                }
            }
        }
        // Non-square kernels and a stride larger than the kernel.
        cases.push(((2, 3, 7, 8), (3, 1, 3, 1), [1, 1]));
        cases.push(((2, 3, 7, 8), (3, 1, 1, 3), [2, 1]));
        cases.push(((3, 2, 9, 9), (2, 1, 2, 2), [3, 3]));
        for (shape, kshape, stride) in cases {
            let what = format!("{shape:?} {kshape:?} {stride:?}");
            let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, shape, &dev)?)?;
            let k = Var::from_tensor(&Tensor::randn(0f64, 1.0, kshape, &dev)?)?;
            let ours = depthwise_conv2d(&x, &k, stride)?;
            let theirs = reference(&x, &k, stride)?;
            let diff = max_diff(&ours, &theirs)?;
            assert!(diff < 1e-12, "forward differs by {diff} for {what}");

            let weights = Tensor::randn(0f64, 1.0, ours.dims(), &dev)?;
            let grads = (ours * &weights)?.sum_all()?.backward()?;
            let (dx, dk) = reference_grads(&x, &k, &weights, stride)?;
            let gx = grads.get(x.as_tensor()).expect("an input gradient");
            let gk = grads.get(k.as_tensor()).expect("a kernel gradient");
            let diff = max_diff(gx, &dx)?;
            assert!(diff < 1e-10, "input gradient differs by {diff} for {what}");
            let diff = max_diff(gk, &dk)?;
            assert!(diff < 1e-10, "kernel gradient differs by {diff} for {what}");
            if stride[0] == stride[1] {
                // The other devices' path (candle's grouped convolution), run here on the CPU.
                let composed = crate::unfold::candle_conv2d("test", &x, &k, stride, shape.1)?;
                assert!(max_diff(&composed, &theirs)? < 1e-12, "composed {what}");
                let grads = (composed * &weights)?.sum_all()?.backward()?;
                let gx = grads.get(x.as_tensor()).expect("an input gradient");
                let gk = grads.get(k.as_tensor()).expect("a kernel gradient");
                assert!(max_diff(gx, &dx)? < 1e-10, "composed input gradient {what}");
                assert!(
                    max_diff(gk, &dk)? < 1e-10,
                    "composed kernel gradient {what}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn matches_candle_grouped_convolution_in_f32() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 4, 9, 7), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (4, 1, 3, 3), &dev)?;
        let ours = depthwise_conv2d(&x, &k, [2, 2])?;
        let theirs = x.conv2d(&k, 0, 2, 1, 4)?;
        let diff = (ours - theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "forward differs by {diff}");
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let stride = [2, 1];
        let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (2, 2, 5, 4), &dev)?)?;
        let k = Var::from_tensor(&Tensor::randn(0f64, 1.0, (2, 1, 3, 2), &dev)?)?;
        let weights = Tensor::randn(0f64, 1.0, (2, 2, 2, 3), &dev)?;
        let loss = |x: &Tensor, k: &Tensor| -> Result<f64> {
            (depthwise_conv2d(x, k, stride)? * &weights)?
                .sum_all()?
                .to_scalar::<f64>()
        };
        let grads = (depthwise_conv2d(&x, &k, stride)? * &weights)?
            .sum_all()?
            .backward()?;
        let eps = 1e-6;
        for (var, is_x) in [(&x, true), (&k, false)] {
            let base = var.flatten_all()?.to_vec1::<f64>()?;
            let analytic = grads
                .get(var.as_tensor())
                .expect("a gradient")
                .flatten_all()?
                .to_vec1::<f64>()?;
            for idx in 0..base.len() {
                let at = |delta: f64| -> Result<f64> {
                    let mut v = base.clone();
                    v[idx] += delta;
                    let t = Tensor::from_vec(v, var.dims(), &dev)?;
                    match is_x {
                        true => loss(&t, &k),
                        false => loss(&x, &t),
                    }
                };
                let numeric = (at(eps)? - at(-eps)?) / (2.0 * eps);
                assert!(
                    (numeric - analytic[idx]).abs() < 1e-6,
                    "d/d{}[{idx}]: numeric {numeric}, analytic {}",
                    if is_x { "x" } else { "k" },
                    analytic[idx]
                );
            }
        }
        Ok(())
    }

    #[test]
    fn non_contiguous_inputs_and_bad_kernels() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f64, 1.0, (2, 3, 7, 6), &dev)?;
        let k = Tensor::randn(0f64, 1.0, (3, 1, 3, 3), &dev)?;
        let xt = x.transpose(2, 3)?;
        let kt = k.transpose(2, 3)?;
        let ours = depthwise_conv2d(&xt, &kt, [1, 2])?;
        let theirs = reference(&xt.contiguous()?, &kt.contiguous()?, [1, 2])?;
        assert!(max_diff(&ours, &theirs)? < 1e-12);

        let small = Tensor::zeros((1, 3, 2, 5), DType::F64, &dev)?;
        assert!(depthwise_conv2d(&small, &k, [1, 1]).is_err());
        let wrong_channels = Tensor::zeros((2, 1, 1, 1), DType::F64, &dev)?;
        assert!(depthwise_conv2d(&x, &wrong_channels, [1, 1]).is_err());
        let multiplier = Tensor::zeros((3, 2, 1, 1), DType::F64, &dev)?;
        assert!(depthwise_conv2d(&x, &multiplier, [1, 1]).is_err());
        assert!(depthwise_conv2d(&x, &k, [0, 1]).is_err());
        let err = depthwise_conv2d(&small, &k, [1, 1])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("depthwise_conv2d") && err.contains("3x1x3x3"),
            "{err}"
        );
        Ok(())
    }
}

//! im2col ("unfold") and its adjoint col2im ("fold"): they turn a convolution into one matrix
//! multiply, so that training convolutions run on candle's fast GEMM, forward and backward.
//!
//! Two layouts of the patches: a row per patch for the CPU's GEMMs ([`Patches::Rows`], the
//! public [`unfold`]), and a column per patch for a GPU ([`Patches::Columns`]), whose kernels
//! then read and write consecutive output positions in consecutive threads.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::dispatch1;

/// The patches of an (already padded) `N x C x H x W` input under a `kh x kw` window moved by
/// `stride` (VALID): an `(N * OH * OW) x (C * kh * kw)` matrix whose row `(n, oy, ox)` holds
/// the window at output `(oy, ox)` in `(c, i, j)` order, the order of a `O x C x kh x kw`
/// kernel. The gradient folds the rows back, summing where windows overlap.
pub fn unfold(xs: &Tensor, kernel: [usize; 2], stride: [usize; 2]) -> Result<Tensor> {
    unfold_as(xs, kernel, stride, Patches::Rows)
}

/// How a patch matrix lays out the windows of an `N x C x H x W` input (`K = C * kh * kw`
/// values per window, `P = OH * OW` windows per image).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Patches {
    /// `(N * P) x K`: row `(n, oy, ox)` holds that window.
    Rows,
    /// `G x K x (N / G * P)`: the images in `groups` groups of consecutive images, each a
    /// `K x (N / G * P)` matrix whose column `(n, oy, ox)` holds that window.
    Columns { groups: usize },
}

/// What windows read: the input as it lies, or padded (`pads`: `[top, bottom, left, right]`,
/// holding `value`) and perhaps as Larq's signs (`+1` where `x >= 0`, `-1` elsewhere).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Source {
    pub pads: [usize; 4],
    pub value: f64,
    pub signs: bool,
}

impl Source {
    /// The input as it lies.
    const AS_IS: Source = Source {
        pads: [0; 4],
        value: 0.0,
        signs: false,
    };
}

/// [`unfold`] into the layout `patches`.
pub(crate) fn unfold_as(
    xs: &Tensor,
    kernel: [usize; 2],
    stride: [usize; 2],
    patches: Patches,
) -> Result<Tensor> {
    let input = xs.dims4()?;
    let op = Unfold::new("unfold", kernel, stride, input, Source::AS_IS, patches)?;
    xs.contiguous()?.apply_op1(op)
}

/// The column patches of `source` read from `xs` (the binary convolution's padded signs
/// without a padded copy), in `groups` groups of images. Without gradient.
pub(crate) fn unfold_from(
    xs: &Tensor,
    source: Source,
    kernel: [usize; 2],
    stride: [usize; 2],
    groups: usize,
) -> Result<Tensor> {
    let input = xs.dims4()?;
    let op = Unfold::new(
        "unfold",
        kernel,
        stride,
        input,
        source,
        Patches::Columns { groups },
    )?;
    xs.contiguous()?.apply_op1_no_bwd(&op)
}

/// The adjoint of [`unfold_as`]: sums the windows of `cols` (laid out as `patches`) back into
/// the `N x C x H x W` image `input` they came from, adding where windows overlap (pixels no
/// window reaches get 0). Without gradient.
pub(crate) fn fold(
    cols: &Tensor,
    input: (usize, usize, usize, usize),
    kernel: [usize; 2],
    stride: [usize; 2],
    patches: Patches,
) -> Result<Tensor> {
    let op = Fold(Unfold::new(
        "fold",
        kernel,
        stride,
        input,
        Source::AS_IS,
        patches,
    )?);
    let expected = op.0.patches_shape();
    if cols.shape() != &expected {
        let (n, c, h, w) = input;
        candle_core::bail!(
            "fold: {:?} patches do not come from a {n}x{c}x{h}x{w} input under a {}x{} window \
             with stride {stride:?} (expected {expected:?})",
            cols.shape(),
            kernel[0],
            kernel[1]
        );
    }
    cols.contiguous()?.apply_op1_no_bwd(&op)
}

/// The windows of one input.
#[derive(Clone, Copy, Debug)]
struct Unfold {
    kernel: [usize; 2],
    stride: [usize; 2],
    /// The input's dimensions (before any padding of `source`).
    input: (usize, usize, usize, usize),
    source: Source,
    patches: Patches,
}

impl Unfold {
    /// Checks that the window fits the padded input and the groups divide its images (row
    /// patches read the input as it lies); `op` names the caller in errors.
    fn new(
        op: &str,
        kernel: [usize; 2],
        stride: [usize; 2],
        input: (usize, usize, usize, usize),
        source: Source,
        patches: Patches,
    ) -> Result<Unfold> {
        let [top, bottom, left, right] = source.pads;
        let (n, _, h, w) = input;
        let (h, w) = (h + top + bottom, w + left + right);
        if h < kernel[0] || w < kernel[1] || stride.contains(&0) || kernel.contains(&0) {
            candle_core::bail!(
                "{op}: a {}x{} window with stride {:?} does not fit a {h}x{w} input",
                kernel[0],
                kernel[1],
                stride
            );
        }
        match patches {
            Patches::Columns { groups } if groups == 0 || !n.is_multiple_of(groups) => {
                candle_core::bail!("{op}: {groups} groups do not divide {n} images")
            }
            Patches::Rows if source != Source::AS_IS => {
                candle_core::bail!("{op}: row patches read the input as it lies")
            }
            _ => {}
        }
        Ok(Unfold {
            kernel,
            stride,
            input,
            source,
            patches,
        })
    }

    fn output_hw(&self) -> (usize, usize) {
        let [top, bottom, left, right] = self.source.pads;
        let (_, _, h, w) = self.input;
        let (h, w) = (h + top + bottom, w + left + right);
        (
            (h - self.kernel[0]) / self.stride[0] + 1,
            (w - self.kernel[1]) / self.stride[1] + 1,
        )
    }

    /// Values per window.
    fn window(&self) -> usize {
        self.input.1 * self.kernel[0] * self.kernel[1]
    }

    fn patches_shape(&self) -> Shape {
        let (oh, ow) = self.output_hw();
        let (n, k) = (self.input.0, self.window());
        match self.patches {
            Patches::Rows => Shape::from((n * oh * ow, k)),
            Patches::Columns { groups } => Shape::from((groups, k, n / groups * oh * ow)),
        }
    }
}

fn unfold_into<T: WithDType>(op: &Unfold, x: &[T]) -> Vec<T> {
    let (n, c, h, w) = op.input;
    let [kh, kw] = op.kernel;
    let [sy, sx] = op.stride;
    let (oh, ow) = op.output_hw();
    let k = op.window();
    let mut cols = vec![T::zero(); n * oh * ow * k];
    match op.patches {
        // One chunk per (image, output row).
        Patches::Rows => cols
            .par_chunks_mut(ow * k)
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
            }),
        // One chunk per (group, window value). (Only tests run column patches on the CPU.)
        Patches::Columns { groups } => {
            let per = n / groups;
            let Source { pads, value, signs } = op.source;
            let (top, left) = (pads[0], pads[2]);
            // The padded input at row `py`, column `px` of channel `ch` of image `img`.
            let read = |img: usize, ch: usize, py: usize, px: usize| -> T {
                match (py.checked_sub(top), px.checked_sub(left)) {
                    (Some(y), Some(xx)) if y < h && xx < w => {
                        let v = x[((img * c + ch) * h + y) * w + xx];
                        match signs {
                            true if v.to_f64() >= 0.0 => T::from_f64(1.0),
                            true => T::from_f64(-1.0),
                            false => v,
                        }
                    }
                    _ => T::from_f64(value),
                }
            };
            cols.par_chunks_mut(per * oh * ow)
                .enumerate()
                .for_each(|(row, out)| {
                    let (group, col) = (row / k, row % k);
                    let (ch, i, j) = (col / (kh * kw), col / kw % kh, col % kw);
                    for (local, image) in out.chunks_mut(oh * ow).enumerate() {
                        let img = group * per + local;
                        for (oy, line) in image.chunks_mut(ow).enumerate() {
                            for (ox, v) in line.iter_mut().enumerate() {
                                *v = read(img, ch, oy * sy + i, ox * sx + j);
                            }
                        }
                    }
                })
        }
    }
    cols
}

fn fold_into<T: WithDType>(op: &Unfold, cols: &[T]) -> Vec<T> {
    let (n, c, h, w) = op.input;
    let [kh, kw] = op.kernel;
    let [sy, sx] = op.stride;
    let (oh, ow) = op.output_hw();
    let k = op.window();
    let mut x = vec![T::zero(); n * c * h * w];
    // One chunk per image: windows of different images never overlap.
    let images = x.par_chunks_mut(c * h * w).enumerate();
    match op.patches {
        Patches::Rows => images.for_each(|(img, image)| {
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
        }),
        Patches::Columns { groups } => {
            let per = n / groups;
            let m = per * oh * ow;
            images.for_each(|(img, image)| {
                let (group, local) = (img / per, img % per);
                for col in 0..k {
                    let (ch, i, j) = (col / (kh * kw), col / kw % kh, col % kw);
                    let values = &cols[(group * k + col) * m + local * oh * ow..][..oh * ow];
                    for (oy, line) in values.chunks(ow).enumerate() {
                        let dst = ch * h * w + (oy * sy + i) * w + j;
                        for (ox, v) in line.iter().enumerate() {
                            image[dst + ox * sx] += *v;
                        }
                    }
                }
            })
        }
    }
    x
}

impl CustomOp1 for Unfold {
    fn name(&self) -> &'static str {
        "unfold"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = dispatch1(
            self.name(),
            (storage, layout),
            |x| unfold_into(self, x),
            |x| unfold_into(self, x),
        )?;
        Ok((out, self.patches_shape()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let shape = self.patches_shape();
        let out = gpu::run(self.name(), "unfold", self, (storage, layout), &shape)?;
        Ok((out, shape))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        if self.source != Source::AS_IS {
            candle_core::bail!("unfold: no gradient through padding or signs");
        }
        let op = Fold(*self);
        Ok(Some(grad_res.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

/// The op of [`fold`].
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let shape = Shape::from(self.0.input);
        let out = gpu::run(self.name(), "fold", &self.0, (storage, layout), &shape)?;
        Ok((out, shape))
    }
}

/// The GPU passes (`kernels/cuda/unfold.cu`).
#[cfg(feature = "cuda")]
mod gpu {
    use super::{Patches, Unfold};
    use crate::cuda::{by_dtype, elementwise, launch, view, zeros, Real, UNFOLD};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
    use candle_core::cuda_backend::CudaStorage;
    use candle_core::{Layout, Result, Shape};

    /// `struct Unfold` of `unfold.cu`.
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Dims {
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
        groups: i64,
        top: i64,
        left: i64,
        signs: i64,
        pad_value: f64,
    }

    // SAFETY: plain data, laid out as the kernel's `struct Unfold`.
    unsafe impl DeviceRepr for Dims {}

    /// Runs `kernel` (`unfold` or `fold`) of `u`'s windows on the contiguous tensor `input`,
    /// giving a fresh tensor of `output`'s shape.
    pub(super) fn run(
        op: &str,
        kernel: &str,
        u: &Unfold,
        input: (&CudaStorage, &Layout),
        output: &Shape,
    ) -> Result<CudaStorage> {
        fn typed<T: Real>(
            op: &str,
            kernel: &str,
            dims: Dims,
            (storage, layout): (&CudaStorage, &Layout),
            len: usize,
        ) -> Result<CudaStorage> {
            let dev = storage.device();
            let src = view::<T>(op, storage, layout)?;
            let mut out = zeros::<T>(dev, len)?;
            if len > 0 {
                // SAFETY: `unfold(Unfold, const T* x, T* cols)` and `fold(Unfold, const T*
                // cols, T* x)`, one thread per output element: `x` holds N*C*H*W values and
                // `cols` N*OH*OW*C*kh*kw, `out` the output's `len`.
                launch!(dev, UNFOLD, &T::kernel(kernel), elementwise(len); &dims, &src, &mut out);
            }
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }
        let (n, c, h, w) = u.input;
        let (oh, ow) = u.output_hw();
        let dims = Dims {
            n: n as i64,
            c: c as i64,
            h: h as i64,
            w: w as i64,
            kh: u.kernel[0] as i64,
            kw: u.kernel[1] as i64,
            sy: u.stride[0] as i64,
            sx: u.stride[1] as i64,
            oh: oh as i64,
            ow: ow as i64,
            groups: match u.patches {
                Patches::Rows => 0,
                Patches::Columns { groups } => groups as i64,
            },
            top: u.source.pads[0] as i64,
            left: u.source.pads[2] as i64,
            signs: u.source.signs as i64,
            pad_value: u.source.value,
        };
        let len = output.elem_count();
        by_dtype!(op, input.0, typed(op, kernel, dims, input, len))
    }
}

/// A VALID convolution of an already padded `N x C x H x W` input with an `O x C x kh x kw`
/// kernel, as [`unfold`] followed by one matrix multiply (forward and backward on GEMMs). On a
/// GPU the patches are columns, so that one GEMM gives the output channels first.
pub fn conv2d_gemm(xs: &Tensor, kernel: &Tensor, stride: [usize; 2]) -> Result<Tensor> {
    if !(xs.device().is_cpu() || xs.device().is_cuda()) {
        // Devices without an unfold of ours (Metal): candle's convolution.
        return candle_conv2d("conv2d_gemm", xs, kernel, stride, 1);
    }
    let (n, c, h, w) = xs.dims4()?;
    let (o, kc, kh, kw) = kernel.dims4()?;
    if kc != c {
        candle_core::bail!(
            "conv2d_gemm: a kernel for {kc} channels does not fit a {c}-channel input"
        );
    }
    if xs.device().is_cuda() {
        return conv2d_columns(xs, kernel, stride);
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

/// [`conv2d_gemm`] on column patches, as a GPU runs it: `W P` gives the output channels first.
fn conv2d_columns(xs: &Tensor, kernel: &Tensor, stride: [usize; 2]) -> Result<Tensor> {
    let (n, c, h, w) = xs.dims4()?;
    let (o, _, kh, kw) = kernel.dims4()?;
    let weights = kernel.reshape((o, c * kh * kw))?;
    if kh == 1 && kw == 1 && stride == [1, 1] {
        // Each image's C x (H * W) map is already its patch matrix.
        let maps = xs.reshape((n, c, h * w))?;
        return weights
            .broadcast_as((n, o, c))?
            .matmul(&maps)?
            .reshape((n, o, h, w));
    }
    let (oh, ow) = ((h - kh) / stride[0] + 1, (w - kw) / stride[1] + 1);
    let cols = unfold_as(xs, [kh, kw], stride, Patches::Columns { groups: 1 })?;
    weights
        .matmul(&cols.squeeze(0)?)?
        .reshape((o, n, oh, ow))?
        .transpose(0, 1)?
        .contiguous()
}

/// A VALID strided convolution of an already padded input in candle's own convolution op (and
/// its autograd), for tensors on devices without kernels of ours: the rows and columns no window
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
    use candle_core::{DType, Device, Var};

    #[test]
    fn column_patches_are_the_rows_transposed_per_group_read_padded_signs_and_fold_back(
    ) -> Result<()> {
        let dev = Device::Cpu;
        for (shape, kernel, stride, groups) in [
            ((4, 3, 7, 6), [3, 3], [1, 1], 2),
            ((6, 2, 9, 8), [3, 2], [2, 3], 3),
            ((2, 5, 4, 4), [1, 1], [1, 1], 1),
            ((3, 1, 5, 5), [5, 5], [1, 1], 3),
        ] {
            let what = format!("{shape:?} {kernel:?} {stride:?} {groups} groups");
            let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, shape, &dev)?)?;
            let layout = Patches::Columns { groups };
            let columns = unfold_as(&x, kernel, stride, layout)?;
            let rows = unfold(&x, kernel, stride)?;
            let (m, k) = rows.dims2()?;
            let expected = rows.reshape((groups, m / groups, k))?.transpose(1, 2)?;
            assert_eq!(columns.dims(), expected.dims(), "{what}");
            let diff = (&columns - &expected)?
                .abs()?
                .max_all()?
                .to_scalar::<f64>()?;
            assert_eq!(diff, 0.0, "{what}: unfold");
            // Fold is the adjoint in both layouts, and the gradient of the column unfold.
            let r = Tensor::randn(0f64, 1.0, columns.dims(), &dev)?;
            let folded = fold(&r, shape, kernel, stride, layout)?;
            let r_rows = r.transpose(1, 2)?.reshape((m, k))?;
            let folded_rows = fold(&r_rows, shape, kernel, stride, Patches::Rows)?;
            let diff = (&folded - &folded_rows)?
                .abs()?
                .max_all()?
                .to_scalar::<f64>()?;
            assert!(diff < 1e-12, "{what}: fold differs by {diff}");
            let grad = (columns * &r)?.sum_all()?.backward()?;
            let grad = grad.get(x.as_tensor()).expect("a gradient");
            let diff = (grad - &folded)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(diff < 1e-12, "{what}: gradient differs by {diff}");
        }
        // Padded signs read in place: the patches of the padded copy.
        let x = (Tensor::randn(0f64, 1.0, (4, 3, 5, 6), &dev)? * 2.0)?;
        for (pads, value) in [([1, 1, 1, 1], 0.0), ([0, 2, 1, 0], 1.0)] {
            let source = Source {
                pads,
                value,
                signs: true,
            };
            let ours = unfold_from(&x, source, [3, 3], [2, 1], 2)?;
            let padded = (crate::sign(&x)? - value)?
                .pad_with_zeros(2, pads[0], pads[1])?
                .pad_with_zeros(3, pads[2], pads[3])?
                .affine(1.0, value)?;
            let theirs = unfold_as(&padded, [3, 3], [2, 1], Patches::Columns { groups: 2 })?;
            let diff = (ours - theirs)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert_eq!(diff, 0.0, "padded signs {pads:?} {value}");
        }
        assert!(unfold_as(
            &Tensor::zeros((3, 1, 4, 4), DType::F32, &dev)?,
            [3, 3],
            [1, 1],
            Patches::Columns { groups: 2 }
        )
        .is_err());
        Ok(())
    }

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
            // Candle's convolution: the other devices' path, run here on the CPU.
            let theirs = candle_conv2d("test", &x, &k, stride, 1)?;
            let weights = Tensor::randn(0f64, 1.0, theirs.dims(), &dev)?;
            let g_theirs = (&theirs * &weights)?.sum_all()?.backward()?;
            // The CPU's row patches, and the GPU's column patches run here on the CPU.
            for ours in [
                conv2d_gemm(&x, &k, stride)?,
                conv2d_columns(&x, &k, stride)?,
            ] {
                assert_eq!(ours.dims(), theirs.dims());
                let diff = (&ours - &theirs)?.abs()?.max_all()?.to_scalar::<f64>()?;
                assert!(diff < 1e-12, "forward differs by {diff}");
                let g_ours = (ours * &weights)?.sum_all()?.backward()?;
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
        }
        Ok(())
    }
}

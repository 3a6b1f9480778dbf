//! The training-time binary convolution: `conv(pad(sign(x)), sign(w))` as one custom op.
//!
//! Forward: the exact integer convolution of the signs by XNOR-popcount on bit-packed maps
//! ([`crate::packed::BinaryConv`], prepared once per call, images in parallel).
//!
//! Backward: both products on GEMMs (the `gemm` crate), one kernel tap at a time and only over
//! the output positions whose window puts that tap inside the image, so that no GEMM multiplies
//! padding: per tap `t`, `dX_t = dY_t sign(W_t)` (added back to the input rows it came from)
//! and `dW_t = dY_t^T sign(X_t)`, with `dY_t`, `X_t` the rows of those positions (channels
//! last). Positions where the tap reads padding give no input gradient, and add
//! `pad_value * sum(dY over them)` to every weight of the tap. The straight-through masks
//! `1{|x| <= clip}` and `1{|w| <= clip}` are applied in the passes that write the two
//! gradients (the kernel's read as bits from one pass over the kernel, which also takes the
//! signs), and both gradients come out of one op.
//!
//! On a GPU (feature `cuda`): the forward pass packs the signs and counts mismatches with
//! `popc` (`kernels/cuda/binary_conv.cu`), and the backward pass is the same pair of products
//! as matrix multiplies on im2col patches ([`backward_gemm`], checked against the fused op on
//! the CPU).

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use std::borrow::Cow;
use std::mem::MaybeUninit;

use crate::packed::{self, ConvGeometry, ConvInput, PackedConvWeights, PackedMap, PadValue};
use crate::{dispatch2, dispatch3};

/// The configuration of a [`binary_conv2d`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BinaryConv2d {
    /// Vertical and horizontal stride.
    pub stride: [usize; 2],
    /// Padding `[top, bottom, left, right]` around the binarized input.
    pub pads: [usize; 4],
    /// The value the padding holds: `0.0` or `1.0`.
    pub pad_value: f64,
    /// The input's straight-through clip: the input gradient is masked by `1{|x| <= clip}`.
    /// `None` when the input is already ±1 (binarized by a layer with its own gradient): the
    /// gradient then passes unmasked.
    pub input_clip: Option<f64>,
    /// The kernel's straight-through clip: the kernel gradient is masked by `1{|w| <= clip}`.
    pub kernel_clip: f64,
}

/// The binary convolution of `x` (`N x C x H x W`) with the latent kernel `weight`
/// (`O x C x kh x kw`): `conv(pad(sign(x), pad_value), sign(weight))` (VALID after the padding,
/// strided), where `sign` is `+1` for `x >= 0` and `-1` elsewhere. The output
/// (`N x O x OH x OW`, integers) is exact; the gradients are Larq's straight-through ones:
/// `x` gets the convolution's input gradient, without the padded positions, masked by
/// `1{|x| <= input_clip}` (unmasked when `input_clip` is `None`), and `weight` gets the kernel
/// gradient masked by `1{|w| <= kernel_clip}`. f32 or f64; on the CPU both gradients come from
/// one backward op, on a CUDA GPU the forward pass is a kernel of ours and the backward pass
/// GEMMs on im2col patches. (A NaN input or weight counts as `+1`, as in [`crate::packed`].)
pub fn binary_conv2d(x: &Tensor, weight: &Tensor, conv: &BinaryConv2d) -> Result<Tensor> {
    let geometry = Geometry::new(x.dims4()?, weight.dims4()?, conv)?;
    x.contiguous()?.apply_op2(
        &weight.contiguous()?,
        BinaryConv {
            conv: *conv,
            geometry,
        },
    )
}

/// The sizes of one convolution.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    kh: usize,
    kw: usize,
    sy: usize,
    sx: usize,
    top: usize,
    left: usize,
    pads: [usize; 4],
    oh: usize,
    ow: usize,
}

/// One kernel tap `(i, j)` and the output rectangle `[oy0, oy1) x [ox0, ox1)` whose windows put
/// it inside the image.
#[derive(Clone, Copy, Debug)]
struct Tap {
    i: usize,
    j: usize,
    oy: (usize, usize),
    ox: (usize, usize),
}

impl Tap {
    fn rows(&self) -> usize {
        self.oy.1 - self.oy.0
    }

    fn cols(&self) -> usize {
        self.ox.1 - self.ox.0
    }

    fn contains(&self, oy: usize, ox: usize) -> bool {
        (self.oy.0..self.oy.1).contains(&oy) && (self.ox.0..self.ox.1).contains(&ox)
    }
}

/// The outputs `[lo, hi)` among `outputs` whose window offset `k` lands inside `[0, size)`:
/// `lo * stride + k - pad >= 0` and `hi` the first past `size - 1`.
fn inside(outputs: usize, size: usize, stride: usize, pad: usize, k: usize) -> (usize, usize) {
    let lo = pad.saturating_sub(k).div_ceil(stride);
    let hi = match (size + pad).checked_sub(k + 1) {
        Some(last) => (last / stride + 1).min(outputs),
        None => 0,
    };
    if lo < hi {
        (lo, hi)
    } else {
        (0, 0)
    }
}

impl Geometry {
    fn new(
        (n, c, h, w): (usize, usize, usize, usize),
        (o, kc, kh, kw): (usize, usize, usize, usize),
        conv: &BinaryConv2d,
    ) -> Result<Self> {
        let [sy, sx] = conv.stride;
        let [top, bottom, left, right] = conv.pads;
        let (hp, wp) = (h + top + bottom, w + left + right);
        if kc != c {
            candle_core::bail!(
                "binary_conv2d: a kernel for {kc} channels does not fit a {c}-channel input"
            );
        }
        if sy == 0 || sx == 0 || kh == 0 || kw == 0 || hp < kh || wp < kw {
            candle_core::bail!(
                "binary_conv2d: a {kh}x{kw} kernel with stride {:?} does not fit a padded \
                 {hp}x{wp} input",
                conv.stride
            );
        }
        if conv.pad_value != 0.0 && conv.pad_value != 1.0 {
            candle_core::bail!(
                "binary_conv2d: the pad value must be 0 or 1, found {}",
                conv.pad_value
            );
        }
        Ok(Geometry {
            n,
            c,
            h,
            w,
            o,
            kh,
            kw,
            sy,
            sx,
            top,
            left,
            pads: conv.pads,
            oh: (hp - kh) / sy + 1,
            ow: (wp - kw) / sx + 1,
        })
    }

    fn taps(&self) -> Vec<Tap> {
        let mut taps = Vec::with_capacity(self.kh * self.kw);
        for i in 0..self.kh {
            for j in 0..self.kw {
                taps.push(Tap {
                    i,
                    j,
                    oy: inside(self.oh, self.h, self.sy, self.top, i),
                    ox: inside(self.ow, self.w, self.sx, self.left, j),
                });
            }
        }
        taps
    }

    /// Whether the tap reads input pixel `(oy, ox)` at every output `(oy, ox)`: its gathered
    /// rows are the whole input and output maps, in the same order.
    fn is_identity(&self, tap: &Tap) -> bool {
        self.sy == 1
            && self.sx == 1
            && (self.oh, self.ow) == (self.h, self.w)
            && (tap.i, tap.j) == (self.top, self.left)
    }

    /// The channels-last input row read by tap `tap` at output `(oy, ox)` of image `img`.
    fn input_row(&self, tap: &Tap, img: usize, oy: usize, ox: usize) -> usize {
        let y = oy * self.sy + tap.i - self.top;
        let x = ox * self.sx + tap.j - self.left;
        (img * self.h + y) * self.w + x
    }

    fn output_pixels(&self) -> usize {
        self.oh * self.ow
    }
}

/// The forward op; the latent kernel is its second argument.
struct BinaryConv {
    conv: BinaryConv2d,
    geometry: Geometry,
}

impl CustomOp2 for BinaryConv {
    fn name(&self) -> &'static str {
        "binary-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = &self.geometry;
        let out = dispatch2(
            self.name(),
            (s1, l1),
            (s2, l2),
            |x, w| forward(g, self.conv.pad_value, x, w),
            |x, w| forward(g, self.conv.pad_value, x, w),
        )?;
        Ok((out, Shape::from((g.n, g.o, g.oh, g.ow))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let g = &self.geometry;
        let out = gpu::forward(self.name(), g, self.conv.pad_value, (s1, l1), (s2, l2))?;
        Ok((out, Shape::from((g.n, g.o, g.oh, g.ow))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if !crate::fused_on(x.device()) {
            let (dx, dw) = backward_gemm(x, weight, grad, &self.conv, &self.geometry)?;
            return Ok((Some(dx), Some(dw)));
        }
        let both = x.apply_op3_no_bwd(
            weight,
            &grad.contiguous()?,
            &BinaryConvBackward {
                conv: self.conv,
                geometry: self.geometry,
            },
        )?;
        let (nx, nw) = (x.elem_count(), weight.elem_count());
        Ok((
            Some(both.narrow(0, 0, nx)?.reshape(x.shape())?),
            Some(both.narrow(0, nx, nw)?.reshape(weight.shape())?),
        ))
    }
}

/// Both gradients of [`BinaryConv`], concatenated flat (input first).
struct BinaryConvBackward {
    conv: BinaryConv2d,
    geometry: Geometry,
}

impl CustomOp3 for BinaryConvBackward {
    fn name(&self) -> &'static str {
        "binary-conv2d-backward"
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
        let g = &self.geometry;
        let out = dispatch3(
            self.name(),
            (s1, l1),
            (s2, l2),
            (s3, l3),
            |x, w, gy| backward(g, &self.conv, x, w, gy),
            |x, w, gy| backward(g, &self.conv, x, w, gy),
        )?;
        let len = g.n * g.c * g.h * g.w + g.o * g.c * g.kh * g.kw;
        Ok((out, Shape::from(len)))
    }
}

/// Both gradients of [`BinaryConv`] as matrix multiplies of candle ops on im2col patches (the
/// backward pass on a GPU, where they run on cuBLAS; on the CPU under
/// [`crate::compose_on_cpu`], checked against the fused op). The images go in `G` groups
/// ([`gemm_groups`]); per group, with `dY` the output gradient as an `O x M` matrix (`M` the
/// group's output positions), `P` the `K x M` patches of the padded signs (a column per
/// window) and `W` the kernel's signs as `O x K`: `dW = sum over groups of dY P^T` and
/// `dX = fold(W^T dY)` without the padding. The groups split the kernel gradient's long sum
/// over output positions into a batched GEMM, which keeps a GPU busy where one product with a
/// short output and a long inner dimension would not; the column layout lets the GPU's
/// unfold and fold read and write consecutive positions in consecutive threads.
fn backward_gemm(
    x: &Tensor,
    weight: &Tensor,
    grad: &Tensor,
    conv: &BinaryConv2d,
    g: &Geometry,
) -> Result<(Tensor, Tensor)> {
    let (x, weight, grad) = (x.detach(), weight.detach(), grad.detach());
    let [top, bottom, left, right] = conv.pads;
    let (hp, wp) = (g.h + top + bottom, g.w + left + right);
    let (k, pixels) = (g.c * g.kh * g.kw, g.output_pixels());
    let groups = gemm_groups(g.n, pixels);
    let per = g.n / groups;
    let (window, stride) = ([g.kh, g.kw], [g.sy, g.sx]);
    // The windows of pad(sign(x), pad_value), read from x.
    let source = crate::unfold::Source {
        pads: conv.pads,
        value: conv.pad_value,
        signs: true,
    };
    let patches = crate::unfold::unfold_from(&x, source, window, stride, groups)?;
    let dy = grad
        .reshape((groups, per, g.o, pixels))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((groups, g.o, per * pixels))?;
    let dw = dy
        .matmul(&patches.transpose(1, 2)?)?
        .sum(0)?
        .reshape(weight.shape())?;
    let dw = crate::sign::ste_mask(&weight, &dw, conv.kernel_clip)?;
    let kernel = crate::sign(&weight)?.reshape((g.o, k))?.t()?;
    let dcols = kernel.broadcast_as((groups, k, g.o))?.matmul(&dy)?;
    let layout = crate::unfold::Patches::Columns { groups };
    let dx = crate::unfold::fold(&dcols, (g.n, g.c, hp, wp), window, stride, layout)?
        .narrow(2, top, g.h)?
        .narrow(3, left, g.w)?;
    let dx = match conv.input_clip {
        Some(clip) => crate::sign::ste_mask(&x, &dx, clip)?,
        None => dx,
    };
    Ok((dx, dw))
}

/// Into how many groups of whole images [`backward_gemm`] splits `n` images of `pixels` output
/// positions each: the most (a divisor of `n`) that keep at least `MIN_ROWS` positions in each.
fn gemm_groups(n: usize, pixels: usize) -> usize {
    const MIN_ROWS: usize = 16_384;
    (1..=n)
        .rev()
        .find(|&groups| n.is_multiple_of(groups) && n / groups * pixels >= MIN_ROWS)
        .unwrap_or(1)
}

/// The GPU forward pass (`kernels/cuda/binary_conv.cu`).
#[cfg(feature = "cuda")]
mod gpu {
    use super::Geometry;
    use crate::cuda::{by_dtype, elementwise, launch, view, zeros, Real, BINARY_CONV};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
    use candle_core::cuda_backend::CudaStorage;
    use candle_core::{Layout, Result};

    /// `struct Conv` of `binary_conv.cu`.
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Conv {
        n: i64,
        c: i64,
        h: i64,
        w: i64,
        o: i64,
        kh: i64,
        kw: i64,
        sy: i64,
        sx: i64,
        top: i64,
        left: i64,
        oh: i64,
        ow: i64,
        pad_one: i32,
    }

    // SAFETY: plain data, laid out as the kernel's `struct Conv`.
    unsafe impl DeviceRepr for Conv {}

    pub(super) fn forward(
        op: &str,
        g: &Geometry,
        pad_value: f64,
        (s1, l1): (&CudaStorage, &Layout),
        (s2, l2): (&CudaStorage, &Layout),
    ) -> Result<CudaStorage> {
        fn run<T: Real>(
            op: &str,
            g: &Geometry,
            pad_value: f64,
            (s1, l1): (&CudaStorage, &Layout),
            (s2, l2): (&CudaStorage, &Layout),
        ) -> Result<CudaStorage> {
            let dev = s1.device();
            let (x, w) = (view::<T>(op, s1, l1)?, view::<T>(op, s2, l2)?);
            let conv = Conv {
                n: g.n as i64,
                c: g.c as i64,
                h: g.h as i64,
                w: g.w as i64,
                o: g.o as i64,
                kh: g.kh as i64,
                kw: g.kw as i64,
                sy: g.sy as i64,
                sx: g.sx as i64,
                top: g.top as i64,
                left: g.left as i64,
                oh: g.oh as i64,
                ow: g.ow as i64,
                pad_one: i32::from(pad_value == 1.0),
            };
            let (words, taps) = (g.c.div_ceil(32), g.kh * g.kw);
            let outputs = g.n * g.o * g.oh * g.ow;
            let mut out = zeros::<T>(dev, outputs)?;
            if outputs == 0 || g.c == 0 {
                return Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()));
            }
            let mut xbits = zeros::<u32>(dev, g.n * words * g.h * g.w)?;
            let mut wbits = zeros::<u32>(dev, g.o * taps * words)?;
            let mut tap_sums = zeros::<i32>(dev, g.o * taps)?;
            // SAFETY (all three): the signatures of `binary_conv.cu`; `x` holds N*C*H*W
            // values, `w` O*C*kh*kw, the bit buffers N*H*W and O*kh*kw rows of `words` words,
            // `tap_sums` O*kh*kw and `out` N*O*OH*OW.
            launch!(dev, BINARY_CONV, &T::kernel("pack_input"), elementwise(g.n * words * g.h * g.w);
                &conv, &x, &mut xbits);
            launch!(dev, BINARY_CONV, &T::kernel("pack_weights"), elementwise(g.o * taps);
                &conv, &w, &mut wbits, &mut tap_sums);
            launch!(dev, BINARY_CONV, &T::kernel("conv_forward"), elementwise(outputs);
                &conv, &xbits, &wbits, &tap_sums, &mut out);
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }
        by_dtype!(op, s1, run(op, g, pad_value, (s1, l1), (s2, l2)))
    }
}

/// The floating-point types the op takes (those the GEMMs and the packing take).
trait Float: WithDType {
    /// The values as f32 with the same [`sign`] (the packing reads f32).
    fn signs(data: &[Self]) -> Cow<'_, [f32]>;

    /// The largest value not above `bound` (so that `v <= at_most(b)` iff `v as f64 <= b`).
    fn at_most(bound: f64) -> Self;
}

impl Float for f32 {
    fn signs(data: &[f32]) -> Cow<'_, [f32]> {
        Cow::Borrowed(data)
    }

    fn at_most(bound: f64) -> f32 {
        let nearest = bound as f32;
        if nearest as f64 > bound {
            // One step towards minus infinity (the bound is finite here).
            match nearest {
                0.0 => -f32::from_bits(1),
                v if v > 0.0 => f32::from_bits(v.to_bits() - 1),
                v => f32::from_bits(v.to_bits() + 1),
            }
        } else {
            nearest
        }
    }
}

impl Float for f64 {
    fn signs(data: &[f64]) -> Cow<'_, [f32]> {
        // Not `as f32`: a tiny negative f64 would round to -0.0, whose sign is +1.
        Cow::Owned(data.iter().map(|&v| sign(v) as f32).collect())
    }

    fn at_most(bound: f64) -> f64 {
        bound
    }
}

/// `|v| <= clip` for a `clip` rounded by [`Float::at_most`]: the straight-through estimator's
/// mask (false for NaN).
fn within<T: Float>(v: T, clip: T) -> bool {
    v <= clip && T::zero() - clip <= v
}

/// `-1` where `v < 0`, `+1` elsewhere (NaN included, as in the packing).
fn sign<T: Float>(v: T) -> T {
    if v < T::zero() {
        T::zero() - T::one()
    } else {
        T::one()
    }
}

/// A strided read-only matrix.
#[derive(Clone, Copy)]
struct Mat<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a, T> Mat<'a, T> {
    /// A row-major `rows x cols` matrix.
    fn rows(data: &'a [T], rows: usize, cols: usize) -> Self {
        Mat {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose (a view).
    fn t(self) -> Self {
        Mat {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    fn fits(&self, len: usize) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride < len
    }
}

/// `dst = a * b` (or `dst += a * b` when `accumulate`), `dst` row-major `a.rows x b.cols`, on
/// the `gemm` crate (candle's CPU GEMM), parallel on the current rayon pool.
fn matmul<T: Float>(dst: &mut [T], accumulate: bool, a: Mat<T>, b: Mat<T>) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(b.rows == k && dst.len() >= m * n && a.fits(a.data.len()) && b.fits(b.data.len()));
    if m == 0 || n == 0 || (k == 0 && accumulate) {
        return;
    }
    let parallelism = match rayon::current_num_threads() {
        1 => gemm::Parallelism::None,
        threads => gemm::Parallelism::Rayon(threads),
    };
    // SAFETY: the assert above keeps every index the GEMM touches inside the three slices
    // (dst row-major m x n; a and b within their strides), and dst, borrowed mutably, aliases
    // neither a nor b.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// `NCHW -> NHWC` (`(n, p, c)` from `(n, c, p)` with `p` the pixel), through `f`.
fn channels_last<T: Float>(
    src: &[T],
    n: usize,
    c: usize,
    p: usize,
    f: impl Fn(T) -> T + Sync,
) -> Vec<T> {
    let mut dst = vec![T::zero(); n * c * p];
    if c * p == 0 {
        return dst;
    }
    dst.par_chunks_mut(c * p)
        .zip(src.par_chunks(c * p))
        .for_each(|(dst, src)| {
            for (ci, plane) in src.chunks(p).enumerate() {
                for (pi, &v) in plane.iter().enumerate() {
                    dst[pi * c + ci] = f(v);
                }
            }
        });
    dst
}

/// Copies, for every image and output `(oy, ox)` of the tap's rectangle (in that order), the
/// `width` values of row `row(img, oy, ox)` of `src` into `dst`.
fn gather<T: Float>(
    src: &[T],
    width: usize,
    g: &Geometry,
    tap: &Tap,
    row: impl Fn(usize, usize, usize) -> usize + Sync,
    dst: &mut [T],
) {
    let per_image = tap.rows() * tap.cols() * width;
    dst[..g.n * per_image]
        .par_chunks_mut(per_image)
        .enumerate()
        .for_each(|(img, dst)| {
            let mut out = dst.chunks_mut(width);
            for oy in tap.oy.0..tap.oy.1 {
                for ox in tap.ox.0..tap.ox.1 {
                    let r = row(img, oy, ox);
                    out.next()
                        .expect("a row per output")
                        .copy_from_slice(&src[r * width..(r + 1) * width]);
                }
            }
        });
}

/// Adds the rows of `src` (one per image and output of the tap's rectangle, as [`gather`] lays
/// them out) to the input rows they came from in the channels-last `dst`.
fn scatter_add<T: Float>(src: &[T], g: &Geometry, tap: &Tap, dst: &mut [T]) {
    let c = g.c;
    let per_image = tap.rows() * tap.cols() * c;
    dst.par_chunks_mut(g.h * g.w * c)
        .zip(src[..g.n * per_image].par_chunks(per_image))
        .for_each(|(image, src)| {
            let mut rows = src.chunks(c);
            for oy in tap.oy.0..tap.oy.1 {
                for ox in tap.ox.0..tap.ox.1 {
                    let r = g.input_row(tap, 0, oy, ox);
                    let row = rows.next().expect("a row per output");
                    for (d, &s) in image[r * c..(r + 1) * c].iter_mut().zip(row) {
                        *d += s;
                    }
                }
            }
        });
}

/// The exact forward `conv(pad(sign(x)), sign(w))`, NCHW: the packed XNOR-popcount
/// convolution of each image (images in parallel), its integer dots converted in the epilogue
/// (channels-last) and transposed to NCHW.
fn forward<T: Float>(g: &Geometry, pad_value: f64, x: &[T], w: &[T]) -> Vec<T> {
    let weights = PackedConvWeights::from_signs(&T::signs(w), g.o, g.c, [g.kh, g.kw]);
    let conv = packed::BinaryConv::new(
        &weights,
        ConvGeometry {
            stride: [g.sy, g.sx],
            pads: g.pads,
            pad_value: if pad_value == 0.0 {
                PadValue::Zero
            } else {
                PadValue::One
            },
        },
    );
    let (image, pixels) = (g.c * g.h * g.w, g.output_pixels());
    let mut out = vec![T::zero(); g.n * g.o * pixels];
    if image == 0 || g.o * pixels == 0 {
        return out;
    }
    out.par_chunks_mut(g.o * pixels)
        .zip(x.par_chunks(image))
        .for_each_init(
            || vec![T::zero(); pixels * g.o],
            |rows, (out, x)| {
                let map = PackedMap::from_nchw_signs(&T::signs(x), g.c, g.h, g.w);
                conv.run(ConvInput::Packed(&map), rows, |_, dots, row| {
                    for (r, &d) in row.iter_mut().zip(dots) {
                        *r = T::from_f64(d as f64);
                    }
                });
                for (p, px) in rows.chunks_exact(g.o).enumerate() {
                    for (oo, &v) in px.iter().enumerate() {
                        out[oo * pixels + p] = v;
                    }
                }
            },
        );
    out
}

/// Both gradients, flat: the input's (`N x C x H x W`) then the kernel's (`O x C x kh x kw`).
fn backward<T: Float>(g: &Geometry, conv: &BinaryConv2d, x: &[T], w: &[T], gy: &[T]) -> Vec<T> {
    let taps = g.taps();
    let slots = tap_slots(g, &taps);
    let gys = channels_last(gy, g.n, g.o, g.output_pixels(), |v| v);
    let (dx, dw) = tap_products(g, &taps, &slots, x, w, &gys);
    let padding = padding_shares(g, conv.pad_value, &taps, &gys);
    // Both gradients are written whole, into the op's output.
    let len = x.len() + w.len();
    let mut out: Vec<T> = Vec::with_capacity(len);
    let (gx, gw) = out.spare_capacity_mut()[..len].split_at_mut(x.len());
    input_gradient(g, conv.input_clip, x, &dx, gx);
    kernel_gradient(g, conv.kernel_clip, w, (&slots, &dw), &padding, gw);
    // SAFETY: the two calls above wrote all `len` elements (`x.len() = n * c * h * w` in
    // chunks of `c * h * w`, `w.len() = o * c * kt` in chunks of `c * kt`).
    unsafe { out.set_len(len) };
    out
}

/// For each tap, its slot among the taps that read the image somewhere (`None` for a tap that
/// reads only padding).
fn tap_slots(g: &Geometry, taps: &[Tap]) -> Vec<Option<usize>> {
    taps.iter()
        .scan(0, |next, tap| {
            let used = tap.rows() * tap.cols() > 0 && g.n > 0;
            *next += used as usize;
            Some(used.then(|| *next - 1))
        })
        .collect()
}

/// The GEMMs of each tap that reads the image: the input gradient before its mask (NHWC) and
/// the kernel gradient of each such tap (`[slot][o][c]`, without the padding's share or mask).
fn tap_products<T: Float>(
    g: &Geometry,
    taps: &[Tap],
    slots: &[Option<usize>],
    x: &[T],
    w: &[T],
    gys: &[T],
) -> (Vec<T>, Vec<T>) {
    let (c, o, kt) = (g.c, g.o, taps.len());
    let used_taps: Vec<(usize, usize)> = slots
        .iter()
        .enumerate()
        .filter_map(|(t, s)| s.map(|s| (t, s)))
        .collect();
    // sign(w) of the used taps, `[o][slot][c]`.
    let sw_row = (used_taps.len() * c).max(1);
    let mut sw = vec![T::zero(); o * sw_row];
    if c * kt > 0 {
        sw.par_chunks_mut(sw_row)
            .zip(w.par_chunks(c * kt))
            .for_each(|(sw, w)| {
                for &(t, s) in &used_taps {
                    for (d, &v) in sw[s * c..(s + 1) * c]
                        .iter_mut()
                        .zip(w[t..].iter().step_by(kt))
                    {
                        *d = sign(v);
                    }
                }
            });
    }
    let xs = channels_last(x, g.n, c, g.h * g.w, sign);
    let largest = taps.iter().map(|t| t.rows() * t.cols()).max().unwrap_or(0) * g.n;
    let (mut gy_rows, mut x_rows, mut dx_rows) = (Vec::new(), Vec::new(), Vec::new());
    let mut dx = vec![T::zero(); g.n * g.h * g.w * c];
    let mut dw = vec![T::zero(); used_taps.len() * o * c];
    for &(t, slot) in &used_taps {
        let tap = &taps[t];
        let m = g.n * tap.rows() * tap.cols();
        // sign(w) at this tap (O x C) and the kernel gradient's place for it.
        let sw_t = Mat {
            data: &sw[slot * c..],
            rows: o,
            cols: c,
            row_stride: sw_row,
            col_stride: 1,
        };
        let dw_t = &mut dw[slot * o * c..][..o * c];
        if g.is_identity(tap) {
            let gy_t = Mat::rows(gys, m, o);
            matmul(&mut dx, true, gy_t, sw_t);
            matmul(dw_t, false, gy_t.t(), Mat::rows(&xs, m, c));
            continue;
        }
        let gy_t = if tap.rows() == g.oh && tap.cols() == g.ow {
            Mat::rows(gys, m, o)
        } else {
            gy_rows.resize(largest * o, T::zero());
            let row = |img, oy, ox| (img * g.oh + oy) * g.ow + ox;
            gather(gys, o, g, tap, row, &mut gy_rows);
            Mat::rows(&gy_rows[..], m, o)
        };
        x_rows.resize(largest * c, T::zero());
        let row = |img, oy, ox| g.input_row(tap, img, oy, ox);
        gather(&xs, c, g, tap, row, &mut x_rows);
        matmul(dw_t, false, gy_t.t(), Mat::rows(&x_rows, m, c));
        dx_rows.resize(largest * c, T::zero());
        matmul(&mut dx_rows, false, gy_t, sw_t);
        scatter_add(&dx_rows, g, tap, &mut dx);
    }
    (dx, dw)
}

/// The padding's share of each tap's kernel gradient (`[tap][o]`): a tap reading padding at an
/// output pixel adds `pad` times that pixel's output gradient, summed over the batch.
fn padding_shares<T: Float>(g: &Geometry, pad_value: f64, taps: &[Tap], gys: &[T]) -> Vec<T> {
    let (o, pixels) = (g.o, g.output_pixels());
    let mut padding = vec![T::zero(); taps.len() * o];
    if pad_value == 0.0 || pixels * o == 0 {
        return padding;
    }
    let mut pixel_sums = vec![T::zero(); pixels * o];
    for image in gys.chunks(pixels * o) {
        for (d, &s) in pixel_sums.iter_mut().zip(image) {
            *d += s;
        }
    }
    let pad = T::from_f64(pad_value);
    for (tap, sums) in taps.iter().zip(padding.chunks_mut(o)) {
        for oy in 0..g.oh {
            for ox in (0..g.ow).filter(|&ox| !tap.contains(oy, ox)) {
                let p = (oy * g.ow + ox) * o;
                for (d, &s) in sums.iter_mut().zip(&pixel_sums[p..p + o]) {
                    *d += pad * s;
                }
            }
        }
    }
    padding
}

/// Writes the input gradient: `dx` (NHWC) back to NCHW, where `|x| <= clip` (all of it
/// without a clip).
fn input_gradient<T: Float>(
    g: &Geometry,
    clip: Option<f64>,
    x: &[T],
    dx: &[T],
    gx: &mut [MaybeUninit<T>],
) {
    let (c, hw) = (g.c, g.h * g.w);
    if hw * c == 0 {
        return;
    }
    let clip = clip.map(T::at_most);
    gx.par_chunks_mut(c * hw)
        .zip(dx.par_chunks(c * hw))
        .zip(x.par_chunks(c * hw))
        .for_each(|((gx, dx), x)| {
            for (ci, (gx, x)) in gx.chunks_exact_mut(hw).zip(x.chunks_exact(hw)).enumerate() {
                for (p, (gx, &x)) in gx.iter_mut().zip(x).enumerate() {
                    let inside = clip.is_none_or(|clip| within(x, clip));
                    gx.write(if inside { dx[p * c + ci] } else { T::zero() });
                }
            }
        });
}

/// Writes the kernel gradient: each tap's product (`dw` at the tap's slot) plus the padding's
/// share, where `|w| <= clip` (the straight-through mask), tap by tap through each filter's
/// `C x kh x kw` block.
fn kernel_gradient<T: Float>(
    g: &Geometry,
    clip: f64,
    w: &[T],
    (slots, dw): (&[Option<usize>], &[T]),
    padding: &[T],
    gw: &mut [MaybeUninit<T>],
) {
    let (c, o, kt) = (g.c, g.o, slots.len());
    if c * kt == 0 {
        return;
    }
    let clip = T::at_most(clip);
    gw.par_chunks_mut(c * kt)
        .zip(w.par_chunks(c * kt))
        .enumerate()
        .for_each(|(oo, (gw, w))| {
            let masked = |g: &mut MaybeUninit<T>, &w: &T, value: T| {
                let inside = within(w, clip);
                g.write(if inside { value } else { T::zero() });
            };
            for (t, slot) in slots.iter().enumerate() {
                let base = padding[t * o + oo];
                let gw = gw[t..].iter_mut().step_by(kt);
                let w = w[t..].iter().step_by(kt);
                match slot {
                    Some(s) => {
                        let products = &dw[(s * o + oo) * c..][..c];
                        for ((g, w), &p) in gw.zip(w).zip(products) {
                            masked(g, w, base + p);
                        }
                    }
                    None => gw.zip(w).for_each(|(g, w)| masked(g, w, base)),
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// TensorFlow's SAME padding `(before, after)` along one axis.
    fn same(size: usize, k: usize, s: usize) -> (usize, usize) {
        let out = size.div_ceil(s);
        let total = ((out - 1) * s + k).saturating_sub(size);
        (total / 2, total - total / 2)
    }

    /// The reference: `conv2d_gemm` on the padded `ste_sign`ed input and kernel.
    fn reference(x: &Tensor, w: &Tensor, conv: &BinaryConv2d) -> Result<Tensor> {
        let xs = match conv.input_clip {
            Some(clip) => crate::ste_sign(x, clip)?,
            // Already ±1: the sign with the identity's gradient.
            None => (crate::sign(x)? + (x - x.detach())?)?,
        };
        let [top, bottom, left, right] = conv.pads;
        let padded = xs
            .pad_with_zeros(2, top, bottom)?
            .pad_with_zeros(3, left, right)?;
        let padded = if conv.pad_value == 1.0 {
            let ones = xs.ones_like()?.detach();
            let inside = ones
                .pad_with_zeros(2, top, bottom)?
                .pad_with_zeros(3, left, right)?;
            (padded + (inside.ones_like()? - inside)?)?
        } else {
            padded
        };
        let kernel = crate::ste_sign(w, conv.kernel_clip)?;
        crate::conv2d_gemm(&padded, &kernel, conv.stride)
    }

    fn max_abs(t: &Tensor) -> f64 {
        t.abs()
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.max(0))
            .and_then(|t| t.to_dtype(DType::F64))
            .and_then(|t| t.to_scalar::<f64>())
            .expect("a scalar")
    }

    fn check(
        (n, c, h, w): (usize, usize, usize, usize),
        (o, k): (usize, usize),
        stride: usize,
        pads: Option<[usize; 4]>,
        pad_value: f64,
        input_clip: Option<f64>,
    ) -> Result<()> {
        let dev = Device::Cpu;
        let pads = pads.unwrap_or_else(|| {
            let (top, bottom) = same(h, k, stride);
            let (left, right) = same(w, k, stride);
            [top, bottom, left, right]
        });
        let conv = BinaryConv2d {
            stride: [stride, stride],
            pads,
            pad_value,
            input_clip,
            kernel_clip: 0.8,
        };
        let x = Tensor::randn(0f64, 1.0, (n, c, h, w), &dev)?;
        let x = match input_clip {
            Some(_) => x,
            None => crate::sign(&x)?,
        };
        let x = Var::from_tensor(&x)?;
        let wt = Var::from_tensor(&Tensor::randn(0f64, 1.0, (o, c, k, k), &dev)?)?;
        let ours = binary_conv2d(&x, &wt, &conv)?;
        let theirs = reference(&x, &wt, &conv)?;
        let case = format!("{:?} {o}x{k}x{k} {conv:?}", (n, c, h, w));
        assert_eq!(ours.dims(), theirs.dims(), "{case}");
        assert_eq!(max_abs(&(&ours - &theirs)?), 0.0, "forward differs: {case}");
        // f32 is exact too.
        let ours32 = binary_conv2d(&x.to_dtype(DType::F32)?, &wt.to_dtype(DType::F32)?, &conv)?;
        assert_eq!(
            max_abs(&(ours32.to_dtype(DType::F64)? - &theirs)?),
            0.0,
            "f32 forward differs: {case}"
        );
        let r = Tensor::randn(0f64, 1.0, ours.dims(), &dev)?;
        let g_ours = (ours * &r)?.sum_all()?.backward()?;
        let g_theirs = (theirs * &r)?.sum_all()?.backward()?;
        // The other devices' backward, in candle's ops, run here on the CPU.
        let composed = backward_gemm(
            &x,
            &wt,
            &r,
            &conv,
            &Geometry::new(x.dims4()?, wt.dims4()?, &conv)?,
        )?;
        for (name, v, c) in [("input", &x, &composed.0), ("kernel", &wt, &composed.1)] {
            let a = g_ours.get(v.as_tensor()).expect("a gradient");
            let b = g_theirs.get(v.as_tensor()).expect("a gradient");
            let err = max_abs(&(a - b)?) / max_abs(b).max(1.0);
            assert!(err < 1e-5, "{name} gradient differs by {err}: {case}");
            let err = max_abs(&(c - b)?) / max_abs(b).max(1.0);
            assert!(
                err < 1e-9,
                "composed {name} gradient differs by {err}: {case}"
            );
        }
        Ok(())
    }

    #[test]
    fn matches_the_float_convolution_and_its_gradients() -> Result<()> {
        let shapes = [
            ((2, 1, 7, 5), 3),
            ((2, 3, 9, 8), 4),
            ((1, 65, 5, 7), 7),
            ((2, 130, 3, 3), 5),
            ((3, 4, 1, 1), 6),
            ((1, 3, 2, 6), 2),
        ];
        for ((shape, o), (k, stride)) in shapes
            .iter()
            .flat_map(|s| [(1, 1), (3, 1), (1, 2), (3, 2)].map(|ks| (*s, ks)))
        {
            for pad_value in [0.0, 1.0] {
                for input_clip in [Some(1.0), None] {
                    check(shape, (o, k), stride, None, pad_value, input_clip)?;
                }
            }
        }
        Ok(())
    }

    #[test]
    fn handles_valid_asymmetric_and_wide_padding() -> Result<()> {
        for pads in [[0, 0, 0, 0], [0, 2, 1, 0], [2, 1, 0, 3], [3, 3, 3, 3]] {
            for stride in [1, 2, 3] {
                for pad_value in [0.0, 1.0] {
                    check(
                        (2, 3, 6, 5),
                        (4, 3),
                        stride,
                        Some(pads),
                        pad_value,
                        Some(0.7),
                    )?;
                }
            }
        }
        // A window larger than the image: every output reads padding.
        check((2, 5, 2, 2), (3, 5), 1, Some([2, 2, 2, 2]), 1.0, Some(1.0))?;
        Ok(())
    }

    #[test]
    fn splits_the_kernel_gradient_by_whole_images() -> Result<()> {
        assert_eq!(gemm_groups(256, 56 * 56), 32);
        assert_eq!(gemm_groups(256, 7 * 7), 1);
        assert_eq!(gemm_groups(6, 10_000), 3);
        assert_eq!(gemm_groups(1, 1), 1);
        // Four groups of one image each: the split products, summed, give the kernel gradient.
        assert_eq!(gemm_groups(4, 128 * 128), 4);
        check((4, 2, 128, 128), (3, 3), 1, None, 1.0, Some(1.0))
    }

    #[test]
    fn clip_thresholds_compare_like_f64() {
        let bounds = [
            0.8,
            1.25,
            1.0,
            0.0,
            -0.0,
            -0.3,
            1e-40,
            -1e-40,
            3.4e38,
            1e39,
            f64::INFINITY,
        ];
        for bound in bounds {
            let t = f32::at_most(bound);
            assert!(t as f64 <= bound || bound.is_nan(), "{bound}: {t}");
            for v in [
                t,
                f32::from_bits(t.to_bits().wrapping_add(1)),
                -t,
                0.0,
                -0.0,
                0.8,
                1.25,
            ] {
                assert_eq!(v <= t, v as f64 <= bound, "{v} against {bound}");
            }
            assert_eq!(f64::at_most(bound), bound);
        }
    }

    #[test]
    fn rejects_bad_geometry() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 2, 3, 3), DType::F32, &dev).expect("x");
        let w = Tensor::zeros((4, 2, 5, 5), DType::F32, &dev).expect("w");
        let conv = BinaryConv2d {
            stride: [1, 1],
            pads: [0; 4],
            pad_value: 0.0,
            input_clip: None,
            kernel_clip: 1.0,
        };
        assert!(binary_conv2d(&x, &w, &conv).is_err());
        let pad_two = BinaryConv2d {
            pads: [1; 4],
            pad_value: 2.0,
            ..conv
        };
        assert!(binary_conv2d(&x, &w, &pad_two).is_err());
    }
}

//! 2D max and average pooling with explicit padding and TensorFlow's gradients.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType,
};

use crate::contiguous_slice;

/// Window, stride and padding of a 2D pooling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pool2d {
    /// Window height and width.
    pub size: [usize; 2],
    /// Vertical and horizontal stride.
    pub stride: [usize; 2],
    /// Rows added before and after, columns added before and after.
    pub padding: [usize; 4],
}

impl Pool2d {
    fn output_hw(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        let [top, bottom, left, right] = self.padding;
        let (ph, pw) = (h + top + bottom, w + left + right);
        if ph < self.size[0] || pw < self.size[1] {
            candle_core::bail!(
                "pool2d: a {}x{} window does not fit a padded {ph}x{pw} input",
                self.size[0],
                self.size[1]
            );
        }
        Ok((
            (ph - self.size[0]) / self.stride[0] + 1,
            (pw - self.size[1]) / self.stride[1] + 1,
        ))
    }

    /// The input rows and columns inside the window of output `(oy, ox)` (clipped to the image).
    fn window(
        &self,
        oy: usize,
        ox: usize,
        h: usize,
        w: usize,
    ) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
        let y0 = (oy * self.stride[0]) as isize - self.padding[0] as isize;
        let x0 = (ox * self.stride[1]) as isize - self.padding[2] as isize;
        let rows = y0.max(0) as usize..((y0 + self.size[0] as isize).max(0) as usize).min(h);
        let cols = x0.max(0) as usize..((x0 + self.size[1] as isize).max(0) as usize).min(w);
        (rows, cols)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Max,
    Avg,
}

/// The pooling forward pass.
struct Forward(Pool2d, Kind);
/// The gradient of the pooling with respect to its input: `(input, output gradient) -> input gradient`.
struct Backward(Pool2d, Kind);

fn dims(layout: &Layout) -> Result<(usize, usize, usize, usize)> {
    layout.shape().dims4()
}

fn forward<T: WithDType>(
    p: &Pool2d,
    kind: Kind,
    x: &[T],
    (n, c, h, w): (usize, usize, usize, usize),
) -> Result<(Vec<T>, usize, usize)> {
    let (oh, ow) = p.output_hw(h, w)?;
    let mut out = Vec::with_capacity(n * c * oh * ow);
    for plane in x.chunks_exact(h * w).take(n * c) {
        for oy in 0..oh {
            for ox in 0..ow {
                let (rows, cols) = p.window(oy, ox, h, w);
                let count = rows.len() * cols.len();
                let value = match kind {
                    // A window entirely in the padding sees only -inf in TensorFlow.
                    Kind::Max => rows
                        .flat_map(|y| plane[y * w + cols.start..y * w + cols.end].iter().copied())
                        .fold(None, |m: Option<T>, v| match m {
                            Some(m) if m >= v => Some(m),
                            _ => Some(v),
                        })
                        .unwrap_or(T::from_f64(f64::NEG_INFINITY)),
                    Kind::Avg if count == 0 => T::from_f64(0.0),
                    Kind::Avg => {
                        let sum: f64 = rows
                            .flat_map(|y| plane[y * w + cols.start..y * w + cols.end].iter())
                            .map(|v| v.to_f64())
                            .sum();
                        T::from_f64(sum / count as f64)
                    }
                };
                out.push(value);
            }
        }
    }
    Ok((out, oh, ow))
}

fn backward<T: WithDType>(
    p: &Pool2d,
    kind: Kind,
    x: &[T],
    grad: &[T],
    (n, c, h, w): (usize, usize, usize, usize),
) -> Result<Vec<T>> {
    let (oh, ow) = p.output_hw(h, w)?;
    let mut dx = vec![T::from_f64(0.0); n * c * h * w];
    for (i, (plane, dplane)) in x
        .chunks_exact(h * w)
        .zip(dx.chunks_exact_mut(h * w))
        .enumerate()
    {
        let g = &grad[i * oh * ow..(i + 1) * oh * ow];
        for oy in 0..oh {
            for ox in 0..ow {
                let (rows, cols) = p.window(oy, ox, h, w);
                let go = g[oy * ow + ox];
                match kind {
                    Kind::Max => {
                        // The first maximum in row-major order, as TensorFlow's MaxPoolGrad.
                        let mut best: Option<(usize, T)> = None;
                        for y in rows {
                            for xx in cols.clone() {
                                let v = plane[y * w + xx];
                                if best.is_none_or(|(_, b)| v > b) {
                                    best = Some((y * w + xx, v));
                                }
                            }
                        }
                        if let Some((at, _)) = best {
                            dplane[at] += go;
                        }
                    }
                    Kind::Avg => {
                        let count = rows.len() * cols.len();
                        if count == 0 {
                            continue;
                        }
                        let share = T::from_f64(go.to_f64() / count as f64);
                        for y in rows {
                            for xx in cols.clone() {
                                dplane[y * w + xx] += share;
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(dx)
}

impl CustomOp1 for Forward {
    fn name(&self) -> &'static str {
        match self.1 {
            Kind::Max => "max-pool2d",
            Kind::Avg => "avg-pool2d",
        }
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = dims(layout)?;
        let (out, oh, ow) = match storage.dtype() {
            DType::F32 => {
                let (v, oh, ow) = forward(
                    &self.0,
                    self.1,
                    contiguous_slice::<f32>(self.name(), storage, layout)?,
                    (n, c, h, w),
                )?;
                (CpuStorage::F32(v), oh, ow)
            }
            DType::F64 => {
                let (v, oh, ow) = forward(
                    &self.0,
                    self.1,
                    contiguous_slice::<f64>(self.name(), storage, layout)?,
                    (n, c, h, w),
                )?;
                (CpuStorage::F64(v), oh, ow)
            }
            other => candle_core::bail!("{}: expected f32 or f64, found {other:?}", self.name()),
        };
        Ok((out, Shape::from((n, c, oh, ow))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, c, h, w) = dims(layout)?;
        let (oh, ow) = self.0.output_hw(h, w)?;
        let out = gpu::run(
            self.name(),
            &self.0,
            self.1,
            (n, c, h, w),
            (storage, layout),
            None,
        )?;
        Ok((out, Shape::from((n, c, oh, ow))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let grad = arg
            .detach()
            .apply_op2_no_bwd(&grad_res.contiguous()?, &Backward(self.0, self.1))?;
        Ok(Some(grad))
    }
}

impl CustomOp2 for Backward {
    fn name(&self) -> &'static str {
        match self.1 {
            Kind::Max => "max-pool2d-backward",
            Kind::Avg => "avg-pool2d-backward",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = dims(l1)?;
        let out = match (s1.dtype(), s2.dtype()) {
            (DType::F32, DType::F32) => CpuStorage::F32(backward(
                &self.0,
                self.1,
                contiguous_slice::<f32>(self.name(), s1, l1)?,
                contiguous_slice::<f32>(self.name(), s2, l2)?,
                d,
            )?),
            (DType::F64, DType::F64) => CpuStorage::F64(backward(
                &self.0,
                self.1,
                contiguous_slice::<f64>(self.name(), s1, l1)?,
                contiguous_slice::<f64>(self.name(), s2, l2)?,
                d,
            )?),
            (a, b) => candle_core::bail!(
                "{}: expected two f32 or two f64 tensors, found {a:?} and {b:?}",
                self.name()
            ),
        };
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let d = dims(l1)?;
        let out = gpu::run(self.name(), &self.0, self.1, d, (s1, l1), Some((s2, l2)))?;
        Ok((out, l1.shape().clone()))
    }
}

/// The GPU passes (`kernels/cuda/pool.cu`).
#[cfg(feature = "cuda")]
mod gpu {
    use super::{Kind, Pool2d};
    use crate::cuda::{by_dtype, elementwise, launch, view, zeros, Real, POOL};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
    use candle_core::cuda_backend::CudaStorage;
    use candle_core::{Layout, Result};

    /// `struct Pool` of `pool.cu`.
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Shape {
        planes: i64,
        h: i64,
        w: i64,
        kh: i64,
        kw: i64,
        sy: i64,
        sx: i64,
        top: i64,
        left: i64,
        oh: i64,
        ow: i64,
        max: i32,
    }

    // SAFETY: plain data, laid out as the kernel's `struct Pool`.
    unsafe impl DeviceRepr for Shape {}

    /// The forward pass (`grad` is `None`: the output) or the backward pass (`grad` is the
    /// output gradient: the input gradient) of input `x`.
    pub(super) fn run(
        op: &str,
        pool: &Pool2d,
        kind: Kind,
        (n, c, h, w): (usize, usize, usize, usize),
        x: (&CudaStorage, &Layout),
        grad: Option<(&CudaStorage, &Layout)>,
    ) -> Result<CudaStorage> {
        fn typed<T: Real>(
            op: &str,
            shape: Shape,
            (s1, l1): (&CudaStorage, &Layout),
            grad: Option<(&CudaStorage, &Layout)>,
        ) -> Result<CudaStorage> {
            let dev = s1.device();
            let x = view::<T>(op, s1, l1)?;
            let len = match grad {
                None => shape.planes * shape.oh * shape.ow,
                Some(_) => shape.planes * shape.h * shape.w,
            } as usize;
            let mut out = zeros::<T>(dev, len)?;
            if len > 0 {
                match grad {
                    // SAFETY: `pool_forward(Pool, const T* x, T* out)`; `x` holds
                    // N*C*H*W values, `out` N*C*OH*OW.
                    None => launch!(dev, POOL, &T::kernel("pool_forward"), elementwise(len);
                        &shape, &x, &mut out),
                    Some((s2, l2)) => {
                        let g = view::<T>(op, s2, l2)?;
                        // SAFETY: `pool_backward(Pool, const T* x, const T* grad, T* dx)`;
                        // `x` and `dx` hold N*C*H*W values, `grad` N*C*OH*OW.
                        launch!(dev, POOL, &T::kernel("pool_backward"), elementwise(len);
                            &shape, &x, &g, &mut out);
                    }
                }
            }
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }
        let (oh, ow) = pool.output_hw(h, w)?;
        let shape = Shape {
            planes: (n * c) as i64,
            h: h as i64,
            w: w as i64,
            kh: pool.size[0] as i64,
            kw: pool.size[1] as i64,
            sy: pool.stride[0] as i64,
            sx: pool.stride[1] as i64,
            top: pool.padding[0] as i64,
            left: pool.padding[2] as i64,
            oh: oh as i64,
            ow: ow as i64,
            max: i32::from(kind == Kind::Max),
        };
        by_dtype!(op, x.0, typed(op, shape, x, grad))
    }
}

/// Max pooling of an `N x C x H x W` tensor; padded cells never win. The gradient goes to the
/// first maximum of each window in row-major order (TensorFlow's MaxPoolGrad).
pub fn max_pool2d(x: &Tensor, pool: Pool2d) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Forward(pool, Kind::Max))
}

/// Average pooling of an `N x C x H x W` tensor over the cells of each window that lie inside
/// the image (TensorFlow's SAME semantics; with no padding every window is full).
pub fn avg_pool2d(x: &Tensor, pool: Pool2d) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Forward(pool, Kind::Avg))
}

//! Larq's sign: `+1` where `x >= 0`, `-1` elsewhere.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use crate::{dispatch1, dispatch2};

struct Sign;

fn sign_of<T: candle_core::WithDType>(data: &[T]) -> Vec<T> {
    let zero = T::from_f64(0.0);
    let (plus, minus) = (T::from_f64(1.0), T::from_f64(-1.0));
    data.iter()
        .map(|&x| if x >= zero { plus } else { minus })
        .collect()
}

impl CustomOp1 for Sign {
    fn name(&self) -> &'static str {
        "larq-sign"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = dispatch1(self.name(), (storage, layout), sign_of, sign_of)?;
        Ok((out, layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda::unary(self.name(), "sign", storage, layout)?;
        Ok((out, layout.shape().clone()))
    }
}

/// `+1` where `x >= 0` (including `-0.0`), `-1` elsewhere. The result carries no gradient: the
/// binarizers in `zoo::layers` attach their own straight-through estimators.
pub fn sign(x: &Tensor) -> Result<Tensor> {
    x.detach().contiguous()?.apply_op1_no_bwd(&Sign)
}

/// Larq's `ste_sign`: [`sign`] forward, gradient passed where `|x| <= clip` and zero elsewhere,
/// in one op each way.
pub fn ste_sign(x: &Tensor, clip: f64) -> Result<Tensor> {
    let op = SignWithSlope {
        name: "ste-sign",
        slope: SteMask(clip),
    };
    x.contiguous()?.apply_op1(op)
}

/// Bi-Real Net's ApproxSign on the CPU: [`sign`] forward, gradient `2 - 2|x|` where
/// `|x| <= 1` and 0 elsewhere (NaN included), in one op each way. (`zoo::layers::approx_sign`
/// composes candle ops on other devices.)
pub fn approx_sign(x: &Tensor) -> Result<Tensor> {
    let op = SignWithSlope {
        name: "approx-sign",
        slope: ApproxSignBackward,
    };
    x.contiguous()?.apply_op1(op)
}

/// [`sign`] forward; backward, `slope` of the input and the output's gradient.
struct SignWithSlope<S> {
    name: &'static str,
    slope: S,
}

impl<S: candle_core::CustomOp2 + Send + Sync> CustomOp1 for SignWithSlope<S> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        Sign.cpu_fwd(storage, layout)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Sign.cuda_fwd(storage, layout)
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let grad = arg
            .detach()
            .apply_op2_no_bwd(&grad_res.contiguous()?, &self.slope)?;
        Ok(Some(grad))
    }
}

/// `grad * (2 - 2|x|)` where `|x| <= 1`, else 0: the slope computed as `|x| * -2 + 2`, the
/// composition's operations.
struct ApproxSignBackward;

fn approx_slope<T: candle_core::WithDType>(x: &[T], grad: &[T]) -> Vec<T> {
    let (zero, one) = (T::from_f64(0.0), T::from_f64(1.0));
    let (minus_two, two) = (T::from_f64(-2.0), T::from_f64(2.0));
    x.iter()
        .zip(grad)
        .map(|(&x, &g)| {
            let abs = if x < zero { zero - x } else { x };
            if abs <= one {
                g * (abs * minus_two + two)
            } else {
                zero
            }
        })
        .collect()
}

impl candle_core::CustomOp2 for ApproxSignBackward {
    fn name(&self) -> &'static str {
        "approx-sign-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = dispatch2(self.name(), (s1, l1), (s2, l2), approx_slope, approx_slope)?;
        Ok((out, l1.shape().clone()))
    }
}

/// `grad * 1{|x| <= clip}` (compared in f64), without gradient.
pub(crate) fn ste_mask(x: &Tensor, grad: &Tensor, clip: f64) -> Result<Tensor> {
    x.detach()
        .contiguous()?
        .apply_op2_no_bwd(&grad.contiguous()?, &SteMask(clip))
}

/// `grad * 1{|x| <= clip}`.
struct SteMask(f64);

fn masked<T: candle_core::WithDType>(x: &[T], grad: &[T], clip: f64) -> Vec<T> {
    let zero = T::from_f64(0.0);
    x.iter()
        .zip(grad)
        .map(|(&x, &g)| if x.to_f64().abs() <= clip { g } else { zero })
        .collect()
}

impl candle_core::CustomOp2 for SteMask {
    fn name(&self) -> &'static str {
        "ste-sign-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = dispatch2(
            self.name(),
            (s1, l1),
            (s2, l2),
            |x, g| masked(x, g, self.0),
            |x, g| masked(x, g, self.0),
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
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda::binary(self.name(), "ste_mask", (s1, l1), (s2, l2), Some(self.0))?;
        Ok((out, l1.shape().clone()))
    }
}

/// LAB's binarization of the score difference `d = y1 - y0`: `+1` where `d > 0` (strictly),
/// `-1` elsewhere, with the gradient of the surrogate `tanh(d / 2)`, in one op each way.
pub fn lab_sign(d: &Tensor) -> Result<Tensor> {
    d.contiguous()?.apply_op1(LabSign)
}

struct LabSign;

fn strict_sign<T: candle_core::WithDType>(data: &[T]) -> Vec<T> {
    let zero = T::from_f64(0.0);
    let (plus, minus) = (T::from_f64(1.0), T::from_f64(-1.0));
    data.iter()
        .map(|&x| if x > zero { plus } else { minus })
        .collect()
}

impl CustomOp1 for LabSign {
    fn name(&self) -> &'static str {
        "lab-sign"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = dispatch1(self.name(), (storage, layout), strict_sign, strict_sign)?;
        Ok((out, layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda::unary(self.name(), "lab_sign", storage, layout)?;
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let grad = arg
            .detach()
            .apply_op2_no_bwd(&grad_res.contiguous()?, &LabSignBackward)?;
        Ok(Some(grad))
    }
}

/// `grad * (1 - tanh(d / 2)^2) / 2`.
struct LabSignBackward;

fn surrogate<T: candle_core::WithDType>(d: &[T], grad: &[T]) -> Vec<T> {
    d.iter()
        .zip(grad)
        .map(|(&d, &g)| {
            let t = (d.to_f64() * 0.5).tanh();
            T::from_f64(g.to_f64() * 0.5 * (1.0 - t * t))
        })
        .collect()
}

impl candle_core::CustomOp2 for LabSignBackward {
    fn name(&self) -> &'static str {
        "lab-sign-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = dispatch2(self.name(), (s1, l1), (s2, l2), surrogate, surrogate)?;
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
        let out = crate::cuda::binary(self.name(), "lab_sign_backward", (s1, l1), (s2, l2), None)?;
        Ok((out, l1.shape().clone()))
    }
}

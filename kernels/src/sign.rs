//! Larq's sign: `+1` where `x >= 0`, `-1` elsewhere.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

use crate::contiguous_slice;

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
        let out = match storage.dtype() {
            DType::F32 => CpuStorage::F32(sign_of(contiguous_slice::<f32>(
                self.name(),
                storage,
                layout,
            )?)),
            DType::F64 => CpuStorage::F64(sign_of(contiguous_slice::<f64>(
                self.name(),
                storage,
                layout,
            )?)),
            other => candle_core::bail!("larq-sign: expected f32 or f64, found {other:?}"),
        };
        Ok((out, layout.shape().clone()))
    }
}

/// `+1` where `x >= 0` (including `-0.0`), `-1` elsewhere. The result carries no gradient: the
/// binarizers in `zoo::layers` attach their own straight-through estimators.
pub fn sign(x: &Tensor) -> Result<Tensor> {
    x.detach().contiguous()?.apply_op1_no_bwd(&Sign)
}

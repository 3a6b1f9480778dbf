//! Keras' weight initialisers, drawn reproducibly from a seed.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

use crate::spec::{self, Init, ModelConfig, Param, Spec};
use crate::Error;

/// Keras divides the stddev of its 2-sigma truncated normals by this so that the truncated
/// draw keeps the requested stddev.
const TRUNCATED_STDDEV: f64 = 0.879_625_661_034_239_8;

/// Draws one tensor's values as Keras would.
pub fn draw(param: &Param, rng: &mut impl Rng) -> Vec<f64> {
    let n = param.len();
    let (fan_in, fan_out) = (param.fans.0 as f64, param.fans.1 as f64);
    let truncated = |rng: &mut dyn rand::RngCore, stddev: f64| loop {
        let z: f64 = StandardNormal.sample(rng);
        if z.abs() <= 2.0 {
            break z * stddev / TRUNCATED_STDDEV;
        }
    };
    match param.init {
        Init::Constant(c) => vec![c; n],
        Init::GlorotUniform => {
            let limit = (6.0 / (fan_in + fan_out)).sqrt();
            (0..n).map(|_| rng.random_range(-limit..=limit)).collect()
        }
        Init::GlorotNormal => {
            let stddev = (2.0 / (fan_in + fan_out)).sqrt();
            (0..n).map(|_| truncated(rng, stddev)).collect()
        }
        Init::HeNormal => {
            let stddev = (2.0 / fan_in).sqrt();
            (0..n).map(|_| truncated(rng, stddev)).collect()
        }
    }
}

/// Creates every tensor of `spec` at `config` in `varmap`, drawn with Keras' initialisers from
/// `seed`. Build the model from the same `varmap` afterwards; it then uses these values.
pub fn initialize(
    varmap: &VarMap,
    spec: &Spec,
    config: &ModelConfig,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<(), Error> {
    let analysis = spec::analyze(spec, config)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data = varmap
        .data()
        .lock()
        .expect("the VarMap lock is not poisoned");
    for param in analysis.params() {
        let values = Tensor::from_vec(draw(param, &mut rng), param.shape.as_slice(), device)?
            .to_dtype(dtype)?;
        data.insert(param.name.clone(), Var::from_tensor(&values)?);
    }
    Ok(())
}

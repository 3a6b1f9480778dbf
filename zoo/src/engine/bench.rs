//! Latency and throughput measurement of an [`Engine`] (`zoo bench`), and models with random
//! weights for measuring architectures that have no trained weights yet.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

use crate::spec::{self, ModelConfig};
use crate::Error;

use super::{export, Engine, OpTime, ZooModel};

/// Median, minimum and maximum of a set of timings, in milliseconds.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Latency {
    /// Median.
    pub median: f64,
    /// Fastest run.
    pub min: f64,
    /// Slowest run.
    pub max: f64,
    /// Timed runs.
    pub runs: usize,
}

impl Latency {
    fn of(mut ms: Vec<f64>) -> Latency {
        ms.sort_by(f64::total_cmp);
        Latency {
            median: ms[ms.len() / 2],
            min: ms[0],
            max: ms[ms.len() - 1],
            runs: ms.len(),
        }
    }
}

/// Images per second with a batch.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Throughput {
    /// Images per call.
    pub batch: usize,
    /// Median images per second.
    pub images_per_s: f64,
}

/// What `zoo bench` measures and writes as JSON.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    /// The model's name.
    pub model: String,
    /// Input `HxWxC`.
    pub input: String,
    /// Threads.
    pub threads: usize,
    /// The binary convolution kernel (`avx2`, `portable`, ...).
    pub kernel: String,
    /// Batch-1 latency.
    pub latency_ms: Latency,
    /// Throughput with a larger batch.
    pub throughput: Throughput,
    /// Per-layer medians, when profiled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<Vec<OpTime>>,
}

/// Random images (standard normal), NCHW.
pub fn random_images(engine: &Engine, batch: usize, seed: u64) -> Vec<f32> {
    let i = engine.config().input;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..batch * i.height * i.width * i.channels)
        .map(|_| rng.sample::<f32, _>(rand_distr::StandardNormal))
        .collect()
}

/// Times `runs` batch-1 calls after `warmup` untimed ones, then `batch`-image calls for
/// throughput (a third as many, at least 3); with `profile`, also a per-layer table.
pub fn bench(
    engine: &Engine,
    runs: usize,
    warmup: usize,
    batch: usize,
    profile: bool,
) -> Result<Report, Error> {
    let runs = runs.max(1);
    let image = random_images(engine, 1, 1);
    for _ in 0..warmup {
        engine.run(&image, 1)?;
    }
    let mut ms = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        std::hint::black_box(engine.run(&image, 1)?);
        ms.push(start.elapsed().as_secs_f64() * 1e3);
    }
    let latency = Latency::of(ms);
    let batch = batch.max(1);
    let images = random_images(engine, batch, 2);
    engine.run(&images, batch)?;
    let mut rates = Vec::new();
    for _ in 0..(runs / 3).max(3) {
        let start = Instant::now();
        std::hint::black_box(engine.run(&images, batch)?);
        rates.push(batch as f64 / start.elapsed().as_secs_f64());
    }
    rates.sort_by(f64::total_cmp);
    let profile = match profile {
        true => Some(engine.profile(&image, runs)?),
        false => None,
    };
    Ok(Report {
        model: engine.spec().name.clone(),
        input: engine.config().input.to_string(),
        threads: engine.threads(),
        kernel: engine.kernel().to_string(),
        latency_ms: latency,
        throughput: Throughput {
            batch,
            images_per_s: rates[rates.len() / 2],
        },
        profile,
    })
}

/// The per-layer table of a profile: op, shape, ms, share.
pub fn render_profile(ops: &[OpTime]) -> String {
    let mut s = format!(
        "{:<36} {:<18} {:>14} {:>9} {:>7}\n",
        "op", "kind", "output", "ms", "share"
    );
    for op in ops {
        s += &format!(
            "{:<36} {:<18} {:>14} {:>9.3} {:>6.1}%\n",
            op.name,
            op.kind,
            op.output,
            op.ms,
            op.share * 100.0
        );
    }
    let total: f64 = ops.iter().map(|o| o.ms).sum();
    s += &format!(
        "{:<36} {:<18} {:>14} {:>9.3} {:>6.1}%\n",
        "total", "", "", total, 100.0
    );
    s
}

/// The profile as CSV: `op,kind,output,ms,share`.
pub fn profile_csv(ops: &[OpTime]) -> String {
    let mut s = String::from("op,kind,output,ms,share\n");
    for op in ops {
        s += &format!(
            "{},{},{},{:.6},{:.6}\n",
            op.name, op.kind, op.output, op.ms, op.share
        );
    }
    s
}

/// A model of `name_or_path` at `config` with Keras-initialised random weights and random
/// batch-norm statistics, exported: what `zoo bench` runs when given a name instead of a file.
pub fn random_model(
    name_or_path: &str,
    config: &ModelConfig,
    seed: u64,
) -> Result<ZooModel, Error> {
    let spec = crate::spec(name_or_path)?;
    let text = crate::spec_text(name_or_path)?;
    let analysis = spec::analyze(&spec, config)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut weights = HashMap::new();
    for param in analysis.params() {
        let mut values = crate::init::draw(param, &mut rng);
        if param.name.ends_with(".running_var") {
            values
                .iter_mut()
                .for_each(|v| *v = rng.random_range(0.5..2.0));
        } else if param.name.ends_with(".running_mean") {
            values
                .iter_mut()
                .for_each(|v| *v = rng.random_range(-0.5..0.5));
        }
        let t = Tensor::from_vec(values, param.shape.clone(), &Device::Cpu)?;
        weights.insert(param.name.clone(), t);
    }
    export(&text, &spec, config, &weights)
}

//! Latency and throughput measurement of the engine on the CPU or a GPU (`zoo bench`), and
//! models with random weights for measuring architectures that have no trained weights yet.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

use crate::spec::{self, ModelConfig};
use crate::Error;

use zoo_kernels::packed;

use super::{export, Engine, OpTime, Runner, ZooModel};

/// Order statistics of a set of timings, in milliseconds (of ratios, in [`Against::ratio`]).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Latency {
    /// Median.
    pub median: f64,
    /// Fastest run.
    pub min: f64,
    /// First quartile.
    pub p25: f64,
    /// Third quartile.
    pub p75: f64,
    /// Slowest run.
    pub max: f64,
    /// Timed runs.
    pub runs: usize,
}

impl Latency {
    /// The statistics of `ms` (at least one timing).
    pub fn of(mut ms: Vec<f64>) -> Latency {
        ms.sort_by(f64::total_cmp);
        // The value at quantile `q`, interpolated between the nearest ranks.
        let at = |q: f64| {
            let rank = q * (ms.len() - 1) as f64;
            let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
            ms[lo] + (ms[hi] - ms[lo]) * (rank - lo as f64)
        };
        Latency {
            median: at(0.5),
            min: ms[0],
            p25: at(0.25),
            p75: at(0.75),
            max: ms[ms.len() - 1],
            runs: ms.len(),
        }
    }
}

impl std::fmt::Display for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "median {:.3} ms (min {:.3}, quartiles {:.3} / {:.3}, max {:.3}, {} runs)",
            self.median, self.min, self.p25, self.p75, self.max, self.runs
        )
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

/// What a [`Report`] timed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Measure {
    /// The model, batch 1.
    Engine,
    /// The arithmetic floor of the model's binary layers (see [`floor`]).
    Floor,
}

/// What `zoo bench` measures and writes as JSON.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    /// The model's name.
    pub model: String,
    /// Input `HxWxC`.
    pub input: String,
    /// Threads (of the CPU engine).
    pub threads: usize,
    /// The binary convolution kernel (`avx2`, `portable`, ...; on a GPU, the GPU and path).
    pub kernel: String,
    /// What was timed.
    pub measure: Measure,
    /// Binary multiply-accumulates of one image.
    pub binary_macs: u64,
    /// Batch-1 latency.
    pub latency_ms: Latency,
    /// Throughput with a larger batch, when measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throughput: Option<Throughput>,
    /// Per-layer medians, when profiled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<Vec<OpTime>>,
    /// A second model timed in turn with this one, when asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub against: Option<Against>,
}

/// A second model timed by [`bench`] call for call with the first, and how the two compare.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Against {
    /// The second model's name.
    pub model: String,
    /// Its batch-1 latency.
    pub latency_ms: Latency,
    /// Its time over the first model's, per pair of calls made one right after the other
    /// (unitless): a slow spell of the machine slows both calls of a pair alike, so the ratio
    /// holds where the latencies of separate processes disagree.
    pub ratio: Latency,
}

impl Report {
    fn new(engine: &dyn Runner, measure: Measure, binary_macs: u64, latency: Latency) -> Report {
        Report {
            model: engine.spec().name.clone(),
            input: engine.config().input.to_string(),
            threads: engine.threads(),
            kernel: engine.kernel(),
            measure,
            binary_macs,
            latency_ms: latency,
            throughput: None,
            profile: None,
            against: None,
        }
    }
}

/// Binary multiply-accumulates of one image of `engine`'s model.
fn binary_macs(engine: &dyn Runner) -> Result<u64, Error> {
    Ok(spec::analyze(engine.spec(), engine.config())?
        .totals()
        .binary_macs)
}

/// Random images (standard normal), NCHW.
pub fn random_images(engine: &dyn Runner, batch: usize, seed: u64) -> Vec<f32> {
    let i = engine.config().input;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..batch * i.height * i.width * i.channels)
        .map(|_| rng.sample::<f32, _>(rand_distr::StandardNormal))
        .collect()
}

/// Milliseconds of each of `runs` calls of `call`, after `warmup` untimed ones.
fn time_calls(
    runs: usize,
    warmup: usize,
    mut call: impl FnMut() -> Result<(), Error>,
) -> Result<Vec<f64>, Error> {
    for _ in 0..warmup {
        call()?;
    }
    (0..runs.max(1)).map(|_| time_ms(&mut call)).collect()
}

/// Milliseconds of one call of `call`.
fn time_ms(call: impl FnOnce() -> Result<(), Error>) -> Result<f64, Error> {
    let start = Instant::now();
    call()?;
    Ok(start.elapsed().as_secs_f64() * 1e3)
}

/// Times `runs` batch-1 calls after `warmup` untimed ones, then, unless `batch` is 0,
/// `batch`-image calls for throughput (a third as many, at least 3); with `profile`, also a
/// per-layer table. With `against`, each timed call of `engine` is paired with one of that
/// engine (the order alternating from pair to pair) and the report compares the two.
pub fn bench(
    engine: &dyn Runner,
    runs: usize,
    warmup: usize,
    batch: usize,
    profile: bool,
    against: Option<&dyn Runner>,
) -> Result<Report, Error> {
    let image = random_images(engine, 1, 1);
    let (ms, against) = match against {
        None => (time_calls(runs, warmup, || call(engine, &image, 1))?, None),
        Some(other) => {
            let (ms, other_ms) = time_pairs(engine, &image, other, runs, warmup)?;
            let ratio = other_ms.iter().zip(&ms).map(|(b, a)| b / a).collect();
            let against = Against {
                model: other.spec().name.clone(),
                latency_ms: Latency::of(other_ms),
                ratio: Latency::of(ratio),
            };
            (ms, Some(against))
        }
    };
    let mut report = Report::new(
        engine,
        Measure::Engine,
        binary_macs(engine)?,
        Latency::of(ms),
    );
    report.against = against;
    if batch > 0 {
        let images = random_images(engine, batch, 2);
        let ms = time_calls((runs / 3).max(3), 1, || call(engine, &images, batch))?;
        let median = Latency::of(ms).median;
        report.throughput = Some(Throughput {
            batch,
            images_per_s: batch as f64 / (median / 1e3),
        });
    }
    if profile {
        report.profile = Some(engine.profile(&image, runs)?);
    }
    Ok(report)
}

/// One call of `engine` on `batch` images.
fn call(engine: &dyn Runner, images: &[f32], batch: usize) -> Result<(), Error> {
    std::hint::black_box(engine.run(images, batch)?);
    Ok(())
}

/// Milliseconds of `runs` batch-1 calls of `a` (on `image_a`) and of `b` in pairs (after
/// `warmup` untimed pairs), `a` first in even pairs and `b` first in odd ones.
fn time_pairs(
    a: &dyn Runner,
    image_a: &[f32],
    b: &dyn Runner,
    runs: usize,
    warmup: usize,
) -> Result<(Vec<f64>, Vec<f64>), Error> {
    let image_b = random_images(b, 1, 1);
    for _ in 0..warmup {
        call(a, image_a, 1)?;
        call(b, &image_b, 1)?;
    }
    let time = |engine: &dyn Runner, image: &[f32]| time_ms(|| call(engine, image, 1));
    let (mut ms_a, mut ms_b) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    for i in 0..runs.max(1) {
        if i % 2 == 0 {
            ms_a.push(time(a, image_a)?);
            ms_b.push(time(b, &image_b)?);
        } else {
            ms_b.push(time(b, &image_b)?);
            ms_a.push(time(a, image_a)?);
        }
    }
    Ok((ms_a, ms_b))
}

/// Times the arithmetic floor of `engine`'s binary layers as [`bench`] times the engine:
/// `runs` calls (after `warmup`), each running [`packed::floor::xnor_popcount`] over the
/// model's binary MACs of one image on the engine's threads, with its kernel variant. The
/// loop is fixed work, so the spread of its medians over processes is the machine's own.
pub fn floor(engine: &Engine, runs: usize, warmup: usize) -> Result<Report, Error> {
    let macs = binary_macs(engine)?;
    let tiles = macs.div_ceil(packed::floor::TILE_MACS);
    let ms = time_calls(runs, warmup, || {
        std::hint::black_box(engine.pool.install(|| packed::floor::xnor_popcount(tiles)));
        Ok(())
    })?;
    Ok(Report::new(engine, Measure::Floor, macs, Latency::of(ms)))
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

//! Forward and training-step time of the compiled-in models on small images.
//!
//! `cargo bench -p zoo --bench forward` (add `-- quicknet` to filter). These are our own
//! baselines for the kernel work; comparisons with peers live in scripts under `benches/peers/`.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use criterion::{criterion_group, criterion_main, Criterion};

fn models(c: &mut Criterion) {
    zoo::device::tune_runtime();
    let dev = Device::Cpu;
    let batch = 64;
    let config = zoo::ModelConfig {
        input: "32x32x1".parse().expect("a valid shape"),
        classes: 10,
    };
    let mut group = c.benchmark_group("32x32x1 batch 64");
    group.sample_size(10);
    for name in ["quicknet", "quicknet-lab"] {
        let spec = zoo::spec(name).expect("a registered model");
        let varmap = VarMap::new();
        zoo::init::initialize(&varmap, &spec, &config, 0, DType::F32, &dev).expect("initialised");
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let model = zoo::build(name, vb, &config).expect("built");
        let xs = Tensor::randn(0f32, 1.0, (batch, 1, 32, 32), &dev).expect("random images");
        let targets = Tensor::zeros(batch, DType::U32, &dev).expect("targets");
        group.bench_function(format!("{name} inference"), |b| {
            b.iter(|| model.forward(&xs, false).expect("forward"))
        });
        group.bench_function(format!("{name} forward+backward"), |b| {
            b.iter(|| {
                let logits = model.forward(&xs, true).expect("forward");
                let loss = candle_nn::loss::cross_entropy(&logits, &targets).expect("loss");
                loss.backward().expect("backward")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, models);
criterion_main!(benches);

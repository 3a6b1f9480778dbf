//! Training cost of LAB: the fused op (`zoo::layers::Lab::forward`, one pass each way) against the
//! same binarizer composed of candle ops (`Lab::scores`: the depthwise convolution, biases and
//! `beta`, then `zoo_kernels::lab_sign` of the difference), forward and forward + backward, on the
//! shapes of QuickNet-LAB's stages at 32x32 (64 images, f32, the specs' `channel` pairing).
//!
//! `cargo bench -p zoo --bench lab` (add `-- 512` to filter by channels). The process is tuned as
//! `zoo`'s (`zoo::device::tune_runtime`), so allocations are reused as in training.

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use criterion::{criterion_group, criterion_main, Criterion};
use zoo::layers::Lab;
use zoo::spec::{FeatureShape, LabPairing};

/// The composed binarizer: `lab_sign(beta*y1 - beta*y0)` over candle's depthwise convolution.
fn composed(lab: &Lab, x: &Tensor) -> Result<Tensor> {
    let (s0, s1) = lab.scores(x)?;
    zoo_kernels::lab_sign(&(s1 - s0)?)
}

fn lab(c: &mut Criterion) {
    zoo::device::tune_runtime();
    let dev = Device::Cpu;
    for (channels, size) in [(64, 8), (128, 4), (256, 2), (512, 1)] {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
        let input = FeatureShape {
            channels,
            height: size,
            width: size,
            binary: false,
        };
        let layer = Lab::new(vb, input, LabPairing::Channel).expect("LAB");
        let x = Var::randn(0f32, 1.0, (64, channels, size, size), &dev).expect("x");
        let r = Tensor::randn(0f32, 1.0, (64, channels, size, size), &dev).expect("r");
        let mut group = c.benchmark_group(format!("{channels} channels {size}x{size}"));
        group.sample_size(20);
        type Binarize = fn(&Lab, &Tensor) -> Result<Tensor>;
        let ways: [(&str, Binarize); 2] =
            [("zoo", |lab, x| lab.forward(x)), ("candle ops", composed)];
        for (name, binarize) in ways {
            group.bench_function(format!("{name} forward"), |b| {
                b.iter(|| binarize(&layer, &x).expect("forward"))
            });
            group.bench_function(format!("{name} forward+backward"), |b| {
                b.iter(|| {
                    let y = binarize(&layer, &x).expect("forward");
                    (y * &r)
                        .and_then(|p| p.sum_all())
                        .and_then(|l| l.backward())
                        .expect("backward")
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, lab);
criterion_main!(benches);

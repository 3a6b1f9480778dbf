//! Training cost of the binary convolution: `zoo_kernels::binary_conv2d` (bit-packed forward,
//! per-tap GEMM backward with the straight-through masks) against the same convolution composed
//! of candle ops (`ste_sign` of input and kernel, padding with ones, candle's `conv2d`), forward
//! and forward + backward, on the shapes of QuickNet's stages at 32x32 (64 images, 3x3, SAME,
//! padding with ones).
//!
//! `cargo bench -p zoo --bench binary_conv` (add `-- 512` to filter by channels). The process is
//! tuned as `zoo`'s (`zoo::device::tune_runtime`), so allocations are reused as in training.

use candle_core::{Device, Result, Tensor, Var};
use criterion::{criterion_group, criterion_main, Criterion};
use zoo_kernels::{binary_conv2d, ste_sign, BinaryConv2d};

/// The straight-through clip of inputs and kernel (QuickNet's).
const CLIP: f64 = 1.25;

const CONV: BinaryConv2d = BinaryConv2d {
    stride: [1, 1],
    pads: [1; 4],
    pad_value: 1.0,
    input_clip: Some(CLIP),
    kernel_clip: CLIP,
};

/// The convolution as candle ops: signs with straight-through gradients, ones around, `conv2d`.
fn composed(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let signs = ste_sign(x, CLIP)?;
    let ones = signs.ones_like()?.detach();
    let inside = ones.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
    let padded = (signs.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?
        + (inside.ones_like()? - inside)?)?;
    padded.conv2d(&ste_sign(w, CLIP)?, 0, 1, 1, 1)
}

fn binary_conv(c: &mut Criterion) {
    zoo::device::tune_runtime();
    let dev = Device::Cpu;
    for (channels, size) in [(64, 8), (128, 4), (256, 2), (512, 1)] {
        let x = Var::randn(0f32, 1.0, (64, channels, size, size), &dev).expect("x");
        let w = Var::randn(0f32, 1.0, (channels, channels, 3, 3), &dev).expect("w");
        let r = Tensor::randn(0f32, 1.0, (64, channels, size, size), &dev).expect("r");
        let mut group = c.benchmark_group(format!("{channels} channels {size}x{size}"));
        group.sample_size(20);
        type Conv = fn(&Tensor, &Tensor) -> Result<Tensor>;
        let ways: [(&str, Conv); 2] = [
            ("zoo", |x, w| binary_conv2d(x, w, &CONV)),
            ("candle ops", composed),
        ];
        for (name, conv) in ways {
            group.bench_function(format!("{name} forward"), |b| {
                b.iter(|| conv(&x, &w).expect("forward"))
            });
            group.bench_function(format!("{name} forward+backward"), |b| {
                b.iter(|| {
                    let y = conv(&x, &w).expect("forward");
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

criterion_group!(benches, binary_conv);
criterion_main!(benches);

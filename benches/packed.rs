//! The inference engine's packed kernels on QuickNet's four 3x3 stage shapes at 224x224 (one
//! image; 64 channels at 56x56 down to 512 at 7x7):
//!
//! - `binary_conv` (the kernel in use, see below) against the same convolution in `f32`
//!   (`zoo_kernels::conv2d_gemm`: unfold and one GEMM, the training path's float convolution,
//!   given an input already padded);
//! - packing signs (`PackedMap::from_signs`) against LAB's depthwise-threshold-pack
//!   (`lab_pack`, in the specs' folded form and the official code's paired form): LAB's cost
//!   over sign at the input of each binary convolution;
//! - the binary 3x3 stride-2 max pool on bits.
//!
//! `cargo bench -p zoo-kernels --bench packed` (add `-- 512` to filter by channels). The kernel is
//! the best this CPU runs unless `ZOO_PACKED_KERNEL=portable|avx2|avx512` names another; the
//! threads are rayon's (`RAYON_NUM_THREADS=1` for one).

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use zoo_kernels::packed::{
    binary_conv, kernel_name, lab_pack, max_pool, ConvGeometry, LabKernel, PackedConvWeights,
    PackedMap, PadValue, Window,
};

/// Values uniform in `[-1, 1)` from a fixed seed (xorshift64).
fn uniform(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn packed(c: &mut Criterion) {
    let same = ConvGeometry {
        stride: [1, 1],
        pads: [1; 4],
        pad_value: PadValue::One,
    };
    for (channels, size) in [(64, 56), (128, 28), (256, 14), (512, 7)] {
        let mut group = c.benchmark_group(format!("{channels} channels {size}x{size}"));
        group.sample_size(20);
        let x = uniform(size * size * channels, 1);
        let w = uniform(channels * channels * 9, 2);
        let map = PackedMap::from_signs(&x, size, size, channels);
        let weights = PackedConvWeights::from_signs(&w, channels, channels, [3, 3]);
        let mut out = vec![0i32; size * size * channels];
        group.bench_function(format!("binary conv 3x3 ({})", kernel_name()), |b| {
            b.iter(|| {
                binary_conv(&map, &weights, &same, &mut out, |_, dots, row| {
                    row.copy_from_slice(dots)
                })
            })
        });
        let dev = Device::Cpu;
        let xs = Tensor::from_slice(&x, (1, channels, size, size), &dev)
            .and_then(|t| t.pad_with_zeros(2, 1, 1))
            .and_then(|t| t.pad_with_zeros(3, 1, 1))
            .expect("padded input");
        let kernel = Tensor::from_slice(&w, (channels, channels, 3, 3), &dev).expect("kernel");
        group.bench_function("f32 conv 3x3 (unfold + GEMM)", |b| {
            b.iter(|| zoo_kernels::conv2d_gemm(&xs, &kernel, [1, 1]).expect("conv"))
        });

        group.bench_function("sign pack", |b| {
            b.iter(|| PackedMap::from_signs(&x, size, size, channels))
        });
        let folded = LabKernel::folded(channels, uniform(9 * channels, 3), uniform(channels, 4));
        group.bench_function("LAB pack (folded)", |b| {
            b.iter(|| lab_pack(&x, size, size, &folded))
        });
        // The official pairing: output k compares depthwise outputs k and C + k.
        let paired = LabKernel::paired(
            channels,
            uniform(9 * channels, 5),
            (0..channels).map(|k| (channels + k) / 2).collect(),
            uniform(9 * channels, 6),
            (0..channels).map(|k| k / 2).collect(),
            uniform(channels, 7),
        );
        group.bench_function("LAB pack (paired)", |b| {
            b.iter(|| lab_pack(&x, size, size, &paired))
        });

        let pool = Window {
            kernel: [3, 3],
            stride: [2, 2],
            pads: [0, 1, 0, 1],
        };
        group.bench_function("max pool 3x3/2", |b| {
            b.iter(|| max_pool(black_box(&map), pool))
        });
        group.finish();
    }
}

criterion_group!(benches, packed);
criterion_main!(benches);

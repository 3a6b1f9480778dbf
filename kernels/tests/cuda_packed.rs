//! The GPU's packed kernels (`zoo_kernels::packed::cuda`; the convolution on tensor cores and
//! on CUDA cores, alone and with its output transform) against the CPU's packed kernels on
//! random shapes: batches of odd sizes, channel counts around 32 and 64, strides 1 and 2, both
//! pad values, asymmetric padding, both LAB forms. Every result is bits, integers or floats
//! computed in the same order, so every comparison is exact.
//!
//! Without a GPU every test prints why it did not run and passes. Build and run them with
//! `kernels/cuda/build.sh test --release --features cuda -p zoo-kernels --test cuda_packed`.
#![cfg(feature = "cuda")]

use zoo_kernels::packed::cuda::{ConvPath, EpilogueIo, Gpu, GpuBinaryConv, GpuEpilogue, GpuLab};
use zoo_kernels::packed::gpu::EpilogueOp;
use zoo_kernels::packed::{
    binary_conv, lab_pack, max_pool, ConvGeometry, LabKernel, PackedConvWeights, PackedMap,
    PadValue, Window,
};

/// The first GPU, or `None` after printing why there is none.
fn gpu(test: &str) -> Option<Gpu> {
    match Gpu::new(0) {
        Ok(gpu) => Some(gpu),
        Err(e) => {
            println!("{test}: skipped, no usable GPU: {e}");
            None
        }
    }
}

/// SplitMix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[-1, 1)`.
    fn float(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn floats(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.float()).collect()
    }

    fn signs(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| if self.next() & 1 == 1 { -1.0 } else { 1.0 })
            .collect()
    }
}

/// `images` random ±1 maps of `h x w x c`, and the same maps packed by the CPU.
fn maps(rng: &mut Rng, images: usize, [h, w, c]: [usize; 3]) -> (Vec<f32>, Vec<PackedMap>) {
    let x = rng.signs(images * h * w * c);
    let packed = x
        .chunks((h * w * c).max(1))
        .take(images)
        .map(|x| PackedMap::from_signs(x, h, w, c))
        .collect();
    (x, packed)
}

#[test]
fn sign_packing_matches_the_cpu() {
    let Some(gpu) = gpu("sign_packing_matches_the_cpu") else {
        return;
    };
    let mut rng = Rng(1);
    for (images, h, w, c) in [
        (1, 1, 1, 1),
        (2, 3, 5, 31),
        (3, 4, 4, 33),
        (1, 7, 3, 64),
        (2, 2, 9, 65),
        (1, 5, 5, 200),
    ] {
        let mut x = rng.floats(images * h * w * c);
        // Larq's sign at its edges: ±0 and NaN are +1.
        for (i, v) in x.iter_mut().enumerate().step_by(5) {
            *v = [0.0, -0.0, f32::NAN, -f32::NAN, -1e-30][i % 5];
        }
        let expected: Vec<PackedMap> = x
            .chunks(h * w * c)
            .map(|x| PackedMap::from_signs(x, h, w, c))
            .collect();
        let packed = gpu
            .pack_signs(&gpu.upload_floats(&x, images, [h, w, c]).unwrap())
            .unwrap();
        assert_eq!(
            gpu.download_maps(&packed).unwrap(),
            expected,
            "{images}x{h}x{w}x{c}"
        );
    }
}

/// The convolution paths this GPU has: CUDA cores always, tensor cores from 8.0.
fn conv_paths(gpu: &Gpu) -> Vec<ConvPath> {
    let mut paths = vec![ConvPath::Popcount];
    if gpu.conv_path() == ConvPath::TensorCores {
        paths.push(ConvPath::TensorCores);
    } else {
        println!("no binary tensor cores on this GPU: the CUDA-core path only");
    }
    paths
}

#[test]
fn binary_convolution_matches_the_cpu_on_both_paths() {
    let Some(gpu) = gpu("binary_convolution_matches_the_cpu_on_both_paths") else {
        return;
    };
    let mut rng = Rng(2);
    let cases = [
        // (images, h, w, in, out, kernel, stride, pads)
        (1, 5, 7, 1, 1, [3, 3], [1, 1], [1, 1, 1, 1]),
        (2, 6, 5, 31, 7, [3, 3], [2, 2], [1, 1, 1, 1]),
        (3, 7, 7, 33, 33, [3, 3], [1, 1], [1, 1, 1, 1]),
        (3, 4, 6, 64, 40, [3, 3], [2, 1], [0, 1, 1, 0]),
        (1, 5, 5, 65, 9, [1, 1], [1, 1], [0, 0, 0, 0]),
        (2, 9, 8, 130, 3, [3, 3], [2, 2], [0, 1, 0, 1]),
        (1, 3, 3, 200, 65, [2, 3], [1, 1], [1, 0, 2, 0]),
        (1, 2, 2, 96, 5, [3, 3], [1, 1], [2, 2, 2, 2]),
        // QuickNet's shapes at 224x224: each stage's binary convolution.
        (2, 56, 56, 64, 64, [3, 3], [1, 1], [1, 1, 1, 1]),
        (1, 28, 28, 128, 128, [3, 3], [1, 1], [1, 1, 1, 1]),
        (3, 14, 14, 256, 256, [3, 3], [1, 1], [1, 1, 1, 1]),
        (5, 7, 7, 512, 512, [3, 3], [1, 1], [1, 1, 1, 1]),
    ];
    for (images, h, w, cin, cout, kernel, stride, pads) in cases {
        let weights = PackedConvWeights::from_signs(
            &rng.signs(cout * cin * kernel[0] * kernel[1]),
            cout,
            cin,
            kernel,
        );
        let (_, cpu_maps) = maps(&mut rng, images, [h, w, cin]);
        let input = gpu.upload_maps(&cpu_maps).unwrap();
        for pad_value in [PadValue::Zero, PadValue::One] {
            let geometry = ConvGeometry {
                stride,
                pads,
                pad_value,
            };
            let (oh, ow) = geometry.output_size(h, w, kernel);
            let per_image = oh * ow * cout;
            let mut expected = vec![0i32; images * per_image];
            for (map, out) in cpu_maps.iter().zip(expected.chunks_mut(per_image.max(1))) {
                binary_conv(map, &weights, &geometry, out, |_, dots, row| {
                    row.copy_from_slice(dots)
                });
            }
            let conv = GpuBinaryConv::new(&gpu, &weights, geometry).unwrap();
            assert_eq!(conv.output_size(h, w), (oh, ow));
            for path in conv_paths(&gpu) {
                let dots = conv.dots_with(&gpu, &input, path).unwrap();
                let got = gpu.download(&dots, images * per_image).unwrap();
                assert_eq!(
                    got, expected,
                    "{path:?}: {images}x{h}x{w}x{cin} -> {cout}, {kernel:?}, {stride:?}, \
                     {pads:?}, {pad_value:?}"
                );
            }
        }
    }
}

/// The convolution with its output transform and a residual, fused on the tensor cores (the
/// dots and `dots_epilogue` on CUDA cores): the CPU's dots through the CPU engine's arithmetic,
/// floats and packed signs, bit for bit.
#[test]
fn convolution_with_its_output_transform_matches_the_cpu() {
    let Some(gpu) = gpu("convolution_with_its_output_transform_matches_the_cpu") else {
        return;
    };
    let mut rng = Rng(7);
    for (images, h, w, cin, cout, stride) in [
        (1, 5, 7, 1, 1, 1),
        (2, 6, 5, 31, 7, 2),
        (3, 7, 7, 33, 33, 1),
        (1, 9, 8, 130, 65, 2),
        (2, 8, 8, 64, 96, 1),
    ] {
        let weights = PackedConvWeights::from_signs(&rng.signs(cout * cin * 9), cout, cin, [3, 3]);
        let (_, cpu_maps) = maps(&mut rng, images, [h, w, cin]);
        let input = gpu.upload_maps(&cpu_maps).unwrap();
        let geometry = ConvGeometry {
            stride: [stride; 2],
            pads: [1, 1, 1, 1],
            pad_value: PadValue::Zero,
        };
        let (oh, ow) = geometry.output_size(h, w, [3, 3]);
        let per_image = oh * ow * cout;
        let mut dots = vec![0i32; images * per_image];
        for (map, out) in cpu_maps.iter().zip(dots.chunks_mut(per_image)) {
            binary_conv(map, &weights, &geometry, out, |_, d, row| {
                row.copy_from_slice(d)
            });
        }
        let (mul, add, alpha) = (rng.floats(cout), rng.floats(cout), rng.floats(cout));
        let ops = [
            EpilogueOp::Affine {
                mul: &mul,
                add: &add,
            },
            EpilogueOp::PRelu(&alpha),
        ];
        let residual = rng.floats(images * per_image);
        let expected = apply(&ops, cout, &dots, Some(&residual));
        let signs: Vec<PackedMap> = expected
            .chunks(per_image)
            .map(|x| PackedMap::from_signs(x, oh, ow, cout))
            .collect();
        let conv = GpuBinaryConv::new(&gpu, &weights, geometry).unwrap();
        let epilogue = GpuEpilogue::new(&gpu, cout, &ops).unwrap();
        let gpu_residual = gpu
            .upload_floats(&residual, images, [oh, ow, cout])
            .unwrap();
        let mut scratch = gpu.zeros::<i32>(images * per_image).unwrap();
        for path in conv_paths(&gpu) {
            let mut values = gpu.floats(images, [oh, ow, cout]).unwrap();
            let mut bits = gpu.map(images, [oh, ow, cout]).unwrap();
            let io = EpilogueIo {
                residual: Some(&gpu_residual),
                values: Some(&mut values),
                signs: Some(&mut bits),
            };
            conv.run_into(&gpu, &input, path, &epilogue, io, &mut scratch)
                .unwrap();
            let case = format!("{path:?}: {images}x{h}x{w}x{cin} -> {cout}, stride {stride}");
            assert_eq!(gpu.download_floats(&values).unwrap(), expected, "{case}");
            assert_eq!(gpu.download_maps(&bits).unwrap(), signs, "{case}");
        }
    }
}

#[test]
fn lab_packing_matches_the_cpu_in_both_forms() {
    let Some(gpu) = gpu("lab_packing_matches_the_cpu_in_both_forms") else {
        return;
    };
    let mut rng = Rng(3);
    for (images, h, w, c) in [
        (1, 1, 1, 1),
        (2, 5, 3, 31),
        (3, 4, 7, 33),
        (1, 6, 6, 64),
        (2, 3, 8, 65),
        (1, 9, 9, 130),
    ] {
        let x = rng.floats(images * h * w * c);
        let folded = LabKernel::folded(c, rng.floats(9 * c), rng.floats(c));
        let shift = |k: usize| (0..c).map(|i| (i + k) % c).collect::<Vec<_>>();
        let paired = LabKernel::paired(
            c,
            rng.floats(9 * c),
            shift(c / 2),
            rng.floats(9 * c),
            shift(1),
            rng.floats(c),
        );
        let input = gpu.upload_floats(&x, images, [h, w, c]).unwrap();
        for (form, lab) in [("folded", folded), ("paired", paired)] {
            let expected: Vec<PackedMap> = x
                .chunks(h * w * c)
                .map(|x| lab_pack(x, h, w, &lab))
                .collect();
            let packed = GpuLab::new(&gpu, &lab).unwrap().pack(&gpu, &input).unwrap();
            assert_eq!(
                gpu.download_maps(&packed).unwrap(),
                expected,
                "{form} {images}x{h}x{w}x{c}"
            );
        }
    }
}

/// The CPU engine's arithmetic for the ops: a multiply, then an add, each rounded.
fn apply(ops: &[EpilogueOp], channels: usize, dots: &[i32], residual: Option<&[f32]>) -> Vec<f32> {
    let mut values: Vec<f32> = dots.iter().map(|&d| d as f32).collect();
    for (i, v) in values.iter_mut().enumerate() {
        let c = i % channels;
        for op in ops {
            *v = match *op {
                EpilogueOp::Affine { mul, add } => *v * mul[c] + add[c],
                EpilogueOp::Scale(mul) => *v * mul[c],
                EpilogueOp::Add(add) => *v + add[c],
                EpilogueOp::Relu => v.max(0.0),
                EpilogueOp::PRelu(alpha) => {
                    if *v <= 0.0 {
                        *v * alpha[c]
                    } else {
                        *v
                    }
                }
            };
        }
        if let Some(r) = residual {
            *v += r[i];
        }
    }
    values
}

#[test]
fn epilogue_matches_the_cpu_arithmetic() {
    let Some(gpu) = gpu("epilogue_matches_the_cpu_arithmetic") else {
        return;
    };
    let mut rng = Rng(6);
    for (images, h, w, c) in [(1, 1, 1, 1), (2, 3, 5, 33), (1, 4, 4, 64), (3, 2, 3, 130)] {
        let n = images * h * w * c;
        let dots: Vec<i32> = (0..n).map(|_| (rng.next() % 601) as i32 - 300).collect();
        let (mul, add, alpha) = (rng.floats(c), rng.floats(c), rng.floats(c));
        let residual = rng.floats(n);
        let programs: [Vec<EpilogueOp>; 4] = [
            vec![],
            vec![
                EpilogueOp::Affine {
                    mul: &mul,
                    add: &add,
                },
                EpilogueOp::Relu,
            ],
            vec![
                EpilogueOp::Scale(&mul),
                EpilogueOp::PRelu(&alpha),
                EpilogueOp::Add(&add),
            ],
            vec![
                EpilogueOp::Relu,
                EpilogueOp::Affine {
                    mul: &add,
                    add: &mul,
                },
            ],
        ];
        let gpu_dots = gpu.upload(&dots).unwrap();
        let gpu_residual = gpu.upload_floats(&residual, images, [h, w, c]).unwrap();
        for ops in &programs {
            let epilogue = GpuEpilogue::new(&gpu, c, ops).unwrap();
            for with_residual in [false, true] {
                let r = with_residual.then_some(residual.as_slice());
                let expected = apply(ops, c, &dots, r);
                let out = epilogue
                    .apply(
                        &gpu,
                        &gpu_dots,
                        images,
                        [h, w],
                        with_residual.then_some(&gpu_residual),
                        (true, true),
                    )
                    .unwrap();
                let values = gpu.download_floats(&out.values.unwrap()).unwrap();
                assert_eq!(values, expected, "{ops:?} {images}x{h}x{w}x{c}");
                let signs: Vec<PackedMap> = expected
                    .chunks(h * w * c)
                    .map(|x| PackedMap::from_signs(x, h, w, c))
                    .collect();
                assert_eq!(gpu.download_maps(&out.signs.unwrap()).unwrap(), signs);
            }
        }
    }
}

#[test]
fn max_pooling_on_bits_matches_the_cpu() {
    let Some(gpu) = gpu("max_pooling_on_bits_matches_the_cpu") else {
        return;
    };
    let mut rng = Rng(4);
    for (images, h, w, c, size, stride, pads) in [
        (1, 4, 4, 1, [2, 2], [2, 2], [0, 0, 0, 0]),
        (2, 7, 5, 33, [3, 3], [2, 2], [1, 1, 1, 1]),
        (3, 6, 6, 64, [2, 2], [2, 2], [0, 0, 0, 0]),
        (1, 5, 8, 130, [3, 2], [1, 2], [1, 0, 0, 1]),
        // Windows wholly in the padding give -1.
        (1, 2, 2, 65, [2, 2], [1, 1], [3, 0, 3, 0]),
    ] {
        let (_, cpu_maps) = maps(&mut rng, images, [h, w, c]);
        let window = Window {
            kernel: size,
            stride,
            pads,
        };
        let expected: Vec<PackedMap> = cpu_maps.iter().map(|m| max_pool(m, window)).collect();
        let input = gpu.upload_maps(&cpu_maps).unwrap();
        let pooled = gpu.max_pool(&input, window).unwrap();
        assert_eq!(
            gpu.download_maps(&pooled).unwrap(),
            expected,
            "{images}x{h}x{w}x{c}, {size:?}, {stride:?}, {pads:?}"
        );
    }
}

/// The convolution's rate on both paths on QuickNet-224's binary layer shapes at batch 1 and
/// 256 (each call allocating its output), in binary multiply-adds per second (the card's peak is its dense binary tensor-core rate,
/// 4,992 T on an A100): `--ignored`, run by `benches/gpu/device_check.sh`.
#[test]
#[ignore = "a timing: run on a GPU with --ignored"]
fn binary_convolution_rate() {
    let Some(gpu) = gpu("binary_convolution_rate") else {
        return;
    };
    let mut rng = Rng(5);
    for (h, c) in [(56, 64), (28, 128), (14, 256), (7, 512)] {
        let weights = PackedConvWeights::from_signs(&rng.signs(c * c * 9), c, c, [3, 3]);
        let geometry = ConvGeometry {
            stride: [1, 1],
            pads: [1, 1, 1, 1],
            pad_value: PadValue::Zero,
        };
        let conv = GpuBinaryConv::new(&gpu, &weights, geometry).unwrap();
        let (mul, add) = (rng.floats(c), rng.floats(c));
        let affine = EpilogueOp::Affine {
            mul: &mul,
            add: &add,
        };
        let epilogue = GpuEpilogue::new(&gpu, c, &[affine]).unwrap();
        for (images, path) in [1, 256]
            .into_iter()
            .flat_map(|images| conv_paths(&gpu).into_iter().map(move |p| (images, p)))
        {
            let x = gpu.upload_floats(&rng.signs(images * h * h * c), images, [h, h, c]);
            let input = gpu.pack_signs(&x.unwrap()).unwrap();
            let mut dots = conv.dots_with(&gpu, &input, path).unwrap();
            let mut signs = gpu.map(images, [h, h, c]).unwrap();
            let time = |run: &mut dyn FnMut()| {
                run();
                gpu.stream().synchronize().unwrap();
                let reps = if images == 1 { 200 } else { 20 };
                let start = std::time::Instant::now();
                for _ in 0..reps {
                    run();
                }
                gpu.stream().synchronize().unwrap();
                start.elapsed().as_secs_f64() / reps as f64
            };
            let macs = (images * h * h * c * c * 9) as f64;
            let report = |what: &str, seconds: f64| {
                println!(
                    "binary conv {path:?} {what} {h}x{h}x{c} -> {c}, 3x3, batch {images}: \
                     {:.3} ms, {:.1} T binary MACs/s",
                    seconds * 1e3,
                    macs / seconds / 1e12
                )
            };
            report(
                "dots",
                time(&mut || conv.dots_into(&gpu, &input, path, &mut dots).unwrap()),
            );
            report(
                "+ batch norm -> signs",
                time(&mut || {
                    let io = EpilogueIo {
                        signs: Some(&mut signs),
                        ..Default::default()
                    };
                    conv.run_into(&gpu, &input, path, &epilogue, io, &mut dots)
                        .unwrap()
                }),
            );
        }
    }
}

/// LAB's packing against a device-to-device copy of its input, at QuickNet-224's first binary
/// layer (56x56x64) and at 14x14x256, batch 256: GB/s of the floats read (the bits written are
/// a 32nd of them) and the share of the copy's rate (which reads and writes the bytes):
/// `--ignored`, run by `benches/gpu/device_check.sh`.
#[test]
#[ignore = "a timing: run on a GPU with --ignored"]
fn lab_bandwidth() {
    let Some(gpu) = gpu("lab_bandwidth") else {
        return;
    };
    let mut rng = Rng(8);
    let images = 256;
    for (h, c) in [(56, 64), (14, 256)] {
        let x = gpu
            .upload_floats(&rng.floats(images * h * h * c), images, [h, h, c])
            .unwrap();
        let mut copy = gpu.floats(images, [h, h, c]).unwrap();
        let lab = LabKernel::folded(c, rng.floats(9 * c), rng.floats(c));
        let lab = GpuLab::new(&gpu, &lab).unwrap();
        let mut bits = gpu.map(images, [h, h, c]).unwrap();
        let time = |run: &mut dyn FnMut()| {
            run();
            gpu.stream().synchronize().unwrap();
            let start = std::time::Instant::now();
            for _ in 0..20 {
                run();
            }
            gpu.stream().synchronize().unwrap();
            start.elapsed().as_secs_f64() / 20.0
        };
        let bytes = (x.len() * 4) as f64;
        let copy_s = time(&mut || gpu.copy_into(&x, &mut copy).unwrap());
        let lab_s = time(&mut || lab.pack_into(&gpu, &x, &mut bits).unwrap());
        println!(
            "LAB {h}x{h}x{c}, batch {images}: {:.3} ms, {:.0} GB/s read; copy {:.3} ms, {:.0} GB/s \
             read + written; LAB at {:.0}% of the copy's time",
            lab_s * 1e3,
            bytes / lab_s / 1e9,
            copy_s * 1e3,
            2.0 * bytes / copy_s / 1e9,
            100.0 * copy_s / lab_s
        );
    }
}

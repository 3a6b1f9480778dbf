//! The GPU paths of the custom ops (our CUDA kernels, or candle's ops where the op composes
//! them off the CPU) against their CPU paths (feature `cuda`), on random shapes:
//! odd sizes, channel counts that are not multiples of 32, strides 1 and 2, both pad values,
//! both LAB pairings, f32 and f64. Forward passes must give the CPU's values (binary decisions
//! identical: the inputs are drawn away from the thresholds), gradients agree within 1e-4
//! relative to the largest.
//!
//! The Adam update runs three steps in place on each device from the same state.
//!
//! Without a GPU every test prints why it did not run and passes. Build and run them with
//! `kernels/cuda/build.sh test --release --features cuda -p zoo-kernels --test cuda`.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Result, Tensor, Var};
use zoo_kernels::{
    adam_step, avg_pool2d, batch_norm_train, binary_conv2d, conv2d_gemm, depthwise_conv2d, lab,
    lab_sign, max_pool2d, sign, ste_sign, AdamStep, BinaryConv2d, Pairing, Pool2d,
};

/// The first GPU, or `None` after printing why there is none.
fn gpu(test: &str) -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(dev) => Some(dev),
        Err(e) => {
            println!("{test}: skipped, no CUDA device: {e}");
            None
        }
    }
}

/// Uniform values in `[-1, 1)` of `shape`, at least `gap` away from zero in magnitude (so that
/// a sign never depends on rounding), from a fixed seed.
fn values(seed: u64, shape: &[usize], gap: f64) -> Vec<f64> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let n: usize = shape.iter().product();
    (0..n)
        .map(|_| {
            // SplitMix64.
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            let u = ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
            if u.abs() < gap {
                u.signum() * gap + u
            } else {
                u
            }
        })
        .collect()
}

fn tensor(seed: u64, shape: &[usize], gap: f64, dtype: DType, dev: &Device) -> Result<Tensor> {
    Tensor::from_vec(values(seed, shape, gap), shape, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(dev)
}

fn host(t: &Tensor) -> Vec<f64> {
    t.to_device(&Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F64))
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .expect("a tensor copies to the host")
}

/// Asserts `gpu` equals `cpu` within `rtol` of the largest magnitude of `cpu`.
fn assert_close(gpu: &Tensor, cpu: &Tensor, rtol: f64, what: &str) {
    let (a, b) = (host(gpu), host(cpu));
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f64, f64::max);
    assert!(
        worst <= rtol * scale,
        "{what}: differs by {worst} (largest {scale})"
    );
}

#[test]
fn binarizers_match_the_cpu() -> Result<()> {
    let Some(dev) = gpu("binarizers_match_the_cpu") else {
        return Ok(());
    };
    for dtype in [DType::F32, DType::F64] {
        for (seed, shape) in [
            (1, vec![3, 5, 7, 9]),
            (2, vec![1, 33, 1, 1]),
            (3, vec![2, 70]),
        ] {
            let what = format!("{dtype:?} {shape:?}");
            let x_cpu = (tensor(seed, &shape, 1e-3, dtype, &Device::Cpu)? * 2.0)?;
            let x_gpu = x_cpu.to_device(&dev)?;
            let g_cpu = tensor(seed + 10, &shape, 0.0, dtype, &Device::Cpu)?;
            let g_gpu = g_cpu.to_device(&dev)?;
            assert_close(&sign(&x_gpu)?, &sign(&x_cpu)?, 0.0, &format!("sign {what}"));
            for (name, f) in [
                (
                    "ste_sign",
                    (|x: &Tensor| ste_sign(x, 1.25)) as fn(&Tensor) -> Result<Tensor>,
                ),
                ("lab_sign", |x: &Tensor| lab_sign(x)),
            ] {
                let (vc, vg) = (Var::from_tensor(&x_cpu)?, Var::from_tensor(&x_gpu)?);
                let (yc, yg) = (f(&vc)?, f(&vg)?);
                assert_close(&yg, &yc, 0.0, &format!("{name} {what}"));
                let gc = (yc * &g_cpu)?.sum_all()?.backward()?;
                let gg = (yg * &g_gpu)?.sum_all()?.backward()?;
                assert_close(
                    gg.get(vg.as_tensor()).expect("a gradient"),
                    gc.get(vc.as_tensor()).expect("a gradient"),
                    1e-5,
                    &format!("{name} gradient {what}"),
                );
            }
        }
    }
    Ok(())
}

#[test]
fn lab_matches_the_cpu() -> Result<()> {
    let Some(dev) = gpu("lab_matches_the_cpu") else {
        return Ok(());
    };
    let shapes = [
        (2, 3, 7, 5),
        (1, 33, 1, 1),
        (3, 70, 9, 8),
        (2, 5, 1, 6),
        (4, 64, 14, 14),
    ];
    for dtype in [DType::F32, DType::F64] {
        for (i, &(n, c, h, w)) in shapes.iter().enumerate() {
            for pairing in [Pairing::Channel, Pairing::Official] {
                let what = format!("{dtype:?} {n}x{c}x{h}x{w} {pairing:?}");
                let seed = 100 * i as u64;
                let on = |dev: &Device| -> Result<[Var; 4]> {
                    Ok([
                        Var::from_tensor(&tensor(seed, &[n, c, h, w], 0.0, dtype, dev)?)?,
                        Var::from_tensor(&tensor(seed + 1, &[2 * c, 1, 3, 3], 0.0, dtype, dev)?)?,
                        Var::from_tensor(&(tensor(seed + 2, &[2 * c], 0.0, dtype, dev)? * 0.1)?)?,
                        Var::from_tensor(&tensor(seed + 3, &[1], 0.5, dtype, dev)?.abs()?)?,
                    ])
                };
                let (cpu, gpu) = (on(&Device::Cpu)?, on(&dev)?);
                let yc = lab(&cpu[0], &cpu[1], &cpu[2], &cpu[3], pairing)?;
                let yg = lab(&gpu[0], &gpu[1], &gpu[2], &gpu[3], pairing)?;
                // Decisions may differ only where the score difference is within rounding of
                // zero; with random continuous inputs that is (almost surely) nowhere.
                assert_close(&yg, &yc, 0.0, &format!("lab {what}"));
                let r = tensor(seed + 4, &[n, c, h, w], 0.0, dtype, &Device::Cpu)?;
                let gc = (yc * &r)?.sum_all()?.backward()?;
                let gg = (yg * r.to_device(&dev)?)?.sum_all()?.backward()?;
                let rtol = if dtype == DType::F32 { 1e-4 } else { 1e-9 };
                for (k, name) in ["input", "kernel", "bias", "beta"].iter().enumerate() {
                    assert_close(
                        gg.get(gpu[k].as_tensor()).expect("a gradient"),
                        gc.get(cpu[k].as_tensor()).expect("a gradient"),
                        rtol,
                        &format!("lab {name} gradient {what}"),
                    );
                }
            }
        }
    }
    Ok(())
}

#[test]
fn binary_convolution_matches_the_cpu() -> Result<()> {
    let Some(dev) = gpu("binary_convolution_matches_the_cpu") else {
        return Ok(());
    };
    let cases = [
        ((2, 3, 7, 5), 4, 3),
        ((1, 33, 9, 8), 5, 3),
        ((2, 70, 6, 6), 65, 3),
        ((3, 64, 4, 4), 32, 1),
        ((1, 5, 2, 3), 2, 5),
    ];
    for dtype in [DType::F32, DType::F64] {
        for (i, &((n, c, h, w), o, k)) in cases.iter().enumerate() {
            for stride in [1, 2] {
                for pad_value in [0.0, 1.0] {
                    for input_clip in [Some(1.0), None] {
                        let pad = k / 2;
                        let conv = BinaryConv2d {
                            stride: [stride, stride],
                            pads: [pad, k - 1 - pad, pad, k - 1 - pad],
                            pad_value,
                            input_clip,
                            kernel_clip: 0.8,
                        };
                        let what = format!("{dtype:?} {n}x{c}x{h}x{w} {o}x{k}x{k} {conv:?}");
                        let seed = 1000 * i as u64;
                        let x = (tensor(seed, &[n, c, h, w], 1e-3, dtype, &Device::Cpu)? * 1.5)?;
                        let wt = tensor(seed + 1, &[o, c, k, k], 1e-3, dtype, &Device::Cpu)?;
                        let (xc, wc) = (Var::from_tensor(&x)?, Var::from_tensor(&wt)?);
                        let (xg, wg) = (
                            Var::from_tensor(&x.to_device(&dev)?)?,
                            Var::from_tensor(&wt.to_device(&dev)?)?,
                        );
                        let yc = binary_conv2d(&xc, &wc, &conv)?;
                        let yg = binary_conv2d(&xg, &wg, &conv)?;
                        assert_close(&yg, &yc, 0.0, &format!("forward {what}"));
                        let r = tensor(seed + 2, yc.dims(), 0.0, dtype, &Device::Cpu)?;
                        let gc = (yc * &r)?.sum_all()?.backward()?;
                        let gg = (yg * r.to_device(&dev)?)?.sum_all()?.backward()?;
                        for (name, vc, vg) in [("input", &xc, &xg), ("kernel", &wc, &wg)] {
                            assert_close(
                                gg.get(vg.as_tensor()).expect("a gradient"),
                                gc.get(vc.as_tensor()).expect("a gradient"),
                                1e-4,
                                &format!("{name} gradient {what}"),
                            );
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// Checks `f` on the GPU against the CPU: the output within `rtol_out`, and the gradients of
/// `sum(r * f(inputs))` to every input within `rtol_grad`.
fn check_op(
    what: &str,
    dev: &Device,
    inputs: &[Tensor],
    f: impl Fn(&[Var]) -> Result<Tensor>,
    rtol_out: f64,
    rtol_grad: f64,
) -> Result<()> {
    let on = |d: &Device| -> Result<Vec<Var>> {
        inputs
            .iter()
            .map(|t| Var::from_tensor(&t.to_device(d)?))
            .collect()
    };
    let (cpu, gpu) = (on(&Device::Cpu)?, on(dev)?);
    let (yc, yg) = (f(&cpu)?, f(&gpu)?);
    assert_close(&yg, &yc, rtol_out, &format!("{what}: output"));
    let r = tensor(7, yc.dims(), 0.0, yc.dtype(), &Device::Cpu)?;
    let gc = (yc * &r)?.sum_all()?.backward()?;
    let gg = (yg * r.to_device(dev)?)?.sum_all()?.backward()?;
    for (i, (vc, vg)) in cpu.iter().zip(&gpu).enumerate() {
        assert_close(
            gg.get(vg.as_tensor()).expect("a gradient"),
            gc.get(vc.as_tensor()).expect("a gradient"),
            rtol_grad,
            &format!("{what}: gradient {i}"),
        );
    }
    Ok(())
}

#[test]
fn pooling_matches_the_cpu_ties_included() -> Result<()> {
    let Some(dev) = gpu("pooling_matches_the_cpu_ties_included") else {
        return Ok(());
    };
    for dtype in [DType::F32, DType::F64] {
        for (i, &(shape, size, stride, padding)) in [
            ((2, 3, 7, 5), [3, 3], [2, 2], [1, 1, 1, 1]),
            ((1, 33, 8, 8), [3, 3], [2, 2], [0, 1, 0, 1]),
            ((2, 4, 6, 9), [2, 2], [2, 2], [0, 0, 0, 0]),
            ((1, 2, 5, 5), [3, 3], [1, 1], [1, 1, 1, 1]),
            ((3, 5, 4, 7), [3, 2], [1, 2], [2, 0, 1, 1]),
        ]
        .iter()
        .enumerate()
        {
            let (n, c, h, w) = shape;
            // Values on a coarse grid: many ties, whose gradient goes to the first maximum.
            let x = (tensor(i as u64, &[n, c, h, w], 0.0, dtype, &Device::Cpu)? * 4.0)?.round()?;
            let pool = Pool2d {
                size,
                stride,
                padding,
            };
            let what = format!("{dtype:?} {shape:?} {pool:?}");
            check_op(
                &format!("max {what}"),
                &dev,
                std::slice::from_ref(&x),
                |v| max_pool2d(&v[0], pool),
                0.0,
                0.0,
            )?;
            check_op(
                &format!("avg {what}"),
                &dev,
                &[x],
                |v| avg_pool2d(&v[0], pool),
                1e-12,
                1e-6,
            )?;
        }
    }
    Ok(())
}

#[test]
fn convolutions_and_batch_norm_match_the_cpu() -> Result<()> {
    let Some(dev) = gpu("convolutions_and_batch_norm_match_the_cpu") else {
        return Ok(());
    };
    let cpu = Device::Cpu;
    for dtype in [DType::F32, DType::F64] {
        let rtol = if dtype == DType::F32 { 1e-4 } else { 1e-9 };
        for (i, &((n, c, h, w), k, stride)) in [
            ((2, 3, 7, 5), 3, 1),
            ((2, 33, 9, 8), 3, 2),
            ((1, 64, 6, 6), 1, 1),
            ((3, 5, 5, 7), 5, 2),
        ]
        .iter()
        .enumerate()
        {
            let what = format!("{dtype:?} {n}x{c}x{h}x{w} k{k} s{stride}");
            let seed = 50 * i as u64;
            let x = tensor(seed, &[n, c, h, w], 0.0, dtype, &cpu)?;
            let dw = tensor(seed + 1, &[c, 1, k, k], 0.0, dtype, &cpu)?;
            let full = tensor(seed + 2, &[2 * c + 1, c, k, k], 0.0, dtype, &cpu)?;
            let s = [stride, stride];
            check_op(
                &format!("depthwise {what}"),
                &dev,
                &[x.clone(), dw],
                |v| depthwise_conv2d(&v[0], &v[1], s),
                rtol,
                rtol,
            )?;
            check_op(
                &format!("conv2d_gemm {what}"),
                &dev,
                &[x.clone(), full],
                |v| conv2d_gemm(&v[0], &v[1], s),
                rtol,
                rtol,
            )?;
            check_batch_norm(&dev, &x, seed, &what, rtol)?;
        }
        // Maps large enough for several blocks per channel in the reductions, and 1x1 maps.
        for (i, shape) in [[8, 5, 64, 64], [3, 2, 100, 100], [16, 7, 1, 1]]
            .iter()
            .enumerate()
        {
            let x = (tensor(900 + i as u64, shape, 0.0, dtype, &cpu)? + 0.5)?;
            check_batch_norm(
                &dev,
                &x,
                910 + i as u64,
                &format!("{dtype:?} {shape:?}"),
                rtol,
            )?;
        }
    }
    Ok(())
}

/// Batch norm on the GPU against the CPU: the output followed by the batch mean and variance,
/// and the gradients to the input, `gamma` and `beta`.
fn check_batch_norm(dev: &Device, x: &Tensor, seed: u64, what: &str, rtol: f64) -> Result<()> {
    let (dtype, c) = (x.dtype(), x.dim(1)?);
    let gamma = (tensor(seed + 3, &[c], 0.0, dtype, &Device::Cpu)? + 1.5)?;
    let beta = tensor(seed + 4, &[c], 0.0, dtype, &Device::Cpu)?;
    check_op(
        &format!("batch norm {what}"),
        dev,
        &[(x * 3.0)?, gamma, beta],
        |v| {
            let (ys, mean, var) = batch_norm_train(&v[0], &v[1], &v[2], 1e-3)?;
            Tensor::cat(&[ys.flatten_all()?, mean, var], 0)
        },
        rtol,
        rtol,
    )
}

#[test]
fn the_adam_update_matches_the_cpu() -> Result<()> {
    let Some(dev) = gpu("the_adam_update_matches_the_cpu") else {
        return Ok(());
    };
    let step = AdamStep {
        alpha: 2.5e-3,
        decay: 1.0 - 2.5e-3 * 1e-4,
        l2: 1e-5,
        clip: 1.25,
    };
    for dtype in [DType::F32, DType::F64] {
        for (seed, shape) in [(1, vec![3, 5, 7, 9]), (2, vec![1]), (3, vec![70_001])] {
            let what = format!("{dtype:?} {shape:?}");
            let n: usize = shape.iter().product();
            let w = (tensor(seed, &shape, 0.0, dtype, &Device::Cpu)? * 1.3)?;
            let g = tensor(seed + 1, &shape, 0.0, dtype, &Device::Cpu)?;
            // Moments as after some steps: m of either sign, v positive.
            let m = (tensor(seed + 2, &[n], 0.0, dtype, &Device::Cpu)? * 0.1)?;
            let v = (tensor(seed + 3, &[n], 0.0, dtype, &Device::Cpu)?.sqr()? * 0.01)?;
            let mv = Tensor::cat(&[m, v], 0)?;
            let (wg, gg, mvg) = (w.to_device(&dev)?, g.to_device(&dev)?, mv.to_device(&dev)?);
            for _ in 0..3 {
                adam_step(&w, &g, &mv, step)?;
                adam_step(&wg, &gg, &mvg, step)?;
            }
            let rtol = if dtype == DType::F32 { 1e-6 } else { 1e-14 };
            assert_close(&wg, &w, rtol, &format!("adam weights {what}"));
            assert_close(&mvg, &mv, rtol, &format!("adam moments {what}"));
        }
    }
    Ok(())
}

//! A whole training step of every registered model on the GPU against the same step on the
//! CPU (feature `cuda`): the same initial weights and batch, the forward pass in training mode,
//! the loss, every gradient, the batch-norm moving statistics and the Adam update.
//!
//! Tolerances: the loss within 1e-4 relative; each gradient within 1e-4 of its largest
//! magnitude; each updated weight within 1e-5 of the CPU's where its gradient is not within
//! rounding of zero (Adam's first step is about `lr sign(g)`, so a gradient that is zero up to
//! rounding may step either way). The two devices sum in different orders, so a binary
//! activation within rounding of its threshold may decide differently; the tolerances leave
//! room for a few such decisions in a batch.
//!
//! Without a GPU each test prints why it did not run and passes. Build and run with
//! `kernels/cuda/build.sh test --release --features cuda -p zoo --test gpu_training`.
#![cfg(feature = "cuda")]

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use zoo::spec::InputShape;
use zoo::train::optim::{Adam, Slot};
use zoo::ModelConfig;

/// The first GPU, or `None` after printing why there is none.
fn gpu(test: &str) -> Option<Device> {
    match zoo::device::parse("cuda") {
        Ok(dev) => Some(dev),
        Err(e) => {
            println!("{test}: skipped: {e}");
            None
        }
    }
}

/// The smallest of the usual inputs that the model's spec accepts, with 10 classes.
fn model_config(name: &str) -> ModelConfig {
    let spec = zoo::spec(name).expect("a registered spec");
    ["32x32x1", "64x64x1", "128x128x1", "224x224x1"]
        .iter()
        .map(|input| ModelConfig {
            input: input.parse::<InputShape>().expect("an input shape"),
            classes: 10,
        })
        .find(|config| zoo::spec::analyze(&spec, config).is_ok())
        .unwrap_or_else(|| panic!("{name}: no test input fits"))
}

/// What one step computed on one device, copied to the host.
struct Step {
    loss: f64,
    /// Every gradient, by tensor name.
    grads: HashMap<String, Tensor>,
    /// Every tensor of the model after the step (weights and moving statistics), by name.
    after: HashMap<String, Tensor>,
}

/// One training step of `name` on `dev` from the weights `init` (on the host).
fn step(
    name: &str,
    config: &ModelConfig,
    init: &HashMap<String, Tensor>,
    (xs, ys): (&Tensor, &Tensor),
    dev: &Device,
) -> Result<Step> {
    let varmap = VarMap::new();
    {
        let mut data = varmap.data().lock().expect("the VarMap lock");
        for (k, t) in init {
            data.insert(k.clone(), Var::from_tensor(&t.to_device(dev)?)?);
        }
    }
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, dev);
    let model = zoo::build(name, vb, config).map_err(candle_core::Error::wrap)?;
    let logits = model.forward(&xs.to_device(dev)?, true)?;
    let loss = zoo::train::cross_entropy(&logits, &ys.to_device(dev)?, 0.0)?;
    let grads = loss.backward()?;
    let spec = zoo::spec(name).map_err(candle_core::Error::wrap)?;
    let analysis = zoo::spec::analyze(&spec, config).map_err(candle_core::Error::wrap)?;
    let data = varmap.data().lock().expect("the VarMap lock").clone();
    let mut slots = Vec::new();
    let mut grads_by_name = HashMap::new();
    for p in analysis.params().filter(|p| p.trainable) {
        let var = data[&p.name].clone();
        if let Some(g) = grads.get(var.as_tensor()) {
            grads_by_name.insert(p.name.clone(), g.to_device(&Device::Cpu)?);
        }
        slots.push(Slot {
            name: p.name.clone(),
            moments: Slot::moments(&var, None)?,
            var,
            clip: p.weight_clip,
            l2: 1e-5,
        });
    }
    let mut adam = Adam {
        kind: zoo::spec::Optimizer::Adam,
        weight_decay: 0.0,
        slots,
        t: 0,
    };
    adam.step(&grads, 2.5e-3)?;
    let after = data
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    Ok(Step {
        loss: loss.to_device(&Device::Cpu)?.to_scalar::<f32>()? as f64,
        grads: grads_by_name,
        after,
    })
}

fn host(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .expect("a host tensor reads")
}

#[test]
fn a_training_step_of_every_registered_model_on_the_gpu_matches_the_cpu() -> Result<()> {
    let Some(dev) = gpu("a_training_step_of_every_registered_model_on_the_gpu_matches_the_cpu")
    else {
        return Ok(());
    };
    for entry in zoo::list() {
        let name = entry.name;
        let config = model_config(name);
        let spec = zoo::spec(name).map_err(candle_core::Error::wrap)?;
        let init = VarMap::new();
        zoo::init::initialize(&init, &spec, &config, 7, DType::F32, &Device::Cpu)
            .map_err(candle_core::Error::wrap)?;
        let init: HashMap<String, Tensor> = init
            .data()
            .lock()
            .expect("the VarMap lock")
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        let (h, w, c) = (
            config.input.height,
            config.input.width,
            config.input.channels,
        );
        let batch = 4;
        let xs = Tensor::randn(0f32, 1f32, (batch, c, h, w), &Device::Cpu)?;
        let ys = Tensor::new(&[1u32, 4, 7, 9], &Device::Cpu)?;

        let cpu = step(name, &config, &init, (&xs, &ys), &Device::Cpu)?;
        let gpu = step(name, &config, &init, (&xs, &ys), &dev)?;

        assert!(
            (gpu.loss - cpu.loss).abs() <= 1e-4 * cpu.loss.abs(),
            "{name}: loss {} on the GPU, {} on the CPU",
            gpu.loss,
            cpu.loss
        );
        assert_eq!(
            gpu.grads.len(),
            cpu.grads.len(),
            "{name}: the same tensors have gradients"
        );
        for (k, g_cpu) in &cpu.grads {
            let (a, b) = (host(&gpu.grads[k]), host(g_cpu));
            let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
            let worst = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0., f64::max);
            assert!(
                worst <= 1e-4 * scale,
                "{name}: gradient of `{k}` differs by {worst} (largest {scale})"
            );
        }
        for (k, t_cpu) in &cpu.after {
            let (a, b) = (host(&gpu.after[k]), host(t_cpu));
            let grad = cpu.grads.get(k).map(host);
            let scale = grad
                .as_ref()
                .map_or(0., |g| g.iter().fold(0f64, |m, v| m.max(v.abs())));
            for i in 0..b.len() {
                let settled = grad.as_ref().is_none_or(|g| g[i].abs() > 1e-3 * scale);
                assert!(
                    !settled || (a[i] - b[i]).abs() <= 1e-5 * (1.0 + b[i].abs()),
                    "{name}: `{k}`[{i}] is {} after the GPU step, {} after the CPU step",
                    a[i],
                    b[i]
                );
            }
        }
        println!(
            "{name}: one step at {} matches (loss {:.6})",
            config.input, cpu.loss
        );
    }
    Ok(())
}

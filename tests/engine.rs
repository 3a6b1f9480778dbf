//! The inference engine against the candle models in inference mode: every shipped spec, and
//! single layers on random shapes (channels not multiples of 64, strides 1 and 2, both pad
//! values, odd sizes, LAB in both pairings).
//!
//! Logits must agree to 1e-4 of the largest logit. The engine folds batch norm and LAB in f64
//! and sums in another order than candle, so a binarized value within rounding of zero could
//! flip; with random continuous weights that has probability ~1e-6 per value, and these fixed
//! seeds hit none.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng};
use zoo::engine::{Engine, ZooModel};
use zoo::spec::{output_size, InputShape, ModelConfig, Padding};

/// Keras-initialised weights with random batch-norm statistics, affine parameters, biases and
/// LAB scales, so that no folding step is the identity.
fn random_weights(spec: &zoo::Spec, config: &ModelConfig, seed: u64) -> HashMap<String, Tensor> {
    let analysis = zoo::spec::analyze(spec, config).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    analysis
        .params()
        .map(|p| {
            let mut values = zoo::init::draw(p, &mut rng);
            let name = p.name.as_str();
            for v in values.iter_mut() {
                if name.ends_with("running_var") {
                    *v = rng.random_range(0.3..2.0);
                } else if name.ends_with("running_mean") {
                    *v = rng.random_range(-0.3..0.3);
                } else if name.ends_with("bn.weight") || name.ends_with("beta") {
                    *v = rng.random_range(0.5..1.5) * if rng.random_bool(0.2) { -1.0 } else { 1.0 };
                } else if name.ends_with(".bias") || name.ends_with("prelu.weight") {
                    *v = rng.random_range(-0.2..0.2);
                }
            }
            let t = Tensor::from_vec(values, p.shape.clone(), &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            (p.name.clone(), t)
        })
        .collect()
}

fn random_images(config: &ModelConfig, batch: usize, seed: u64) -> Vec<f32> {
    let i = config.input;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..batch * i.channels * i.height * i.width)
        .map(|_| rng.random_range(-2.0..2.0))
        .collect()
}

fn candle_logits(
    spec: &zoo::Spec,
    config: &ModelConfig,
    weights: &HashMap<String, Tensor>,
    images: &[f32],
    batch: usize,
) -> Vec<f32> {
    let vb = VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu);
    let model = zoo::Network::new(spec.clone(), vb, config).unwrap();
    let i = config.input;
    let xs =
        Tensor::from_slice(images, (batch, i.channels, i.height, i.width), &Device::Cpu).unwrap();
    use zoo::Model;
    model
        .forward(&xs, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Largest difference over the largest reference value.
fn relative_difference(ours: &[f32], reference: &[f32]) -> f32 {
    assert_eq!(ours.len(), reference.len());
    let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    let diff = ours
        .iter()
        .zip(reference)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    diff / scale
}

/// Exports `spec` with random weights, runs engine and candle on the same images and checks
/// the outputs agree; returns the engine model for further checks.
fn check(text: &str, spec: &zoo::Spec, config: ModelConfig, seed: u64, threads: usize) -> ZooModel {
    let weights = random_weights(spec, &config, seed);
    let batch = 2;
    let images = random_images(&config, batch, seed + 1);
    let reference = candle_logits(spec, &config, &weights, &images, batch);
    let model = zoo::engine::export(text, spec, &config, &weights).unwrap();
    let engine = Engine::new(&model, threads).unwrap();
    let ours = engine.run(&images, batch).unwrap();
    let diff = relative_difference(&ours, &reference);
    assert!(
        diff <= 1e-4,
        "{} at {}: engine and candle differ by {diff:e} of the largest output",
        spec.name,
        config.input
    );
    model
}

fn shipped_config(name: &str) -> ModelConfig {
    // XNOR-Net's VALID pools and 6x6 convolution need the full 224x224 input.
    let side = if name.starts_with("xnornet") { 224 } else { 32 };
    ModelConfig {
        input: InputShape {
            height: side,
            width: side,
            channels: 3,
        },
        classes: 10,
    }
}

#[test]
fn every_shipped_spec_matches_candle() {
    for (i, entry) in zoo::list().iter().enumerate() {
        let spec = zoo::spec(entry.name).unwrap();
        let config = shipped_config(entry.name);
        check(entry.yaml, &spec, config, 100 + i as u64, 2);
    }
}

#[test]
fn official_lab_pairing_matches_candle() {
    let text = zoo::spec_text("quicknet-lab").unwrap().replace(
        "activation: lab}",
        "activation: {lab: {pairing: official}}}",
    );
    assert!(text.contains("pairing: official"));
    let spec = zoo::spec::parse_str(&text, "quicknet-lab-official").unwrap();
    check(&text, &spec, shipped_config("quicknet"), 7, 2);
}

#[test]
fn a_saved_model_runs_identically_and_is_compact() {
    let spec = zoo::spec("quicknet").unwrap();
    let config = shipped_config("quicknet");
    let model = check(
        zoo::spec_text("quicknet").unwrap().as_str(),
        &spec,
        config,
        3,
        1,
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("quicknet.zoo");
    model.save(&path).unwrap();
    let loaded = ZooModel::load(&path).unwrap();
    assert_eq!(loaded.tensors, model.tensors);
    assert_eq!(loaded.config, model.config);
    let images = random_images(&config, 3, 9);
    let a = Engine::new(&model, 1).unwrap().run(&images, 3).unwrap();
    let b = Engine::load(&path, 3).unwrap().run(&images, 3).unwrap();
    assert_eq!(
        a, b,
        "thread count and a save/load round trip change nothing"
    );
    // Binary kernels take one bit each: the file is far smaller than f32 weights.
    let totals = zoo::spec::analyze(&spec, &config).unwrap().totals();
    let size = std::fs::metadata(&path).unwrap().len() as f64;
    let expected = totals.model_size_bytes();
    assert!(
        (size - expected).abs() / expected < 0.05,
        "file {size} bytes, expected about {expected}"
    );
}

/// One engine called from several threads at once (its pool shared) finishes every call with
/// the single-threaded results.
#[test]
fn concurrent_calls_on_a_shared_pool_finish_with_the_same_results() {
    let spec = zoo::spec("quicknet-lab").unwrap();
    let config = shipped_config("quicknet-lab");
    let text = zoo::spec_text("quicknet-lab").unwrap();
    let model = check(text.as_str(), &spec, config, 5, 1);
    let images = random_images(&config, 3, 11);
    let expected = Engine::new(&model, 1).unwrap().run(&images, 3).unwrap();
    let engine = Engine::new(&model, 3).unwrap();
    std::thread::scope(|s| {
        for caller in 0..4 {
            let (engine, images, expected) = (&engine, &images, &expected);
            s.spawn(move || {
                for round in 0..6 {
                    let batch = if (caller + round) % 2 == 0 { 1 } else { 3 };
                    let n = batch * images.len() / 3;
                    let logits = engine.run(&images[..n], batch).unwrap();
                    assert_eq!(
                        logits,
                        expected[..logits.len()],
                        "caller {caller}, round {round}"
                    );
                }
            });
        }
    });
}

/// What users share between threads is `Send + Sync`: engines, packed models, pretrained
/// models (`zoo::load`) and candle models; one candle model predicts from several threads at
/// once with the results of one thread.
#[test]
fn shared_models_predict_from_several_threads() {
    fn shareable<T: Send + Sync>() {}
    shareable::<Engine>();
    shareable::<ZooModel>();
    shareable::<zoo::hub::Pretrained>();
    shareable::<zoo::Network>();
    shareable::<Box<dyn zoo::Model>>();

    let spec = zoo::spec("quicknet-lab").unwrap();
    let config = ModelConfig {
        input: "32x32x1".parse().unwrap(),
        classes: 10,
    };
    let weights = random_weights(&spec, &config, 21);
    let vb = VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu);
    let model: Box<dyn zoo::Model> = zoo::build("quicknet-lab", vb, &config).unwrap();
    let images = random_images(&config, 2, 23);
    let xs = Tensor::from_slice(&images, (2, 1, 32, 32), &Device::Cpu).unwrap();
    let expected: Vec<f32> = candle_logits(&spec, &config, &weights, &images, 2);
    std::thread::scope(|s| {
        for caller in 0..4 {
            let (model, xs, expected) = (&model, &xs, &expected);
            s.spawn(move || {
                for round in 0..3 {
                    let logits: Vec<f32> = model
                        .forward(xs, false)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    assert!(
                        relative_difference(&logits, expected) < 1e-5,
                        "caller {caller}, round {round}"
                    );
                }
            });
        }
    });
}

#[test]
fn loading_a_file_that_is_not_a_zoo_model_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weights.safetensors");
    let t = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
    zoo::io::save_safetensors(&[("a".into(), t)], None, &path).unwrap();
    let err = ZooModel::load(&path).unwrap_err().to_string();
    assert!(
        err.contains("weights.safetensors") && err.contains("not a .zoo model"),
        "{err}"
    );
}

/// A one-layer spec (plus `flatten`, so that the output is the whole map in H, W, C order):
/// the layer maps `h x w x c` to `out` channels with this window.
fn layer_spec(
    [h, w, c]: [usize; 3],
    layer: &str,
    pad_value: u8,
    (kernel, stride, padding, out): ([usize; 2], [usize; 2], Padding, usize),
) -> (String, zoo::Spec) {
    let oh = output_size(h, kernel[0], stride[0], padding).unwrap();
    let ow = output_size(w, kernel[1], stride[1], padding).unwrap();
    let text = format!(
        "name: layer\ndescription: one layer\ninput: {h}x{w}x{c}\nclasses: {}\n\
         binary: {{pad_value: {pad_value}}}\nstem:\n  - {layer}\n  - flatten\n",
        oh * ow * out
    );
    let spec = zoo::spec::parse_str(&text, "<layer>").unwrap_or_else(|e| panic!("{e}\n{text}"));
    (text, spec)
}

#[test]
fn random_binary_convolutions_match_candle() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let activations = ["sign", "lab", "{lab: {pairing: official}}", "approx_sign"];
    for case in 0..24 {
        let channels = [1, 3, 63, 64, 65, 130][rng.random_range(0..6)];
        let filters = [1, 7, 64, 70][rng.random_range(0..4)];
        let (h, w) = (rng.random_range(1..12), rng.random_range(1..12));
        let kernel = [1, 3, 5][rng.random_range(0..3)].min(h.min(w).max(1));
        let stride = rng.random_range(1..3);
        let padding = if rng.random_bool(0.7) {
            Padding::Same
        } else {
            Padding::Valid
        };
        let activation = activations[case % activations.len()];
        let quantizer = ["ste_sign", "magnitude_aware_sign", "xnor_weight_scale"][case % 3];
        let pad_value = (case / 2 % 2) as u8;
        if padding == Padding::Valid && (kernel > h || kernel > w) {
            continue;
        }
        let name = if padding == Padding::Same {
            "same"
        } else {
            "valid"
        };
        let layer = format!(
            "quant_conv: {{filters: {filters}, kernel: {kernel}, stride: {stride}, padding: {name}, activation: {activation}, kernel_quantizer: {quantizer}}}"
        );
        let window = ([kernel; 2], [stride; 2], padding, filters);
        let (text, spec) = layer_spec([h, w, channels], &layer, pad_value, window);
        check(
            &text,
            &spec,
            spec.default_config(),
            case as u64,
            1 + case % 3,
        );
    }
}

#[test]
fn float_layers_and_pools_match_candle() {
    use Padding::{Same, Valid};
    let layers = [
        (
            "conv: {filters: 5, kernel: 3, stride: 2}",
            [3, 3],
            [2, 2],
            Same,
            5,
        ),
        (
            "conv: {filters: 9, kernel: [3, 1], padding: valid, bias: true}",
            [3, 1],
            [1, 1],
            Valid,
            9,
        ),
        (
            "depthwise_conv: {kernel: 3, stride: 2}",
            [3, 3],
            [2, 2],
            Same,
            6,
        ),
        (
            "depthwise_conv: {kernel: 3, multiplier: 2, bias: true}",
            [3, 3],
            [1, 1],
            Same,
            12,
        ),
        (
            "max_pool: {size: 3, stride: 2, padding: same}",
            [3, 3],
            [2, 2],
            Same,
            6,
        ),
        (
            "avg_pool: {size: 3, stride: 2, padding: same}",
            [3, 3],
            [2, 2],
            Same,
            6,
        ),
        ("avg_pool: {size: 2, stride: 2}", [2, 2], [2, 2], Valid, 6),
        ("blur_pool: {stride: 2}", [3, 3], [2, 2], Same, 6),
        ("prelu: {alpha: 0.25}", [1, 1], [1, 1], Valid, 6),
        ("bias", [1, 1], [1, 1], Valid, 6),
        ("batch_norm", [1, 1], [1, 1], Valid, 6),
        ("duplicate", [1, 1], [1, 1], Valid, 12),
        // Whole blocks of 16 output channels (the direct convolution's vector path).
        ("conv: {filters: 32, kernel: 3}", [3, 3], [1, 1], Same, 32),
    ];
    for (i, (layer, kernel, stride, padding, out)) in layers.into_iter().enumerate() {
        let window = (kernel, stride, padding, out);
        let (text, spec) = layer_spec([7, 9, 6], layer, 0, window);
        check(&text, &spec, spec.default_config(), 50 + i as u64, 2);
    }
    // 20 channels: one block of 16 in registers and 4 one by one (depthwise and pools).
    for (i, (layer, kernel, stride, padding)) in [
        (
            "depthwise_conv: {kernel: 3, stride: 2}",
            [3, 3],
            [2, 2],
            Same,
        ),
        ("max_pool: {size: 2, stride: 1}", [2, 2], [1, 1], Valid),
        (
            "avg_pool: {size: 3, stride: 2, padding: same}",
            [3, 3],
            [2, 2],
            Same,
        ),
        ("blur_pool: {stride: 2}", [3, 3], [2, 2], Same),
    ]
    .into_iter()
    .enumerate()
    {
        let (text, spec) = layer_spec([9, 8, 20], layer, 0, (kernel, stride, padding, 20));
        check(&text, &spec, spec.default_config(), 70 + i as u64, 2);
    }
    // A float kernel on binarized inputs pads with +1.
    for (i, filters) in [5, 16].into_iter().enumerate() {
        let layer = format!(
            "quant_conv: {{filters: {filters}, kernel: 3, stride: 2, kernel_quantizer: none}}"
        );
        let window = ([3, 3], [2, 2], Same, filters);
        let (text, spec) = layer_spec([7, 9, 6], &layer, 1, window);
        check(&text, &spec, spec.default_config(), 90 + i as u64, 2);
    }
}

#[test]
fn binary_max_pool_and_binarize_match_candle() {
    // 9x11 -> max pool 3/2 VALID -> 4x5 -> two SAME convolutions -> 4x5x65.
    let text = "name: pooled\ndescription: binarize, pool the bits, convolve\ninput: 9x11x70\n\
                classes: 1300\nstem:\n  - binarize\n  - max_pool: {size: 3, stride: 2}\n  \
                - quant_conv: {filters: 66, kernel: 3, activation: none}\n  - batch_norm\n  \
                - quant_conv: {filters: 65, kernel: 3}\n  - flatten\n";
    let spec = zoo::spec::parse_str(text, "<pooled>").unwrap();
    check(text, &spec, spec.default_config(), 5, 2);
    // LAB on the pooled bits reads them as ±1 floats.
    let text = text.replace("activation: none", "activation: lab");
    let spec = zoo::spec::parse_str(&text, "<pooled>").unwrap();
    check(&text, &spec, spec.default_config(), 6, 2);
}

/// The size target: QuickNet at 224x224x3 with 1000 classes within 10% of Larq's
/// reported model size, 4.17 MiB (binary kernels 1 bit, everything else 32-bit).
#[test]
fn quicknet_file_is_as_small_as_larqs_model_size() {
    let spec = zoo::spec("quicknet").unwrap();
    let config = spec.default_config();
    let weights = random_weights(&spec, &config, 1);
    let model = zoo::engine::export(
        &zoo::spec_text("quicknet").unwrap(),
        &spec,
        &config,
        &weights,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("quicknet.zoo");
    model.save(&path).unwrap();
    let mib = std::fs::metadata(&path).unwrap().len() as f64 / (1024.0 * 1024.0);
    assert!((mib - 4.17).abs() / 4.17 < 0.10, "{mib:.3} MiB");
}

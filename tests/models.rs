//! Whole models: generated structs against the runtime builder, weight names, gradients.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use zoo::spec::{InputShape, ModelConfig};

/// A small input each backbone accepts (XNOR-Net's VALID pools and 6x6 convolution need at least 217
/// pixels), with a batch of 2 and 10 classes.
fn small_config(name: &str) -> ModelConfig {
    let side = if name.starts_with("xnornet") { 224 } else { 32 };
    ModelConfig {
        input: InputShape {
            height: side,
            width: side,
            channels: 1,
        },
        classes: 10,
    }
}

fn images(config: &ModelConfig, seed: u64) -> Tensor {
    let InputShape {
        height,
        width,
        channels,
    } = config.input;
    let n = 2 * channels * height * width;
    // A fixed pseudo-random pattern in [-1, 1).
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let values: Vec<f32> = (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(values, (2, channels, height, width), &Device::Cpu).unwrap()
}

/// Non-trivial batch-norm statistics, so that inference mode is not the identity.
fn perturb_statistics(varmap: &VarMap) {
    for (name, var) in varmap.data().lock().unwrap().iter() {
        let t = var.as_tensor();
        if name.ends_with("running_mean") {
            var.set(&t.ones_like().unwrap().affine(0.1, 0.0).unwrap())
                .unwrap();
        } else if name.ends_with("running_var") {
            var.set(&t.ones_like().unwrap().affine(1.5, 0.0).unwrap())
                .unwrap();
        }
    }
}

/// Every registered spec, built as its generated struct and by the runtime builder from the
/// same spec file with the same weights, computes bit-identical logits in inference and
/// training mode.
#[test]
fn generated_and_runtime_models_agree() {
    let dev = Device::Cpu;
    for entry in zoo::list() {
        let spec = zoo::spec(entry.name).unwrap();
        let config = small_config(entry.name);
        let varmap = VarMap::new();
        zoo::init::initialize(&varmap, &spec, &config, 7, DType::F32, &dev).unwrap();
        perturb_statistics(&varmap);
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let generated = zoo::build(entry.name, vb.clone(), &config).unwrap();
        let path = format!("{}/{}", env!("CARGO_MANIFEST_DIR"), entry.file);
        let runtime = zoo::build(&path, vb, &config).unwrap();
        assert_eq!(
            generated.spec().nodes,
            runtime.spec().nodes,
            "{}",
            entry.name
        );

        let xs = images(&config, 1);
        let a = generated.forward(&xs, false).unwrap();
        let b = runtime.forward(&xs, false).unwrap();
        assert_eq!(a.dims(), &[2, 10], "{}", entry.name);
        let (a, b) = (a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
        assert_eq!(a, b, "{}: inference logits differ", entry.name);
        assert!(a.iter().flatten().all(|v| v.is_finite()), "{}", entry.name);
        // The logits depend on the input.
        let c = generated
            .forward(&images(&config, 2), false)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_ne!(a, c, "{}: logits do not depend on the input", entry.name);

        let a = generated
            .forward(&xs, true)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let b = runtime
            .forward(&xs, true)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(a, b, "{}: training-mode logits differ", entry.name);
    }
}

/// The tensors a model creates are exactly those the spec analysis lists (names and shapes),
/// so importers, initialisers and optimisers can rely on that list.
#[test]
fn models_create_exactly_the_listed_tensors() {
    let dev = Device::Cpu;
    for entry in zoo::list() {
        let spec = zoo::spec(entry.name).unwrap();
        let config = small_config(entry.name);
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        zoo::build(entry.name, vb, &config).unwrap();
        let created: BTreeMap<String, Vec<usize>> = varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().dims().to_vec()))
            .collect();
        let analysis = zoo::spec::analyze(&spec, &config).unwrap();
        let listed: BTreeMap<String, Vec<usize>> = analysis
            .params()
            .map(|p| (p.name.clone(), p.shape.clone()))
            .collect();
        assert_eq!(created, listed, "{}", entry.name);
        let count: usize = created.values().map(|s| s.iter().product::<usize>()).sum();
        assert_eq!(count as u64, analysis.totals().params, "{}", entry.name);
    }
}

/// Both builders keep the caller's `VarBuilder` prefix for every tensor, nested ones included.
#[test]
fn tensors_live_under_the_callers_prefix() {
    let dev = Device::Cpu;
    let config = small_config("reactnet-lab");
    let path = format!("{}/../specs/reactnet_lab.yaml", env!("CARGO_MANIFEST_DIR"));
    let mut names = Vec::new();
    for name in ["reactnet-lab", path.as_str()] {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev).pp("backbone");
        zoo::build(name, vb, &config).unwrap();
        let mut keys: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
        keys.sort();
        assert!(
            keys.iter().all(|k| k.starts_with("backbone.")),
            "{name}: {keys:?}"
        );
        assert!(
            keys.contains(&"backbone.stage2.block1.conv2a.weight".to_string()),
            "{name}"
        );
        names.push(keys);
    }
    assert_eq!(names[0], names[1]);
}

/// One spec serves small grayscale and RGB inputs of other sizes with any class count.
/// (QuickNet's transitions need at least 32x32: its last 2x2 VALID max-pool sees 1x1 at 28x28.)
#[test]
fn input_shape_and_classes_are_constructor_parameters() {
    let dev = Device::Cpu;
    for (name, input, classes) in [
        ("birealnet-lab", "28x28x1", 10),
        ("quicknet-lab", "32x32x1", 10),
        ("quicknet-lab", "64x48x3", 5),
    ] {
        let config = ModelConfig {
            input: input.parse().unwrap(),
            classes,
        };
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let model = zoo::build(name, vb, &config).unwrap();
        let InputShape {
            height,
            width,
            channels,
        } = config.input;
        let xs = Tensor::ones((3, channels, height, width), DType::F32, &dev).unwrap();
        assert_eq!(
            model.forward(&xs, false).unwrap().dims(),
            &[3, classes],
            "{name} at {input}"
        );
    }
    assert_eq!(
        zoo::models::QuickNetLab::default_config().input.to_string(),
        "224x224x3"
    );
    let err = zoo::build(
        "quicknet-lab",
        VarBuilder::zeros(DType::F32, &dev),
        &ModelConfig {
            input: "28x28x1".parse().unwrap(),
            classes: 10,
        },
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("stage4.transition.maxpool") && err.contains("does not fit in 1x1"),
        "{err}"
    );
}

/// A spec whose layers cannot take the requested input fails to build with an error naming
/// the layer and the shapes.
#[test]
fn impossible_input_is_a_clear_error() {
    let config = ModelConfig {
        input: "28x28x1".parse().unwrap(),
        classes: 10,
    };
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let err = zoo::build("reactnet", vb, &config)
        .err()
        .expect("ReActNet cannot take 28x28")
        .to_string();
    assert!(err.contains("stage3.block1.res1"), "{err}");
    assert!(
        err.contains("shortcut gives 3x3x128 but its body gives 4x4x128"),
        "{err}"
    );
    let err = zoo::build(
        "no-such-model",
        VarBuilder::zeros(DType::F32, &Device::Cpu),
        &config,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("unknown model `no-such-model`") && err.contains("quicknet-lab"),
        "{err}"
    );
}

/// A training step reaches every trainable tensor: gradients exist, are finite and most are
/// non-zero, and batch-norm moving statistics move while having no gradient.
#[test]
fn training_mode_backpropagates_to_every_trainable_tensor() {
    let dev = Device::Cpu;
    for name in ["quicknet-lab", "reactnet-lab", "labbnn"] {
        let spec = zoo::spec(name).unwrap();
        let config = small_config(name);
        let varmap = VarMap::new();
        zoo::init::initialize(&varmap, &spec, &config, 3, DType::F32, &dev).unwrap();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let model = zoo::build(name, vb, &config).unwrap();
        let logits = model.forward(&images(&config, 5), true).unwrap();
        let targets = Tensor::new(&[3u32, 7], &dev).unwrap();
        let loss = candle_nn::loss::cross_entropy(&logits, &targets).unwrap();
        let grads = loss.backward().unwrap();
        let analysis = zoo::spec::analyze(&spec, &config).unwrap();
        let vars = varmap.data().lock().unwrap();
        let mut nonzero = 0;
        let mut trainable = 0;
        for p in analysis.params() {
            let var = &vars[&p.name];
            let grad = grads.get(var.as_tensor());
            if !p.trainable {
                assert!(grad.is_none(), "{name}: {} has a gradient", p.name);
                if p.name.ends_with("running_mean") {
                    let moved = var
                        .as_tensor()
                        .abs()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap();
                    assert!(moved > 0.0, "{name}: {} did not move", p.name);
                }
                continue;
            }
            trainable += 1;
            let grad = grad.unwrap_or_else(|| panic!("{name}: no gradient for {}", p.name));
            let values = grad.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(values.iter().all(|v| v.is_finite()), "{name}: {}", p.name);
            if values.iter().any(|v| *v != 0.0) {
                nonzero += 1;
            }
        }
        assert!(
            nonzero * 10 >= trainable * 9,
            "{name}: only {nonzero} of {trainable} tensors have a non-zero gradient"
        );
    }
}

/// The initialiser is reproducible and draws Keras' distributions.
#[test]
fn keras_initialisers_are_seeded_and_scaled() {
    let dev = Device::Cpu;
    let spec = zoo::spec("quicknet").unwrap();
    let config = spec.default_config();
    let draw = |seed| {
        let varmap = VarMap::new();
        zoo::init::initialize(&varmap, &spec, &config, seed, DType::F32, &dev).unwrap();
        let data = varmap.data().lock().unwrap();
        let t = |n: &str| {
            data[n]
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        (
            t("stage4.block1.conv.weight"),
            t("stem.conv1.weight"),
            t("stem.bn1.running_var"),
        )
    };
    let (a, stem, var) = draw(1);
    assert_eq!(a, draw(1).0);
    assert_ne!(a, draw(2).0);
    // glorot_normal on 3x3x512x512: stddev sqrt(2 / (4608 + 4608)), truncated at 2 stddevs of
    // the untruncated draw (stddev / 0.8796).
    let std = (2.0f64 / 9216.0).sqrt();
    let measured = (a.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / a.len() as f64).sqrt();
    assert!(
        (measured / std - 1.0).abs() < 0.01,
        "stddev {measured} vs {std}"
    );
    let bound = 2.0 * std / 0.879_625_661_034_239_8;
    assert!(a.iter().all(|v| (*v as f64).abs() <= bound + 1e-7));
    // he_normal on the 3x3x3 stem: stddev sqrt(2 / 27).
    assert!(stem
        .iter()
        .all(|v| (*v as f64).abs() <= 2.0 * (2.0f64 / 27.0).sqrt() / 0.8796 + 1e-6));
    assert!(var.iter().all(|v| *v == 1.0));
}

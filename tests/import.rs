//! Importing Keras / Larq weights (`zoo::import`, `zoo import-larq`) against the Larq fixtures
//! in `tests/fixtures/larq/`: for each `<name>.yaml` there is `<name>.h5` (Keras weights),
//! `<name>.input.npy` (NCHW input) and `<name>.logits.npy` (Keras inference logits); the fixtures
//! with gradients add `<name>.labels.npy`, `<name>.train_logits.npy` (training-mode logits) and
//! `<name>.grads.h5` (the gradients of the loss, in the layout of the weights).
//! `larq-zoo-quicknet` is end to end: Larq Zoo's own QuickNet class, weights in Larq Zoo's layer
//! order, classifying `larq-zoo-quicknet.png` (top 5 in `larq-zoo-quicknet.top5.json`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use zoo::{Error, ModelConfig, Spec};

/// The fixtures that carry gradients.
const GRADIENT_FIXTURES: [&str; 2] = ["quicknet-lab", "birealnet-lab"];

/// Fixtures that must be present (besides those above): every `.yaml` is tested for logits,
/// these also have tests of their own.
const NAMED_FIXTURES: [&str; 2] = ["quicknet-lab-official", "larq-zoo-quicknet"];

/// ImageNet mean and standard deviation per RGB channel, as Larq Zoo's `preprocess_input`
/// normalises (`(x - 255 * mean) / (255 * std)`, in f32).
const IMAGENET_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f64; 3] = [0.229, 0.224, 0.225];

fn fixture_dir() -> PathBuf {
    match std::env::var_os("ZOO_LARQ_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/larq"),
    }
}

fn fixture(name: &str, ext: &str) -> PathBuf {
    fixture_dir().join(format!("{name}.{ext}"))
}

/// Every fixture, by name (the stem of each `.yaml`).
fn fixtures() -> Vec<String> {
    let dir = fixture_dir();
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read the fixtures in {}: {e}", dir.display()))
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            (path.extension()? == "yaml").then(|| path.file_stem()?.to_str().map(String::from))?
        })
        .collect();
    names.sort();
    assert!(!names.is_empty(), "no fixtures in {}", dir.display());
    names
}

fn spec_and_config(name: &str) -> (String, Spec, ModelConfig) {
    let path = fixture(name, "yaml").display().to_string();
    let spec = zoo::spec(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
    let config = spec.default_config();
    (path, spec, config)
}

fn import(name: &str, file: &str) -> Vec<(String, Tensor)> {
    let (_, spec, config) = spec_and_config(name);
    zoo::import::read_keras_h5(&fixture(name, file), &spec, &config)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The gradients in `<name>.grads.h5` (zeros for non-trainable weights, the blur included).
fn import_gradients(name: &str) -> Vec<(String, Tensor)> {
    let (_, spec, config) = spec_and_config(name);
    zoo::import::read_keras_h5_values(&fixture(name, "grads.h5"), &spec, &config)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn npy(name: &str, ext: &str) -> Tensor {
    let path = fixture(name, ext);
    Tensor::read_npy(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// `max |a - b|` over `max(max |b|, floor)`.
fn relative_difference(a: &Tensor, b: &Tensor, floor: f32) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (values(a), values(b));
    let scale = b.iter().fold(floor, |m, v| m.max(v.abs()));
    let diff = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    diff / scale
}

/// The imported tensors as variables, so that gradients reach them.
fn varmap(tensors: &[(String, Tensor)]) -> VarMap {
    let varmap = VarMap::new();
    {
        let mut data = varmap.data().lock().unwrap();
        for (name, t) in tensors {
            data.insert(name.clone(), Var::from_tensor(t).unwrap());
        }
    }
    varmap
}

/// A fresh temporary directory for one test.
fn temp_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("zoo-import-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Every imported fixture gives every tensor of the model exactly once, in the analysis' order,
/// and the model built from them reproduces the Keras inference logits.
#[test]
fn imported_weights_reproduce_keras_logits() {
    let all = fixtures();
    for name in NAMED_FIXTURES.iter().chain(&GRADIENT_FIXTURES) {
        assert!(all.iter().any(|n| n == name), "missing fixture {name}");
    }
    for name in all {
        let (path, spec, config) = spec_and_config(&name);
        let tensors = import(&name, "h5");
        let expected: Vec<(String, Vec<usize>)> = zoo::spec::analyze(&spec, &config)
            .unwrap()
            .params()
            .map(|p| (p.name.clone(), p.shape.clone()))
            .collect();
        let got: Vec<(String, Vec<usize>)> = tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.dims().to_vec()))
            .collect();
        assert_eq!(got, expected, "{name}: names and shapes");
        assert!(tensors.iter().all(|(_, t)| t.dtype() == DType::F32));

        let map: HashMap<String, Tensor> = tensors.into_iter().collect();
        let vb = VarBuilder::from_tensors(map, DType::F32, &Device::Cpu);
        let model = zoo::build(&path, vb, &config).unwrap();
        let logits = model.forward(&npy(&name, "input.npy"), false).unwrap();
        let reference = npy(&name, "logits.npy");
        let diff = relative_difference(&logits, &reference, 1e-6);
        eprintln!("{name}: inference logits differ by {diff:.2e} of the largest");
        assert!(
            diff <= 1e-4,
            "{name}: logits differ from Keras by {diff} of the largest\nours:  {logits}\nKeras: {reference}"
        );
    }
}

/// Builds the model of the spec file `path` from imported tensors and runs it in inference mode.
fn inference(path: &str, tensors: &[(String, Tensor)], config: &ModelConfig, x: &Tensor) -> Tensor {
    let map: HashMap<String, Tensor> = tensors.iter().cloned().collect();
    let vb = VarBuilder::from_tensors(map, DType::F32, &Device::Cpu);
    let model = zoo::build(path, vb, config).unwrap_or_else(|e| panic!("{path}: {e}"));
    model.forward(x, false).unwrap()
}

/// `quicknet-lab-official` (LAB with `pairing: official`, Keras reshaping the 2C depthwise
/// outputs as (2, C)) matches Keras, and the same weights with `pairing: channel` do not: the
/// fixture really tests the pairing.
#[test]
fn lab_official_pairing_matches_keras_and_differs_from_channel() {
    let name = "quicknet-lab-official";
    let (path, _, config) = spec_and_config(name);
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        text.matches("activation: {lab: {pairing: official}}")
            .count(),
        4
    );
    let tensors = import(name, "h5");
    let x = npy(name, "input.npy");
    let reference = npy(name, "logits.npy");

    let official = inference(&path, &tensors, &config, &x);
    let diff = relative_difference(&official, &reference, 1e-6);
    assert!(diff <= 1e-4, "{name}: logits differ from Keras by {diff}");

    let dir = temp_dir("lab-pairing");
    let channel_path = dir.join("quicknet-lab-channel.yaml");
    std::fs::write(
        &channel_path,
        text.replace("{lab: {pairing: official}}", "{lab: {pairing: channel}}"),
    )
    .unwrap();
    let channel_path = channel_path.display().to_string();
    let (channel_spec, channel_config) = {
        let spec = zoo::spec(&channel_path).unwrap();
        let config = spec.default_config();
        (spec, config)
    };
    // The same file imports unchanged: the pairing does not change any tensor's shape.
    let channel_tensors =
        zoo::import::read_keras_h5(&fixture(name, "h5"), &channel_spec, &channel_config).unwrap();
    for ((a, t), (b, u)) in tensors.iter().zip(&channel_tensors) {
        assert_eq!(a, b);
        assert_eq!(values(t), values(u), "{a}");
    }
    let channel = inference(&channel_path, &channel_tensors, &channel_config, &x);
    let diff = relative_difference(&channel, &reference, 1e-6);
    eprintln!("{name}: with `pairing: channel` the logits differ by {diff:.2e} of the largest");
    assert!(
        diff > 1e-2,
        "{name}: `pairing: channel` gives the same logits ({diff}): the fixture does not test the pairing"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The numbers of the array `"key": [...]` in a flat JSON object.
fn json_array(text: &str, key: &str) -> Vec<f64> {
    let start = text
        .find(&format!("\"{key}\""))
        .unwrap_or_else(|| panic!("no `{key}` in {text}"));
    let rest = &text[start..];
    let open = rest.find('[').unwrap();
    let close = rest.find(']').unwrap();
    rest[open + 1..close]
        .split(',')
        .map(|v| v.trim().parse().unwrap_or_else(|e| panic!("`{v}`: {e}")))
        .collect()
}

/// `larq-zoo-quicknet.png` as Larq Zoo preprocesses it for QuickNet: RGB, each channel
/// `(x - 255 * mean) / (255 * std)` with the ImageNet mean and std, as a 1 x 3 x H x W tensor.
fn preprocessed_png(path: &Path) -> Tensor {
    let img = image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut data = vec![0f32; 3 * h * w];
    for (x, y, pixel) in img.enumerate_pixels() {
        for c in 0..3 {
            let mean = (IMAGENET_MEAN[c] * 255.0) as f32;
            let std = (IMAGENET_STD[c] * 255.0) as f32;
            data[(c * h + y as usize) * w + x as usize] = (f32::from(pixel[c]) - mean) / std;
        }
    }
    Tensor::from_vec(data, (1, 3, h, w), &Device::Cpu).unwrap()
}

/// End to end: Larq Zoo's own QuickNet (reduced widths and depth), weights saved in Larq Zoo's
/// layer order, classifies a PNG preprocessed as Larq Zoo does; the softmax top 5 matches Keras'
/// (same classes, same order, probabilities within 1e-4).
#[test]
fn larq_zoo_quicknet_classifies_the_image_like_keras() {
    let name = "larq-zoo-quicknet";
    let (path, spec, config) = spec_and_config(name);
    assert_eq!(
        (config.classes, config.input.to_string()),
        (1000, "32x32x3".to_string())
    );

    let x = preprocessed_png(&fixture(name, "png"));
    let keras_input = npy(name, "input.npy");
    let diff = values(&x)
        .iter()
        .zip(values(&keras_input))
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert_eq!(x.dims(), keras_input.dims());
    assert!(
        diff <= 1e-6,
        "{name}: preprocessed input differs from Keras' by {diff}"
    );

    let tensors = zoo::import::read_keras_h5(&fixture(name, "h5"), &spec, &config)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let logits = inference(&path, &tensors, &config, &x);
    assert_eq!(logits.dims(), [1, 1000]);
    let probs = values(&candle_nn::ops::softmax(&logits, 1).unwrap());
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    let top5 = &order[..5];

    let json = std::fs::read_to_string(fixture(name, "top5.json")).unwrap();
    let classes: Vec<usize> = json_array(&json, "classes")
        .iter()
        .map(|&c| c as usize)
        .collect();
    let probabilities = json_array(&json, "probabilities");
    assert_eq!((classes.len(), probabilities.len()), (5, 5));
    eprintln!(
        "{name}: top 5 {top5:?} {:?}, Keras {classes:?} {probabilities:?}",
        top5.iter().map(|&c| probs[c]).collect::<Vec<_>>()
    );
    assert_eq!(top5, classes.as_slice(), "{name}: top-5 classes");
    for (&c, &p) in classes.iter().zip(&probabilities) {
        let diff = (f64::from(probs[c]) - p).abs();
        assert!(
            diff <= 1e-4,
            "{name}: probability of class {c} is {} (Keras {p})",
            probs[c]
        );
    }
}

/// For the fixtures with gradients: training-mode logits and the gradient of the
/// cross-entropy loss with respect to every tensor match Keras' (to 1e-3 of each gradient's
/// largest value).
#[test]
fn imported_weights_reproduce_keras_gradients() {
    let all = fixtures();
    for name in GRADIENT_FIXTURES {
        assert!(all.iter().any(|n| n == name), "missing fixture {name}");
        let (path, spec, config) = spec_and_config(name);
        let tensors = import(name, "h5");
        let varmap = varmap(&tensors);
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let model = zoo::build(&path, vb, &config).unwrap();

        let logits = model.forward(&npy(name, "input.npy"), true).unwrap();
        let reference = npy(name, "train_logits.npy");
        let diff = relative_difference(&logits, &reference, 1e-6);
        eprintln!("{name}: training logits differ by {diff:.2e} of the largest");
        assert!(
            diff <= 1e-4,
            "{name}: training logits differ from Keras by {diff} of the largest"
        );

        let labels = npy(name, "labels.npy").to_dtype(DType::U32).unwrap();
        let loss = candle_nn::loss::cross_entropy(&logits, &labels).unwrap();
        let grads = loss.backward().unwrap();

        let expected = import_gradients(name);
        let trainable: HashMap<String, bool> = zoo::spec::analyze(&spec, &config)
            .unwrap()
            .params()
            .map(|p| (p.name.clone(), p.trainable))
            .collect();
        let vars = varmap.data().lock().unwrap();
        let mut worst = (0f32, String::new());
        let mut compared = 0;
        // Every tensor: a non-trainable one (moving statistics) has no gradient on either side.
        for (tensor_name, keras) in &expected {
            if trainable[tensor_name] {
                compared += 1;
            }
            let var = &vars[tensor_name];
            let ours = grads
                .get(var.as_tensor())
                .cloned()
                .unwrap_or_else(|| var.as_tensor().zeros_like().unwrap());
            let diff = relative_difference(&ours, keras, 1e-6);
            if diff > worst.0 {
                worst = (diff, tensor_name.clone());
            }
            assert!(
                diff <= 1e-3,
                "{name}: the gradient of `{tensor_name}` differs from Keras by {diff} of its largest value"
            );
        }
        eprintln!(
            "{name}: {} gradients ({compared} of trainable tensors), worst {:.2e} (`{}`)",
            expected.len(),
            worst.0,
            worst.1
        );
        assert!(compared > 0);
    }
}

/// A file of one architecture imported with another spec names the first layer that differs,
/// and the command line writes nothing.
#[test]
fn wrong_spec_names_the_mismatch_and_writes_nothing() {
    let (quicknet_path, quicknet, config) = spec_and_config("quicknet-lab");
    let birealnet_h5 = fixture("birealnet-lab", "h5");
    let err = zoo::import::read_keras_h5(&birealnet_h5, &quicknet, &config).unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(err, Error::WeightMismatch { .. }),
        "unexpected error: {message}"
    );
    assert!(
        message.contains("does not match") && message.contains("stem.conv1"),
        "{message}"
    );

    let dir = temp_dir("wrong-spec");
    let out = dir.join("model.safetensors");
    let output = Command::new(env!("CARGO_BIN_EXE_zoo"))
        .args(["import-larq"])
        .arg(&birealnet_h5)
        .args(["--spec", &quicknet_path, "-o"])
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.starts_with("error: the weights in") && stderr.contains("does not match"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "wrote a file");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A class count that differs from the file's is reported with the count to use.
#[test]
fn wrong_class_count_suggests_the_right_one() {
    let (_, spec, config) = spec_and_config("quicknet-lab");
    let wrong = ModelConfig {
        classes: config.classes + 1,
        ..config
    };
    let message = zoo::import::read_keras_h5(&fixture("quicknet-lab", "h5"), &spec, &wrong)
        .unwrap_err()
        .to_string();
    assert!(
        message.contains(&format!("--classes {}", config.classes)),
        "{message}"
    );
}

/// Truncated, corrupt, missing and non-Keras files give a clear error, never a panic.
#[test]
fn unreadable_files_are_clear_errors() {
    let (_, spec, config) = spec_and_config("quicknet-lab");
    let bytes = std::fs::read(fixture("quicknet-lab", "h5")).unwrap();
    let dir = temp_dir("unreadable");
    let check = |file: &Path, expect: &str| {
        let err = zoo::import::read_keras_h5(file, &spec, &config).unwrap_err();
        let message = err.to_string();
        assert!(
            matches!(err, Error::KerasFile { .. }),
            "{}: {message}",
            file.display()
        );
        assert!(
            message.contains(expect),
            "{}: expected `{expect}` in: {message}",
            file.display()
        );
    };
    for len in [0, 7, 100, 2048, bytes.len() / 2, bytes.len() - 1] {
        let file = dir.join(format!("truncated-{len}.h5"));
        std::fs::write(&file, &bytes[..len]).unwrap();
        check(&file, "truncated");
    }
    let mut corrupt = bytes.clone();
    corrupt[..8].copy_from_slice(b"NOT HDF5");
    let file = dir.join("corrupt.h5");
    std::fs::write(&file, &corrupt).unwrap();
    check(&file, "not an HDF5 file");
    check(&fixture("quicknet-lab", "yaml"), "not an HDF5 file");
    check(&dir.join("missing.h5"), "no such file");

    // An HDF5 file that Keras did not write.
    let mut builder = hdf5_pure::FileBuilder::new();
    builder
        .create_dataset("data")
        .with_f32_data(&[1.0, 2.0])
        .with_shape(&[2]);
    let file = dir.join("plain.h5");
    builder.write(&file).unwrap();
    check(&file, "not a Keras weights file");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `zoo import-larq` writes the imported tensors as safetensors and prints a summary.
#[test]
fn cli_writes_the_imported_tensors() {
    let name = "birealnet-lab";
    let (path, _, config) = spec_and_config(name);
    let dir = temp_dir("cli");
    let out = dir.join("model.safetensors");
    let output = Command::new(env!("CARGO_BIN_EXE_zoo"))
        .arg("import-larq")
        .arg(fixture(name, "h5"))
        .args([
            "--spec",
            &path,
            "--classes",
            &config.classes.to_string(),
            "-o",
        ])
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let tensors = import(name, "h5");
    let params: usize = tensors.iter().map(|(_, t)| t.elem_count()).sum();
    assert!(
        stdout.starts_with(&format!(
            "imported {} tensors, {params} parameters",
            tensors.len()
        )) && stdout.contains(&out.display().to_string()),
        "{stdout}"
    );
    let written = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    assert_eq!(written.len(), tensors.len());
    for (tensor_name, t) in &tensors {
        assert_eq!(values(&written[tensor_name]), values(t), "{tensor_name}");
    }
    // Only the output file: the temporary file was renamed.
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The atomic writer leaves nothing behind when it fails, and keeps an existing file.
#[test]
fn failed_write_leaves_nothing() {
    let dir = temp_dir("atomic");
    let out = dir.join("model.safetensors");
    std::fs::write(&out, b"old").unwrap();
    let t = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
    let twice = vec![("a".to_string(), t.clone()), ("a".to_string(), t)];
    let err = zoo::import::write_safetensors_atomically(&twice, &out).unwrap_err();
    assert!(matches!(err, Error::Write { .. }), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), b"old");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    let missing_dir = dir.join("no/such/dir/model.safetensors");
    let one = vec![(
        "a".to_string(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    )];
    assert!(zoo::import::write_safetensors_atomically(&one, &missing_dir).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

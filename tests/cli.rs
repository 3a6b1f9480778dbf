//! The `zoo` command line.

use std::process::Command;

fn zoo(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_zoo"))
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .expect("the zoo binary runs");
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn list_shows_every_registered_model() {
    let (ok, out, _) = zoo(&["list"]);
    assert!(ok);
    for name in [
        "quicknet",
        "quicknet-lab",
        "quicknet-small",
        "quicknet-large",
        "birealnet",
        "birealnet-lab",
        "reactnet",
        "reactnet-lab",
        "xnornet",
        "xnornet-lab",
        "labbnn",
    ] {
        assert!(
            out.lines().any(|l| l.starts_with(&format!("{name} "))),
            "{name} missing:\n{out}"
        );
    }
}

#[test]
fn summary_of_quicknet_reports_larq_zoo_totals() {
    let (ok, out, err) = zoo(&["summary", "specs/quicknet.yaml"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("Parameters                   13,239,688 (13.2 M)"),
        "{out}"
    );
    assert!(
        out.contains("Binary MACs                  1,849,688,064 (1.85 G)"),
        "{out}"
    );
    assert!(out.contains("98.4% binary"), "{out}");
    assert!(out.contains("stage2.transition.blur"), "{out}");
}

#[test]
fn summary_takes_input_and_classes() {
    let (ok, out, err) = zoo(&[
        "summary",
        "quicknet-lab",
        "--input",
        "32x32x1",
        "--classes",
        "10",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("Input: 32x32x1 (HxWxC), 10 classes"), "{out}");
    assert!(out.contains("stage1.block1.conv"));
    assert!(
        out.lines()
            .any(|l| l.starts_with("head.dense1") && l.contains("1x1x10")),
        "{out}"
    );
}

#[test]
fn bad_input_is_a_clear_error() {
    let (ok, _, err) = zoo(&["summary", "quicknet", "--input", "224x224"]);
    assert!(!ok);
    assert!(err.contains("expected an input shape HxWxC"), "{err}");
    let (ok, _, err) = zoo(&["summary", "quicknet", "--classes", "0"]);
    assert!(
        !ok && err.contains("expected a positive number of classes"),
        "{err}"
    );
    let (ok, _, err) = zoo(&["summary", "resnet"]);
    assert!(!ok && err.contains("unknown model `resnet`"), "{err}");
    let (ok, _, err) = zoo(&["summary", "reactnet", "--input", "28x28x1"]);
    assert!(!ok, "ReActNet does not fit 28x28");
    assert!(
        err.contains("specs/reactnet.yaml:") && err.contains("stage3.block1.res1"),
        "{err}"
    );
}

/// `zoo export` of a weights file, then `zoo bench` (JSON and profile files) and `zoo predict`
/// on the exported model; the engine's prediction is the candle model's.
#[test]
fn export_bench_and_predict_a_model() {
    use candle_core::{DType, Device, Tensor};
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).display().to_string();
    let spec = zoo::spec("quicknet-lab").unwrap();
    let config = zoo::ModelConfig {
        input: "32x32x1".parse().unwrap(),
        classes: 10,
    };
    let analysis = zoo::spec::analyze(&spec, &config).unwrap();
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(4);
    let tensors: Vec<(String, Tensor)> = analysis
        .params()
        .map(|p| {
            let values = zoo::init::draw(p, &mut rng);
            let t = Tensor::from_vec(values, p.shape.clone(), &Device::Cpu).unwrap();
            (p.name.clone(), t.to_dtype(DType::F32).unwrap())
        })
        .collect();
    zoo::io::save_safetensors(&tensors, None, std::path::Path::new(&path("w.safetensors")))
        .unwrap();
    let labels = (0..10).map(|i| format!("thing{i}\n")).collect::<String>();
    std::fs::write(path("labels.txt"), labels).unwrap();

    let (ok, out, err) = zoo(&[
        "export",
        &path("w.safetensors"),
        "--spec",
        "quicknet-lab",
        "--input",
        "32x32x1",
        "--classes",
        "10",
        "--labels",
        &path("labels.txt"),
        "-o",
        &path("m.zoo"),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("exported `quicknet-lab`"), "{out}");

    let (ok, out, err) = zoo(&[
        "bench",
        &path("m.zoo"),
        "--runs",
        "3",
        "--batch",
        "2",
        "--threads",
        "2",
        "--json",
        &path("bench.json"),
        "--profile",
        "--profile-out",
        &path("profile"),
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("median") && out.contains("stage4.block4.conv"),
        "{out}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path("bench.json")).unwrap()).unwrap();
    assert_eq!(report["threads"], 2);
    assert!(report["latency_ms"]["median"].as_f64().unwrap() > 0.0);
    let csv = std::fs::read_to_string(path("profile.csv")).unwrap();
    assert!(csv.starts_with("op,kind,output,ms,share\n") && csv.contains("lab+binary_conv"));
    assert!(std::fs::metadata(path("profile.json")).is_ok());

    // The model against QuickNet with random weights, call for call.
    let (ok, out, err) = zoo(&[
        "bench",
        &path("m.zoo"),
        "--against",
        "quicknet",
        "--input",
        "32x32x1",
        "--classes",
        "10",
        "--runs",
        "4",
        "--batch",
        "0",
        "--json",
        &path("against.json"),
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("quicknet / quicknet-lab per pair of calls"),
        "{out}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path("against.json")).unwrap()).unwrap();
    let against = &report["against"];
    assert_eq!(against["model"], "quicknet");
    assert_eq!(against["latency_ms"]["runs"], 4);
    // Each pair's ratio lies between the extremes of the two models' times.
    let ms = |r: &serde_json::Value, q: &str| r["latency_ms"][q].as_f64().unwrap();
    let ratio = against["ratio"]["median"].as_f64().unwrap();
    let (low, high) = (
        ms(against, "min") / ms(&report, "max"),
        ms(against, "max") / ms(&report, "min"),
    );
    assert!(low <= ratio && ratio <= high, "{low} <= {ratio} <= {high}");

    // A 28x28 gray image, as Fashion-MNIST's.
    let image =
        image::GrayImage::from_fn(28, 28, |x, y| image::Luma([((x * 9 + y * 5) % 256) as u8]));
    image.save(path("shirt.png")).unwrap();
    let (ok, out, err) = zoo(&["predict", &path("m.zoo"), &path("shirt.png")]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 5, "{out}");
    // The candle model on the same pixels ranks the same class first.
    let pixels =
        zoo::data::fashion_mnist::eval_image(std::path::Path::new(&path("shirt.png")), 32).unwrap();
    let weights: std::collections::HashMap<_, _> = tensors.into_iter().collect();
    let vb = candle_nn::VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    let model = zoo::build("quicknet-lab", vb, &config).unwrap();
    let xs = Tensor::from_vec(pixels, (1, 1, 32, 32), &Device::Cpu).unwrap();
    let logits: Vec<f32> = model
        .forward(&xs, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let best = (0..10)
        .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
        .unwrap();
    assert!(
        out.lines()
            .next()
            .unwrap()
            .starts_with(&format!("1. class {best} thing{best}:")),
        "{out}"
    );

    let (ok, _, err) = zoo(&["predict", &path("w.safetensors"), &path("shirt.png")]);
    assert!(!ok && err.contains("not a .zoo model"), "{err}");
}

#[test]
fn a_device_that_is_not_there_is_a_clear_error() {
    let (ok, _, err) = zoo(&["--device", "tpu", "eval", "runs/none"]);
    assert!(!ok);
    assert!(err.contains("expected `cpu`, `cuda` or `cuda:N`"), "{err}");
    let (ok, _, err) = zoo(&[
        "--device",
        "cuda:4096",
        "train",
        "quicknet",
        "--epochs",
        "1",
    ]);
    assert!(!ok);
    let expected = if cfg!(feature = "cuda") {
        "no CUDA GPU 4096"
    } else {
        "built without its `cuda` feature"
    };
    assert!(err.contains(expected), "{err}");
    // The packed engine on a GPU, likewise.
    let (ok, _, err) = zoo(&[
        "--device",
        "cuda:4096",
        "bench",
        "quicknet",
        "--input",
        "32x32x1",
        "--runs",
        "1",
    ]);
    assert!(!ok && err.contains(expected), "{err}");
}

/// `zoo eval` of a `.zoo` model: the packed engine over a dataset folder's validation split,
/// with the figures `zoo::train::evaluate` gives for the same engine in process.
#[test]
fn eval_runs_a_packed_model_on_a_dataset_folder() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    for split in ["train", "val"] {
        for (c, class) in ["cat", "dog"].iter().enumerate() {
            let folder = root.join(split).join(class);
            std::fs::create_dir_all(&folder).unwrap();
            for i in 0..4u32 {
                let image = image::RgbImage::from_fn(40, 36, |x, y| {
                    image::Rgb([(x * 7 + i * 31) as u8, (y * 5 + c as u32 * 90) as u8, 128])
                });
                image.save(folder.join(format!("{i}.png"))).unwrap();
            }
        }
    }
    let config = zoo::ModelConfig {
        input: "32x32x3".parse().unwrap(),
        classes: 2,
    };
    let model = zoo::engine::bench::random_model("quicknet", &config, 3).unwrap();
    let path = dir.path().join("m.zoo");
    model.save(&path).unwrap();
    let data = root.display().to_string();
    let (ok, out, err) = zoo(&[
        "eval",
        path.to_str().unwrap(),
        "--data",
        &data,
        "--batch-size",
        "3",
        "--threads",
        "1",
    ]);
    assert!(ok, "{err}");
    let dataset = zoo::train::open_dataset(&data, zoo::data::Split::Validation, 32, false).unwrap();
    let engine = zoo::engine::Packed(Box::new(zoo::engine::Engine::new(&model, 1).unwrap()));
    let bar = indicatif::ProgressBar::hidden();
    let cpu = candle_core::Device::Cpu;
    let acc = zoo::train::evaluate(&engine, dataset, 3, 1, &bar, &cpu).unwrap();
    let expected = format!(
        "top-1 {:.2}%, top-5 {:.2}%, loss {:.4} on 8 images of {data}",
        acc.top1, acc.top5, acc.loss
    );
    assert!(out.contains(&expected), "{out} (expected {expected})");

    let (ok, _, err) = zoo(&["eval", path.to_str().unwrap(), "--spec", "quicknet"]);
    assert!(!ok && err.contains("carries its spec"), "{err}");
}

//! Pictures: `zoo plot` writes charts that decode (PNG) and parse (SVG) and show every run;
//! bad inputs are clear errors.

use std::path::Path;

#[path = "support/fixtures.rs"]
mod fixtures;

use fixtures::zoo;
use image::GenericImageView;
use zoo::train::{Accuracy, EpochMetrics};

/// An SVG file's text and the trimmed text of its elements; panics unless it parses as an
/// `<svg>` document.
fn svg_texts(path: &Path) -> (String, Vec<String>) {
    let text = std::fs::read_to_string(path).unwrap();
    let doc = roxmltree::Document::parse(&text).unwrap();
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    let texts = doc
        .descendants()
        .filter_map(|n| n.text())
        .map(|t| t.trim().to_string())
        .collect();
    (text, texts)
}

/// A run directory with `epochs` epochs of made-up metrics, validation top-1 from `top1`.
fn fake_run(dir: &Path, epochs: usize, top1: f64) {
    std::fs::create_dir_all(dir).unwrap();
    let lines: Vec<String> = (1..=epochs)
        .map(|e| {
            let m = EpochMetrics {
                epoch: e as f64,
                step: 100 * e as u64,
                train_loss: 1.0 / e as f64,
                train_top1: top1 - 2.0 + e as f64,
                val: Some(Accuracy {
                    top1: top1 + e as f64,
                    top5: 99.0,
                    loss: 0.5,
                    images: 100,
                    skipped: 0,
                }),
                learning_rate: 1e-3 * (1.0 - e as f64 / (epochs + 1) as f64),
                images_per_second: 100.0,
                seconds: 10.0,
                skipped: 0,
            };
            serde_json::to_string(&m).unwrap()
        })
        .collect();
    std::fs::write(dir.join("metrics.jsonl"), lines.join("\n") + "\n").unwrap();
}

#[test]
fn curves_of_several_runs_as_png_and_svg() {
    let dir = tempfile::tempdir().unwrap();
    let (sign, lab) = (dir.path().join("sign-run"), dir.path().join("lab-run"));
    fake_run(&sign, 4, 80.0);
    fake_run(&lab, 3, 82.0);
    let png = dir.path().join("curves.png");
    let (ok, out, err) = zoo(&[
        "plot",
        sign.to_str().unwrap(),
        lab.to_str().unwrap(),
        "-o",
        png.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("sign-run, lab-run"), "{out}");
    let image = image::open(&png).unwrap().to_rgb8();
    assert_eq!(image.dimensions(), (1280, 900));
    // Both runs' colours are drawn.
    for colour in [zoo::plot::colour(0), zoo::plot::colour(1)] {
        let rgb = image::Rgb([colour.0, colour.1, colour.2]);
        assert!(image.pixels().any(|p| *p == rgb), "{colour:?} is not drawn");
    }

    let svg = dir.path().join("curves.svg");
    let (ok, _, err) = zoo(&[
        "plot",
        sign.to_str().unwrap(),
        lab.to_str().unwrap(),
        "-o",
        svg.to_str().unwrap(),
        "--by",
        "step",
    ]);
    assert!(ok, "{err}");
    let (_, texts) = svg_texts(&svg);
    for label in [
        "sign-run",
        "lab-run",
        "optimizer step",
        "Validation top-1",
        "learning rate",
    ] {
        assert!(
            texts.iter().any(|t| t == label),
            "`{label}` missing from {texts:?}"
        );
    }
}

#[test]
fn bad_plot_inputs_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("no-metrics");
    std::fs::create_dir_all(&empty).unwrap();
    let out = dir.path().join("x.png");
    let (ok, _, err) = zoo(&["plot", empty.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("metrics.jsonl") && err.contains("no-metrics"),
        "{err}"
    );

    let broken = dir.path().join("broken");
    fake_run(&broken, 2, 80.0);
    std::fs::write(broken.join("metrics.jsonl"), "{\"epoch\": 1}\n").unwrap();
    let (ok, _, err) = zoo(&[
        "plot",
        broken.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("line 1"), "{err}");

    let good = dir.path().join("good");
    fake_run(&good, 2, 80.0);
    let pdf = dir.path().join("x.pdf");
    let (ok, _, err) = zoo(&["plot", good.to_str().unwrap(), "-o", pdf.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains(".png") && err.contains("x.pdf"), "{err}");
    assert!(!pdf.exists() && !out.exists());
}

fn fake_profile(path: &Path, kinds: &[&str]) {
    let layers: Vec<serde_json::Value> = kinds
        .iter()
        .enumerate()
        .map(|(i, kind)| {
            serde_json::json!({"name": format!("layer{i}"), "kind": kind, "output": "8x8x64",
                               "ms": 0.01 * (i + 1) as f64, "share": 0.1})
        })
        .collect();
    std::fs::write(path, serde_json::to_string(&layers).unwrap()).unwrap();
}

#[test]
fn latency_bars_of_two_profiles_side_by_side() {
    let dir = tempfile::tempdir().unwrap();
    let (sign, lab) = (dir.path().join("sign.json"), dir.path().join("lab.json"));
    fake_profile(&sign, &["conv", "binary_conv", "max_pool", "dense"]);
    fake_profile(&lab, &["conv", "lab+binary_conv", "max_pool", "dense"]);
    let png = dir.path().join("profile.png");
    let (ok, _, err) = zoo(&[
        "plot",
        sign.to_str().unwrap(),
        lab.to_str().unwrap(),
        "-o",
        png.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let image = image::open(&png).unwrap().to_rgb8();
    assert_eq!(image.dimensions(), (2 * 640, 160 + 16 * 4));
    let svg = dir.path().join("profile.svg");
    let (ok, _, err) = zoo(&[
        "plot",
        sign.to_str().unwrap(),
        lab.to_str().unwrap(),
        "-o",
        svg.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let (_, texts) = svg_texts(&svg);
    for label in [
        "layer0",
        "layer3",
        "sign: 0.100 ms in all",
        "lab: 0.100 ms in all",
        "LAB (+ binary conv)",
    ] {
        assert!(
            texts.iter().any(|t| t == label),
            "`{label}` missing from {texts:?}"
        );
    }

    // A JSON file of another format, and runs mixed with files, are refused.
    let other = dir.path().join("other.json");
    std::fs::write(&other, "{\"model\": \"quicknet\", \"latency_ms\": {}}").unwrap();
    let (ok, _, err) = zoo(&["plot", other.to_str().unwrap(), "-o", png.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("other.json") && err.contains("--profile"),
        "{err}"
    );
    let (ok, _, err) = zoo(&["plot", dir.path().to_str().unwrap(), sign.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("run directories only"), "{err}");
}

#[test]
fn accuracy_against_latency_joins_lab_to_sign() {
    let dir = tempfile::tempdir().unwrap();
    let results = dir.path().join("results.json");
    std::fs::write(
        &results,
        r#"[{"model": "quicknet", "top1": 90.7, "latency_ms": 0.115},
            {"model": "quicknet-lab", "top1": 91.1, "latency_ms": 0.120},
            {"model": "labbnn", "top1": 90.4, "latency_ms": 0.13}]"#,
    )
    .unwrap();
    let svg = dir.path().join("tradeoff.svg");
    let (ok, out, err) = zoo(&[
        "plot",
        results.to_str().unwrap(),
        "-o",
        svg.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("quicknet, quicknet-lab, labbnn"), "{out}");
    let (text, texts) = svg_texts(&svg);
    for label in [
        "quicknet",
        "quicknet-lab",
        "labbnn",
        "batch-1 latency (ms)",
        "test top-1 (%)",
    ] {
        assert!(
            texts.iter().any(|t| t == label),
            "`{label}` missing from {texts:?}"
        );
    }
    // LAB models (labbnn by its name) are drawn in LAB's colour, sign models in sign's.
    let fills = |colour: &str| text.matches(&format!("fill=\"{colour}\"")).count();
    let (sign, lab) = (fills("#1F77B4"), fills("#FF7F0E"));
    assert!(
        sign >= 2 && lab >= 3,
        "sign {sign}, LAB {lab} filled shapes"
    );
    let png = dir.path().join("tradeoff.png");
    let (ok, _, err) = zoo(&[
        "plot",
        results.to_str().unwrap(),
        "-o",
        png.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert_eq!(image::open(&png).unwrap().dimensions(), (1000, 700));
}

/// A `zoo inspect --json` file, written as `zoo inspect` writes it: one layer per
/// `(binarizer, map side, constant channels)`, 64 channels each, with a `beta` for LAB.
fn fake_inspection(path: &Path, layers: &[(&'static str, usize, usize)]) {
    let layers: Vec<zoo::inspect::BinarizerStats> = layers
        .iter()
        .enumerate()
        .map(
            |(i, &(binarizer, side, constant))| zoo::inspect::BinarizerStats {
                layer: format!("stage{i}.conv"),
                binarizer,
                channels: 64,
                map: [side, side],
                plus: 0.4,
                channel_plus: [0.0, 0.4, 1.0],
                constant_channels: constant,
                beta: (binarizer == "lab").then_some(0.003 * 10f64.powi(i as i32)),
            },
        )
        .collect();
    std::fs::write(path, serde_json::to_string(&layers).unwrap()).unwrap();
}

/// `zoo plot` of `inputs` into `out`: whether it succeeded, its output and its errors.
fn plot(inputs: &[&Path], out: &Path) -> (bool, String, String) {
    let mut args = vec!["plot"];
    args.extend(inputs.iter().map(|p| p.to_str().unwrap()));
    args.extend(["-o", out.to_str().unwrap()]);
    zoo(&args)
}

#[test]
fn binarizers_of_a_sign_model_beside_its_lab_twin() {
    let dir = tempfile::tempdir().unwrap();
    let (sign, lab) = (dir.path().join("sign.json"), dir.path().join("lab.json"));
    fake_inspection(&sign, &[("sign", 8, 0), ("sign", 2, 0), ("sign", 1, 3)]);
    fake_inspection(&lab, &[("lab", 8, 0), ("lab", 2, 7), ("sign", 1, 29)]);
    let svg = dir.path().join("binarizers.svg");
    let (ok, out, err) = plot(&[&sign, &lab], &svg);
    assert!(ok, "{err}");
    assert!(out.contains("2 input(s): sign, lab"), "{out}");
    assert!(!err.contains("by position"), "{err}");
    let (_, texts) = svg_texts(&svg);
    // Each model in the legend with its binarizer, each layer by its map, the count of stuck
    // channels above each bar that has some (none for the layers without), and LAB's beta.
    for label in [
        "LAB's beta (the sharpness of its choice; log scale, absolute value)",
        "sign (sign)",
        "lab (lab, sign)",
        "1: 8x8",
        "2: 2x2",
        "3: 1x1",
        "3",
        "7",
        "29",
    ] {
        assert!(
            texts.iter().any(|t| t == label),
            "`{label}` missing from {texts:?}"
        );
    }
    assert!(!texts.iter().any(|t| t == "0"), "{texts:?}");

    // One file alone is drawn too, with a beta panel only for LAB.
    let png = dir.path().join("one.png");
    for (file, height) in [(lab.as_path(), 1250), (sign.as_path(), 900)] {
        let (ok, _, err) = plot(&[file], &png);
        assert!(ok, "{err}");
        assert_eq!(image::open(&png).unwrap().dimensions(), (1280, height));
    }

    // Models with other layers are drawn by position, with a note.
    let short = dir.path().join("short.json");
    fake_inspection(&short, &[("sign", 8, 0)]);
    let (ok, _, err) = plot(&[&sign, &short], &png);
    assert!(ok, "{err}");
    assert!(
        err.contains("sign and short binarize different layers"),
        "{err}"
    );

    // An inspection beside a file that is not one names that file.
    let broken = dir.path().join("broken.json");
    std::fs::write(&broken, r#"[{"layer": "x", "binarizer": "lab"}]"#).unwrap();
    let (ok, _, err) = plot(&[&sign, &broken], &png);
    assert!(!ok);
    assert!(
        err.contains("broken.json") && err.contains("zoo inspect --json"),
        "{err}"
    );
    // A broken first file is named with both formats it is not.
    let (ok, _, err) = plot(&[&broken, &sign], &png);
    assert!(!ok);
    assert!(
        err.contains("broken.json")
            && err.contains("zoo inspect --json")
            && err.contains("zoo bench --profile"),
        "{err}"
    );
}

//! Training: the optimizer and loss against hand-computed references, runs end to end on small
//! data, checkpoints, an interrupted run resuming to the same weights, and `zoo eval`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "support/fixtures.rs"]
mod fixtures;

use candle_core::{Device, Tensor, Var};
use fixtures::*;
use zoo::train::optim::{Adam, Slot};
use zoo::train::{cross_entropy, RunConfig, RunWeights, Session};

#[test]
fn adam_follows_keras_update_rule_with_l2_decay_and_clip() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let w0 = [0.5f64, -1.0, 1.2, 0.0];
    let var = Var::new(&w0, &dev)?;
    let mut adam = Adam {
        kind: zoo::spec::Optimizer::AdamW,
        weight_decay: 0.1,
        slots: vec![Slot {
            name: "w".into(),
            var: var.clone(),
            clip: Some(1.25),
            l2: 0.01,
            moments: Slot::moments(&var, None)?,
        }],
        t: 0,
    };
    // The reference, written out in f64: loss = sum(c * w) with c = [3, -2, -5, 0.5].
    let c = [3.0f64, -2.0, -5.0, 0.5];
    let (mut w, mut m, mut v) = (w0, [0.0; 4], [0.0; 4]);
    for t in 1..=3 {
        let lr = 0.1 * t as f64;
        let loss = (var.as_tensor() * Tensor::new(&c, &dev)?)?.sum_all()?;
        adam.step(&loss.backward()?, lr)?;
        let alpha = lr * (1.0 - 0.999f64.powi(t)).sqrt() / (1.0 - 0.9f64.powi(t));
        for i in 0..4 {
            let g = c[i] + 2.0 * 0.01 * w[i];
            m[i] = 0.9 * m[i] + 0.1 * g;
            v[i] = 0.999 * v[i] + 0.001 * g * g;
            let decayed = w[i] * (1.0 - lr * 0.1);
            w[i] = (decayed - alpha * m[i] / (v[i].sqrt() + 1e-7)).clamp(-1.25, 1.25);
        }
        let got = var.as_tensor().to_vec1::<f64>()?;
        for i in 0..4 {
            assert!((got[i] - w[i]).abs() < 1e-12, "step {t}: {got:?} vs {w:?}");
        }
    }
    assert_eq!(var.as_tensor().to_vec1::<f64>()?[2], 1.25, "clipped");
    Ok(())
}

#[test]
fn cross_entropy_with_label_smoothing_matches_its_definition() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let logits = [[2.0f64, -1.0, 0.5], [0.1, 0.2, -3.0]];
    let labels = [2u32, 0];
    let eps = 0.1;
    let mut expected = 0.0;
    for (row, &label) in logits.iter().zip(&labels) {
        let lse = row.iter().map(|x| x.exp()).sum::<f64>().ln();
        for (k, x) in row.iter().enumerate() {
            let target = eps / 3.0 + if k == label as usize { 1.0 - eps } else { 0.0 };
            expected -= target * (x - lse);
        }
    }
    expected /= 2.0;
    let got = cross_entropy(
        &Tensor::new(&logits, &dev)?,
        &Tensor::new(&labels, &dev)?,
        eps,
    )?
    .to_scalar::<f64>()?;
    assert!((got - expected).abs() < 1e-12, "{got} vs {expected}");
    Ok(())
}

#[test]
fn a_run_learns_writes_its_files_and_its_weights_evaluate_the_same() {
    let (dir, spec, data) = tiny_setup("run");
    let run = dir.join("run");
    let mut config = RunConfig::new(&spec, &data, &zoo::train::fashion_mnist_recipe()).unwrap();
    config.epochs = 4;
    config.batch_size = 32;
    config.learning_rate = 1e-2;
    config.keep = 2;
    let summary = zoo::train::train(Some(config), &run, &Session::default()).unwrap();

    assert_eq!(summary.steps, 4 * 8);
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let epochs: Vec<zoo::train::EpochMetrics> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(epochs.len(), 4);
    assert!(epochs[3].train_loss < epochs[0].train_loss, "{metrics}");
    let last = epochs[3].val.expect("validated");
    assert_eq!(last.images, 64);
    assert!(
        last.top1 > 25.0,
        "the classes are easy to tell apart: {metrics}"
    );
    assert!(last.top5 >= last.top1);
    assert_eq!(summary.final_val, Some(last));
    // The last two checkpoints are kept, the best weights and the final weights written.
    let checkpoints = zoo::train::checkpoint::list(&run.join("checkpoints"));
    let steps: Vec<u64> = checkpoints.iter().map(|(s, _)| *s).collect();
    assert_eq!(steps, [24, 32]);
    assert!(run.join("best.safetensors").is_file());
    assert!(run.join("summary.json").is_file());
    // The report: finished, every epoch's validation top-1, the curves as an SVG that parses,
    // the configuration and the model summary.
    let report = std::fs::read_to_string(run.join("report.html")).unwrap();
    assert!(report.contains("Finished: 32 steps"), "{report}");
    // Its training time is every epoch's, as `metrics.jsonl` records them.
    let seconds: f64 = epochs.iter().map(|m| m.seconds).sum();
    let took = format!("training steps took {seconds:.0} s");
    assert!(report.contains(&took), "{took} missing: {report}");
    for m in &epochs {
        let top1 = format!("<td>{:.2}%</td>", m.val.unwrap().top1);
        assert!(report.contains(&top1), "{top1} missing");
    }
    let svg = &report[report.find("<svg").unwrap()..report.find("</svg>").unwrap() + 6];
    let doc = roxmltree::Document::parse(svg).unwrap();
    assert!(doc
        .descendants()
        .any(|n| n.text().map(str::trim) == Some("run")));
    assert!(
        report.contains("&quot;batch_size&quot;: 32"),
        "the configuration"
    );
    assert!(report.contains("Binary MACs"), "the model summary");
    let config: RunConfig =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!((config.input.as_str(), config.classes), ("32x32x1", 10));

    // The final weights load with `zoo::build` and give the same accuracy.
    let weights = RunWeights::open(&run).unwrap();
    assert_eq!(weights.path, run.join("model.safetensors"));
    let val = zoo::train::open_dataset(&data, zoo::data::Split::Validation, 32, false).unwrap();
    let model = weights.build(&spec, &val).unwrap();
    let bar = indicatif::ProgressBar::hidden();
    let again = zoo::train::evaluate(&*model, val, 16, 1, &bar, &Device::Cpu).unwrap();
    assert_eq!(again.top1, last.top1);
    assert!((again.loss - last.loss).abs() < 1e-5);
    // And so does `zoo eval` on the run directory.
    let (ok, out, err) = zoo(&["eval", run.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains(&format!("top-1 {:.2}%", last.top1)), "{out}");

    // A finished run refuses to be overwritten; a changed spec refuses to resume.
    let config = RunConfig::new(&spec, &data, &zoo::train::fashion_mnist_recipe()).unwrap();
    let err = zoo::train::train(Some(config), &run, &Session::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains("already holds a run"), "{err}");
    std::fs::write(
        &spec,
        TINY_SPEC.replace("filters: 8, blocks: 2", "filters: 8, blocks: 3"),
    )
    .unwrap();
    let err = zoo::train::train(None, &run, &Session::default())
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("changed since the run started"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_killed_run_resumes_to_the_same_weights() {
    let (dir, spec, data) = tiny_setup("resume");
    let args = |out: &Path| -> Vec<String> {
        [
            "--threads",
            "1",
            "train",
            &spec,
            "--data",
            &data,
            "--batch-size",
            "16",
            "--epochs",
            "3",
            "--lr",
            "0.01",
            "--schedule",
            "cosine",
            "--warmup",
            "0.5",
            "--checkpoint-every",
            "5",
            "--seed",
            "7",
            "--out",
            out.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    };
    // The uninterrupted run.
    let straight = dir.join("straight");
    let status = Command::new(env!("CARGO_BIN_EXE_zoo"))
        .args(args(&straight))
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());

    // The same run, killed once a mid-epoch checkpoint exists (16 steps per epoch).
    let killed = dir.join("killed");
    let mut child = Command::new(env!("CARGO_BIN_EXE_zoo"))
        .args(args(&killed))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let checkpoints = killed.join("checkpoints");
    while !zoo::train::checkpoint::list(&checkpoints)
        .iter()
        .any(|(step, _)| *step >= 20)
    {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it was killed"
        );
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !killed.join("model.safetensors").exists(),
        "killed before the end"
    );
    let newest = zoo::train::checkpoint::list(&checkpoints).pop().unwrap().0;
    assert!(
        !newest.is_multiple_of(16),
        "the newest checkpoint {newest} is mid-epoch"
    );

    let (ok, out, err) = zoo(&[
        "--threads",
        "1",
        "train",
        "--resume",
        killed.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("resuming"), "{out}");
    let difference = max_difference(
        &straight.join("model.safetensors"),
        &killed.join("model.safetensors"),
    );
    assert!(difference < 1e-5, "resumed weights differ by {difference}");
    // Both report the same three epochs.
    let lines = |run: &Path| {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count()
    };
    assert_eq!((lines(&straight), lines(&killed)), (3, 3));

    // Flags that would change a run are refused with --resume.
    let (ok, _, err) = zoo(&["train", "--resume", killed.to_str().unwrap(), "--lr", "1"]);
    assert!(!ok);
    assert!(err.contains("--lr"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_training_input_is_a_clear_error() {
    let (dir, spec, data) = tiny_setup("errors");
    let out = dir.join("out");
    let out = out.to_str().unwrap();
    for (args, expected) in [
        (
            vec![
                "train",
                &spec,
                "--data",
                "/nonexistent/folder",
                "--out",
                out,
            ],
            "expected `fashion-mnist`, `imagenette` or a dataset folder",
        ),
        (
            vec![
                "train", &spec, "--data", &data, "--input", "24x24", "--out", out,
            ],
            "at least that large",
        ),
        (
            vec![
                "train", &spec, "--data", &data, "--input", "32x40", "--out", out,
            ],
            "square image size",
        ),
        (
            vec![
                "train",
                &spec,
                "--data",
                &data,
                "--schedule",
                "cosin",
                "--out",
                out,
            ],
            "expected a schedule",
        ),
        (
            vec![
                "train",
                &spec,
                "--data",
                &data,
                "--weight-decay",
                "0.1",
                "--out",
                out,
            ],
            "adamw",
        ),
        (
            vec![
                "train",
                &spec,
                "--data",
                &data,
                "--batch-size",
                "1000",
                "--out",
                out,
            ],
            "fewer than one batch",
        ),
        (
            vec!["train", "--resume", "/nonexistent/run"],
            "no checkpoint to resume from",
        ),
        (vec!["train"], "name a model or spec file"),
        (
            vec!["eval", "/nonexistent/weights.safetensors", "--spec", &spec],
            "cannot read",
        ),
    ] {
        let (ok, _, err) = zoo(&args);
        assert!(!ok, "{args:?} succeeded");
        assert!(err.contains(expected), "{args:?}: {err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn fashion_mnist_ships_with_the_repository() {
    let train =
        zoo::train::open_dataset("fashion-mnist", zoo::data::Split::Train, 32, false).unwrap();
    let test =
        zoo::train::open_dataset("fashion-mnist", zoo::data::Split::Validation, 32, false).unwrap();
    assert_eq!((train.len(), test.len()), (60_000, 10_000));
    assert_eq!(train.classes()[9], "Ankle boot");
    let mut image = vec![0f32; 32 * 32];
    let label = test.load(0, None, &mut image).unwrap();
    assert_eq!(label, 9, "the first test image is an ankle boot");
    let background = -zoo::data::fashion_mnist::MEAN / zoo::data::fashion_mnist::STD;
    assert_eq!(image[0], background, "the 2-pixel border is background");
}

/// A small float network (no binarizer, float kernels): the teacher of the distillation tests.
const TINY_TEACHER: &str = "
name: tiny-float
input: 32x32x1
classes: 10
binary: {activation: none, kernel: none}
stem: [{conv: {filters: 8, kernel: 3, stride: 2}}, batch_norm, relu]
stages: [{block: quicknet, filters: 8, blocks: 2}]
head: [relu, global_avg_pool, dense]
";

/// `(1 - w) CE_eps(labels, s) + w T² KL(softmax(t/T) ‖ softmax(s/T))` in f64, or with `None`
/// ReActNet's `-Σ softmax(t) log softmax(s)`, averaged over rows.
fn kd_loss_f64(
    student: &[Vec<f64>],
    teacher: &[Vec<f64>],
    labels: &[u32],
    hinton: Option<(f64, f64, f64)>,
) -> f64 {
    let log_softmax = |row: &[f64], t: f64| -> Vec<f64> {
        let scaled: Vec<f64> = row.iter().map(|x| x / t).collect();
        let max = scaled.iter().cloned().fold(f64::MIN, f64::max);
        let lse = max + scaled.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
        scaled.iter().map(|x| x - lse).collect()
    };
    let mut total = 0.0;
    for ((s, t), &label) in student.iter().zip(teacher).zip(labels) {
        total += match hinton {
            Some((temperature, weight, eps)) => {
                let log_s = log_softmax(s, 1.0);
                let k = s.len() as f64;
                let hard =
                    -(1.0 - eps) * log_s[label as usize] - eps / k * log_s.iter().sum::<f64>();
                let (log_st, log_tt) = (log_softmax(s, temperature), log_softmax(t, temperature));
                let kl: f64 = log_tt
                    .iter()
                    .zip(&log_st)
                    .map(|(lt, ls)| lt.exp() * (lt - ls))
                    .sum();
                (1.0 - weight) * hard + weight * temperature * temperature * kl
            }
            None => {
                let (log_s, log_t) = (log_softmax(s, 1.0), log_softmax(t, 1.0));
                -log_t
                    .iter()
                    .zip(&log_s)
                    .map(|(lt, ls)| lt.exp() * ls)
                    .sum::<f64>()
            }
        };
    }
    total / student.len() as f64
}

#[test]
fn distillation_losses_and_gradients_match_an_f64_transcription() -> candle_core::Result<()> {
    use rand::{Rng, SeedableRng};
    use zoo::train::distill::KdLoss;
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let (n, k) = (5, 7);
    let mut draw = |scale: f64| -> Vec<Vec<f64>> {
        (0..n)
            .map(|_| (0..k).map(|_| rng.random_range(-scale..scale)).collect())
            .collect()
    };
    let (student, teacher) = (draw(4.0), draw(6.0));
    let labels: Vec<u32> = (0..n as u32).map(|i| (i * 3) % k as u32).collect();
    let cases = [
        (
            KdLoss::Hinton {
                temperature: 3.0,
                weight: 0.7,
            },
            Some((3.0, 0.7, 0.1)),
            0.1,
        ),
        (
            KdLoss::Hinton {
                temperature: 1.0,
                weight: 1.0,
            },
            Some((1.0, 1.0, 0.0)),
            0.0,
        ),
        (KdLoss::Distributional, None, 0.0),
    ];
    let dev = Device::Cpu;
    let flat = |m: &[Vec<f64>]| -> Vec<f32> { m.iter().flatten().map(|&x| x as f32).collect() };
    for (loss, reference, eps) in cases {
        // The f32 inputs, read back in f64, so both sides see the same numbers.
        let as_f64 = |m: &[Vec<f64>]| -> Vec<Vec<f64>> {
            m.iter()
                .map(|r| r.iter().map(|&x| x as f32 as f64).collect())
                .collect()
        };
        let (s64, t64) = (as_f64(&student), as_f64(&teacher));
        let s = Var::from_tensor(&Tensor::from_vec(flat(&student), (n, k), &dev)?)?;
        let t = Tensor::from_vec(flat(&teacher), (n, k), &dev)?;
        let y = Tensor::new(labels.as_slice(), &dev)?;
        let value = loss.loss(s.as_tensor(), &t, &y, eps)?;
        let grad = value
            .backward()?
            .get(s.as_tensor())
            .unwrap()
            .to_vec2::<f32>()?;
        let value = value.to_scalar::<f32>()? as f64;

        let expected = kd_loss_f64(&s64, &t64, &labels, reference);
        assert!(
            (value - expected).abs() < 1e-5 * expected.abs().max(1.0),
            "{loss:?}: {value} vs {expected}"
        );
        // Central differences of the f64 loss.
        let h = 1e-6;
        for i in 0..n {
            for j in 0..k {
                let mut plus = s64.clone();
                plus[i][j] += h;
                let mut minus = s64.clone();
                minus[i][j] -= h;
                let numeric = (kd_loss_f64(&plus, &t64, &labels, reference)
                    - kd_loss_f64(&minus, &t64, &labels, reference))
                    / (2.0 * h);
                let got = grad[i][j] as f64;
                assert!(
                    (got - numeric).abs() < 1e-5,
                    "{loss:?}: d/ds[{i}][{j}] = {got}, f64 says {numeric}"
                );
            }
        }
    }
    // Parameters outside their ranges are refused, naming the flag.
    let bad = KdLoss::Hinton {
        temperature: 0.0,
        weight: 0.5,
    };
    assert!(bad.check().unwrap_err().contains("--kd-temperature"));
    let bad = KdLoss::Hinton {
        temperature: 2.0,
        weight: 1.5,
    };
    assert!(bad.check().unwrap_err().contains("--kd-weight"));
    Ok(())
}

#[test]
fn a_distilled_run_learns_from_its_teacher_and_resumes_only_with_it() {
    let (dir, spec, data) = tiny_setup("distill");
    let teacher_spec = dir.join("tiny_float.yaml");
    std::fs::write(&teacher_spec, TINY_TEACHER).unwrap();
    let teacher_spec = teacher_spec.display().to_string();
    let train_teacher = |seed: u64, out: &Path| {
        let mut config =
            RunConfig::new(&teacher_spec, &data, &zoo::train::fashion_mnist_recipe()).unwrap();
        (config.epochs, config.batch_size, config.seed) = (2, 32, seed);
        zoo::train::train(Some(config), out, &Session::default()).unwrap();
    };
    let teacher = dir.join("teacher");
    train_teacher(1, &teacher);
    let teacher_bytes = std::fs::read(teacher.join("model.safetensors")).unwrap();

    let student = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "--threads",
            "1",
            "train",
            &spec,
            "--data",
            &data,
            "--batch-size",
            "16",
            "--epochs",
            "2",
            "--lr",
            "0.01",
            "--seed",
            "5",
            "--keep",
            "100",
            "--checkpoint-every",
            "5",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        zoo(&args)
    };
    let kd = [
        "--teacher",
        teacher.to_str().unwrap(),
        "--kd-temperature",
        "2",
        "--kd-weight",
        "0.6",
    ];
    let distilled = dir.join("distilled");
    let (ok, out, err) = student(&distilled, &kd);
    assert!(ok, "{err}");
    assert!(
        out.contains("distilled from") && out.contains("temperature 2"),
        "{out}"
    );
    let config: RunConfig =
        serde_json::from_str(&std::fs::read_to_string(distilled.join("config.json")).unwrap())
            .unwrap();
    let d = config.distill.expect("the run records its teacher");
    assert!(Path::new(&d.teacher).is_absolute(), "{}", d.teacher);
    assert_eq!(d.teacher_sha256.len(), 64);
    // Staged for the hub, the run names its teacher without the local path.
    let staged = dir.join("staged");
    let (ok, _, err) = zoo(&[
        "push",
        distilled.to_str().unwrap(),
        "--repo",
        "org/tiny-lab",
        "--local-dir",
        staged.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let card = std::fs::read_to_string(staged.join("README.md")).unwrap();
    assert!(
        card.contains(
            "Distilled with Hinton's loss, temperature 2, weight 0.6 from the teacher `teacher`"
        ),
        "{card}"
    );
    let repo_config = std::fs::read_to_string(staged.join("config.json")).unwrap();
    assert!(
        repo_config.contains("\"teacher\": \"teacher\""),
        "{repo_config}"
    );

    // The teacher changes the student's training and is itself left untouched.
    let plain = dir.join("plain");
    let (ok, _, err) = student(&plain, &[]);
    assert!(ok, "{err}");
    let difference = max_difference(
        &plain.join("model.safetensors"),
        &distilled.join("model.safetensors"),
    );
    assert!(difference > 1e-3, "the teacher made no difference");
    assert_eq!(
        std::fs::read(teacher.join("model.safetensors")).unwrap(),
        teacher_bytes
    );

    // Resuming from a mid-run checkpoint gives the same weights as the straight run.
    let resumed = dir.join("resumed");
    std::fs::create_dir_all(resumed.join("checkpoints")).unwrap();
    for file in ["config.json", "metrics.jsonl"] {
        std::fs::copy(distilled.join(file), resumed.join(file)).unwrap();
    }
    let mid = zoo::train::checkpoint::path(&distilled.join("checkpoints"), 20);
    std::fs::copy(
        &mid,
        resumed.join("checkpoints").join(mid.file_name().unwrap()),
    )
    .unwrap();
    let (ok, _, err) = zoo(&[
        "--threads",
        "1",
        "train",
        "--resume",
        resumed.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let difference = max_difference(
        &distilled.join("model.safetensors"),
        &resumed.join("model.safetensors"),
    );
    assert!(difference < 1e-5, "resumed weights differ by {difference}");

    // Another teacher in the same place is refused on resume.
    let other = dir.join("other-teacher");
    train_teacher(2, &other);
    std::fs::copy(
        other.join("model.safetensors"),
        teacher.join("model.safetensors"),
    )
    .unwrap();
    std::fs::remove_file(resumed.join("model.safetensors")).unwrap();
    let (ok, _, err) = zoo(&["train", "--resume", resumed.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("the teacher") && err.contains("changed"),
        "{err}"
    );

    // Bad distillation flags are clear errors.
    for (extra, expected) in [
        (vec!["--kd-weight", "0.5"], "--teacher"),
        (
            vec!["--teacher", teacher.to_str().unwrap(), "--kd-weight", "1.5"],
            "--kd-weight",
        ),
        (
            vec![
                "--teacher",
                teacher.to_str().unwrap(),
                "--kd",
                "distributional",
                "--kd-weight",
                "1",
            ],
            "--kd distributional",
        ),
        (
            vec!["--teacher", dir.join("nowhere").to_str().unwrap()],
            "nowhere",
        ),
        (vec!["--teacher", &spec], "not a safetensors file"),
    ] {
        let (ok, _, err) = student(&dir.join("refused"), &extra);
        assert!(!ok, "{extra:?} was accepted");
        assert!(err.contains(expected), "{extra:?}: {err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn inspect_reports_what_each_binarizer_gives() {
    let (dir, _, data) = tiny_setup("inspect");
    let spec = dir.join("tiny_mixed.yaml");
    std::fs::write(
        &spec,
        TINY_SPEC
            .replace("name: tiny-lab", "name: tiny-mixed")
            .replace("activation: lab", "activation: [lab, sign]"),
    )
    .unwrap();
    let spec = spec.display().to_string();
    let run = dir.join("run");
    let mut config = RunConfig::new(&spec, &data, &zoo::train::fashion_mnist_recipe()).unwrap();
    (config.epochs, config.batch_size) = (1, 32);
    zoo::train::train(Some(config), &run, &Session::default()).unwrap();

    // The observed forward pass: LAB and sign give ±1, sign exactly where its input is >= 0.
    let weights = RunWeights::open(&run).unwrap();
    let val = zoo::train::open_dataset(&data, zoo::data::Split::Validation, 32, false).unwrap();
    let network = weights.network(&spec, &val).unwrap();
    let mut pixels = vec![0f32; 64 * 32 * 32];
    for (i, out) in pixels.chunks_mut(32 * 32).enumerate() {
        val.load(i, None, out).unwrap();
    }
    let xs = Tensor::from_vec(pixels, (64, 1, 32, 32), &Device::Cpu).unwrap();
    let mut seen = Vec::new();
    let logits = network
        .forward_observed(&xs, false, &mut |name, binarizer, input, output| {
            let values = output.flatten_all()?.to_vec1::<f32>()?;
            assert!(values.iter().all(|v| v.abs() == 1.0), "{name}");
            if let zoo::layers::Binarizer::Sign(_) = binarizer {
                let signs = input.ge(0f32)?.to_dtype(candle_core::DType::F32)?;
                let expected = ((signs * 2.0)? - 1.0)?.flatten_all()?.to_vec1::<f32>()?;
                assert_eq!(values, expected, "{name}");
            }
            let plus = values.iter().filter(|&&v| v > 0.0).count() as f64 / values.len() as f64;
            seen.push((name.to_string(), plus));
            Ok(())
        })
        .unwrap();
    let plain = weights
        .build(&spec, &val)
        .unwrap()
        .forward(&xs, false)
        .unwrap();
    assert_eq!(
        logits.to_vec2::<f32>().unwrap(),
        plain.to_vec2::<f32>().unwrap()
    );
    let names: Vec<&str> = seen.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["stage1.block1.conv", "stage1.block2.conv"]);

    // `zoo inspect` reports the same shares, both binarizers and LAB's beta.
    let json = dir.join("binarizers.json");
    let (ok, out, err) = zoo(&[
        "inspect",
        run.to_str().unwrap(),
        "--images",
        "64",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("stage1.block2.conv") && out.contains("sign") && out.contains(" 16x16 "),
        "{out}"
    );
    let stats: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for ((name, plus), s) in seen.iter().zip(&stats) {
        assert_eq!(s["layer"], name.as_str());
        assert_eq!(s["channels"], 8);
        assert_eq!(s["map"], serde_json::json!([16, 16]), "{s}");
        assert!((s["plus"].as_f64().unwrap() - plus).abs() < 1e-9, "{s}");
    }
    assert_eq!(stats[0]["binarizer"], "lab");
    assert!(stats[0]["beta"].as_f64().is_some());
    assert_eq!(stats[1]["binarizer"], "sign");
    assert!(stats[1]["beta"].is_null());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `zoo show` draws, for a sign model beside a LAB model, each chosen binarizer's input and
/// binary map on one image; its figures are those of the observed forward pass, and bad
/// choices are clear errors.
#[test]
fn show_draws_what_the_binarizers_see_and_give() {
    let (dir, lab_spec, data) = tiny_setup("show");
    let sign_spec = dir.join("tiny_sign.yaml");
    std::fs::write(
        &sign_spec,
        TINY_SPEC
            .replace("name: tiny-lab", "name: tiny-sign")
            .replace("activation: lab", "activation: {sign: {clip: 1.25}}"),
    )
    .unwrap();
    let runs = [
        (dir.join("sign-run"), sign_spec.display().to_string()),
        (dir.join("lab-run"), lab_spec),
    ];
    for (run, spec) in &runs {
        let mut config = RunConfig::new(spec, &data, &zoo::train::fashion_mnist_recipe()).unwrap();
        (config.epochs, config.batch_size) = (1, 32);
        zoo::train::train(Some(config), run, &Session::default()).unwrap();
    }
    let [sign, lab] = [&runs[0].0, &runs[1].0].map(|p| p.to_str().unwrap().to_string());

    // Two layers of both models on Fashion-MNIST test image 7, as PNG.
    let png = dir.join("maps.png");
    let (ok, out, err) = zoo(&[
        "show",
        &sign,
        &lab,
        "--fmnist",
        "7",
        "--layers",
        "1,stage1.block2.conv",
        "-o",
        png.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("Fashion-MNIST test image 7 ("), "{out}");
    let image = image::open(&png).unwrap();
    assert_eq!(
        (image.width(), image.height()),
        zoo::show::figure_size(2, 4, 2)
    );
    // The shares printed are those of the observed forward pass on the same image.
    for ((run, spec), binarizer) in runs.iter().zip(["sign", "lab"]) {
        let weights = RunWeights::open(run).unwrap();
        let config = weights.config.as_ref().unwrap().model_config().unwrap();
        let network = weights.network_for(spec, &config).unwrap();
        let test = zoo::data::FashionMnist::open(
            &zoo::data::fashion_mnist::embedded_dir(),
            zoo::data::Split::Validation,
            32,
        )
        .unwrap();
        let mut pixels = vec![0f32; 32 * 32];
        zoo::data::Dataset::load(&test, 7, None, &mut pixels).unwrap();
        let image = zoo::show::InputImage {
            shape: [1, 32, 32],
            pixels,
        };
        let maps = zoo::show::activation_maps(&network, &image).unwrap();
        assert_eq!(maps.len(), 2);
        for map in &maps {
            assert_eq!(map.binarizer, binarizer);
            assert_eq!(map.shape, [8, 16, 16]);
            if binarizer == "sign" {
                let signs: Vec<f32> = map
                    .input
                    .iter()
                    .map(|&v| if v >= 0.0 { 1.0 } else { -1.0 })
                    .collect();
                assert_eq!(map.output, signs);
            }
            let name = run.file_name().unwrap().to_str().unwrap();
            let row = format!("{:.2}", 100.0 * map.plus());
            assert!(
                out.lines()
                    .any(|l| l.starts_with(name) && l.contains(&map.layer) && l.contains(&row)),
                "{name} {} {row}:\n{out}",
                map.layer
            );
        }
    }

    // By default the first layer of each size (one here), as SVG; an image file as input.
    let shirt = dir.join("shirt.png");
    image::GrayImage::from_fn(20, 30, |x, y| image::Luma([(x * 10 + y * 3) as u8]))
        .save(&shirt)
        .unwrap();
    let svg = dir.join("maps.svg");
    let (ok, out, err) = zoo(&[
        "show",
        &sign,
        &lab,
        shirt.to_str().unwrap(),
        "--channels",
        "1,6",
        "-o",
        svg.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("shirt.png"), "{out}");
    let text = std::fs::read_to_string(&svg).unwrap();
    let doc = roxmltree::Document::parse(&text).unwrap();
    let texts: Vec<&str> = doc.descendants().filter_map(|n| n.text()).collect();
    for wanted in [
        "sign-run",
        "lab-run",
        "ch 6: ",
        "stage1.block1.conv (lab, 16x16x8)",
    ] {
        assert!(
            texts.iter().any(|t| t.contains(wanted)),
            "{wanted}: {texts:?}"
        );
    }
    assert!(!texts.iter().any(|t| t.contains("stage1.block2.conv")));

    // Bad choices name what is wrong.
    for (args, expected) in [
        (vec!["--fmnist", "10000"], "images 0 to 9999"),
        (
            vec!["--fmnist", "1", "--layers", "nope"],
            "no binarized layer `nope`",
        ),
        (
            vec!["--fmnist", "1", "--channels", "8"],
            "channel 8 does not exist",
        ),
        (vec![], "no input"),
        (
            vec!["--fmnist", "1", shirt.to_str().unwrap()],
            "more than one input",
        ),
    ] {
        let mut all = vec!["show", &sign, &lab, "-o", png.to_str().unwrap()];
        all.extend(args);
        let (ok, _, err) = zoo(&all);
        assert!(!ok && err.contains(expected), "{all:?}: {err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `zoo train --tensorboard` writes event files that TensorBoard's own reader reads back:
/// every step's loss and learning rate, and the per-epoch figures of `metrics.jsonl`.
#[test]
fn tensorboard_reads_the_event_files_of_a_run() {
    let Some(python) = std::env::var_os("ZOO_TENSORBOARD_PYTHON") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must set ZOO_TENSORBOARD_PYTHON to a python with tensorboard"
        );
        println!("skipped: set ZOO_TENSORBOARD_PYTHON to a python with tensorboard");
        return;
    };
    let (dir, spec, data) = tiny_setup("tensorboard");
    let run = dir.join("run");
    let (ok, _, err) = zoo(&[
        "--threads",
        "1",
        "train",
        &spec,
        "--data",
        &data,
        "--batch-size",
        "32",
        "--epochs",
        "2",
        "--tensorboard",
        "--out",
        run.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/support/tensorboard_read.py"
    );
    let out = Command::new(python)
        .arg(script)
        .arg(run.join("tensorboard"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let series: std::collections::HashMap<String, Vec<(u64, f64)>> =
        serde_json::from_slice(&out.stdout).unwrap();
    let loss = &series["step/train_loss"];
    assert_eq!(
        loss.iter().map(|p| p.0).collect::<Vec<_>>(),
        (1..=16).collect::<Vec<_>>()
    );
    assert_eq!(series["step/learning_rate"].len(), 16);
    let metrics: Vec<zoo::train::EpochMetrics> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-5 * b.abs().max(1.0);
    type Field = fn(&zoo::train::EpochMetrics) -> f64;
    let fields: [(&str, Field); 5] = [
        ("epoch/train_loss", |m| m.train_loss),
        ("epoch/train_top1", |m| m.train_top1),
        ("epoch/val_top1", |m| m.val.unwrap().top1),
        ("epoch/val_loss", |m| m.val.unwrap().loss),
        ("epoch/learning_rate", |m| m.learning_rate),
    ];
    for (tag, value) in fields {
        let got = &series[tag];
        assert_eq!(got.len(), metrics.len(), "{tag}");
        for ((step, v), m) in got.iter().zip(&metrics) {
            assert_eq!(*step, m.step, "{tag}");
            assert!(close(*v, value(m)), "{tag}: {v} vs {}", value(m));
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

//! Training never loses a good state: a run whose numbers stop being finite stops naming the
//! step and writes nothing from that state; a checkpoint write that fails (a full disk, here a
//! file-size limit) leaves the previous checkpoint intact and nothing half-written; and
//! `kill -9` at any moment, checkpointing included, leaves a run that resumes to the weights of
//! an uninterrupted one.
#![cfg(unix)]

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

#[path = "support/fixtures.rs"]
mod fixtures;

use candle_core::{Device, Tensor};
use fixtures::*;
use zoo::train::checkpoint;

/// `zoo train` of the tiny spec into `out` with `extra` flags (one compute thread, batch 16,
/// no warm-up).
fn train_args(spec: &str, data: &str, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--threads",
        "1",
        "train",
        spec,
        "--data",
        data,
        "--batch-size",
        "16",
        "--warmup",
        "0",
        "--optimizer",
        "adam",
        "--out",
        out.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn resume_args(run: &Path) -> Vec<String> {
    ["--threads", "1", "train", "--resume", run.to_str().unwrap()]
        .map(String::from)
        .to_vec()
}

fn spawn(args: &[String]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_zoo"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the zoo binary starts")
}

/// SIGKILL, and the child's stderr.
fn kill(mut child: Child) -> String {
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The newest checkpoint's step, 0 when there is none.
fn newest(run: &Path) -> u64 {
    checkpoint::list(&run.join("checkpoints"))
        .pop()
        .map_or(0, |(step, _)| step)
}

/// Files in the run directory or its checkpoints that look temporary: an atomic writer's
/// `.NAME.PID.tmp`, or any other name with `tmp` in it.
fn temporaries(run: &Path) -> Vec<String> {
    [run.to_path_buf(), run.join("checkpoints")]
        .iter()
        .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| zoo::io::is_temporary(n) || n.contains("tmp"))
        .collect()
}

/// Whether every value of every tensor of a safetensors file is finite.
fn all_finite(tensors: impl IntoIterator<Item = Tensor>) -> bool {
    tensors.into_iter().all(|t| {
        t.flatten_all()
            .unwrap()
            .to_dtype(candle_core::DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
            .iter()
            .all(|x| x.is_finite())
    })
}

fn file_finite(path: &Path) -> bool {
    all_finite(
        candle_core::safetensors::load(path, &Device::Cpu)
            .unwrap()
            .into_values(),
    )
}

/// A checkpoint that loads, is at `step` and holds only finite numbers.
fn assert_good_checkpoint(path: &Path, step: u64) -> checkpoint::Checkpoint {
    let ckpt = checkpoint::load(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(ckpt.progress.step, step, "{}", path.display());
    assert!(
        all_finite(ckpt.model.values().cloned()),
        "{}",
        path.display()
    );
    assert!(
        all_finite(
            ckpt.moments
                .values()
                .flat_map(|(m, v)| [m.clone(), v.clone()])
        ),
        "{}",
        path.display()
    );
    ckpt
}

fn snapshot(path: &Path) -> (Vec<u8>, SystemTime) {
    (
        std::fs::read(path).unwrap(),
        std::fs::metadata(path).unwrap().modified().unwrap(),
    )
}

fn summary_steps(run: &Path) -> u64 {
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    summary["steps"].as_u64().unwrap()
}

fn metrics_lines(run: &Path) -> usize {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .count()
}

#[test]
fn non_finite_weights_stop_the_run_naming_the_step_and_keep_the_last_good_checkpoint() {
    let (dir, spec, data) = tiny_setup("nan");
    let run = dir.join("run");
    // A sane rate for the first epoch (16 steps), then the step schedule multiplies it by
    // 1e300: the update of step 17 (computed from a finite loss) makes the weights infinite.
    // A checkpoint follows every step, so the poisoned state would be written at once.
    let args = train_args(
        &spec,
        &data,
        &run,
        &[
            "--epochs",
            "2",
            "--lr",
            "0.01",
            "--schedule",
            "step:1:1e300",
            "--checkpoint-every",
            "1",
            "--keep",
            "2",
            "--seed",
            "5",
        ],
    );
    let (ok, _, err) = zoo(&args);
    assert!(!ok, "the run diverged: {err}");
    let checkpoints = run.join("checkpoints");
    let last = checkpoint::path(&checkpoints, 16);
    for expected in [
        "the weight `".to_string(),
        "became NaN or infinite at step 17: the run stopped".to_string(),
        format!("the last good checkpoint is step 16 ({})", last.display()),
        format!("`zoo train --resume {}`", run.display()),
        "lower --lr".to_string(),
    ] {
        assert!(err.contains(&expected), "`{expected}` missing from: {err}");
    }
    // Nothing was written from step 17 on: the newest checkpoints are 15 and 16, finite and
    // loadable; the best weights (epoch 1) are finite; no final weights, no summary.
    let steps: Vec<u64> = checkpoint::list(&checkpoints)
        .iter()
        .map(|(s, _)| *s)
        .collect();
    assert_eq!(steps, [15, 16]);
    let good = assert_good_checkpoint(&last, 16);
    assert_good_checkpoint(&checkpoint::path(&checkpoints, 15), 15);
    assert!(file_finite(&run.join("best.safetensors")));
    assert!(!run.join("model.safetensors").exists());
    assert!(!run.join("summary.json").exists());
    assert_eq!(temporaries(&run), Vec::<String>::new());
    assert_eq!(metrics_lines(&run), 1, "epoch 1 only");

    // `--resume` continues from step 16 exactly as configured, so it diverges at step 17
    // again and leaves the last good checkpoint as it was (a restart from step 0 would have
    // rewritten it).
    let (last_before, best_before) = (snapshot(&last), snapshot(&run.join("best.safetensors")));
    let (ok, out, err_again) = zoo(&resume_args(&run));
    assert!(!ok);
    assert!(out.contains("resuming"), "{out}");
    assert!(
        err_again.contains("became NaN or infinite at step 17")
            && err_again.contains("the last good checkpoint is step 16"),
        "{err_again}"
    );
    assert!(
        snapshot(&last) == last_before,
        "the last checkpoint changed"
    );
    assert!(snapshot(&run.join("best.safetensors")) == best_before);
    assert_eq!(newest(&run), 16);
    assert!(!run.join("model.safetensors").exists());
    assert_eq!(temporaries(&run), Vec::<String>::new());

    // The last good checkpoint trains on to the end at a sane rate. `zoo train --resume`
    // keeps a run's settings, so the checkpoint is copied into a run whose stored schedule is
    // constant (what a lower rate on resume would do).
    let fork = dir.join("fork");
    let mut config = good.config.clone();
    config.schedule = "constant".into();
    let model: Vec<(String, Tensor)> = good.model.clone().into_iter().collect();
    let moments: Vec<(String, Tensor, Tensor)> = good
        .moments
        .clone()
        .into_iter()
        .map(|(n, (m, v))| (n, m, v))
        .collect();
    std::fs::create_dir_all(fork.join("checkpoints")).unwrap();
    checkpoint::save(
        &fork.join("checkpoints"),
        &config,
        &good.progress,
        &model,
        &moments,
        2,
    )
    .unwrap();
    let (ok, out, err) = zoo(&resume_args(&fork));
    assert!(ok, "{err}");
    assert!(out.contains("resuming"), "{out}");
    assert_eq!(summary_steps(&fork), 32);
    assert!(file_finite(&fork.join("model.safetensors")));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Starts `zoo` with a file-size limit of `limit` bytes: a write past it fails with `EFBIG`
/// ("File too large"), as a full disk fails with `ENOSPC`, instead of killing the process.
fn zoo_with_file_size_limit(args: &[String], limit: u64) -> (bool, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_zoo"));
    command.args(args).stdout(Stdio::null());
    // SAFETY: between fork and exec, only async-signal-safe calls (signal, setrlimit).
    unsafe {
        command.pre_exec(move || {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let limit = libc::rlimit {
                rlim_cur: limit as libc::rlim_t,
                rlim_max: limit as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = command.output().expect("the zoo binary runs");
    (out.status.success(), String::from_utf8(out.stderr).unwrap())
}

#[test]
fn a_checkpoint_that_cannot_be_written_leaves_the_previous_one_and_no_partial_file() {
    let (dir, spec, data) = tiny_setup("full");
    let run = dir.join("run");
    let args = train_args(
        &spec,
        &data,
        &run,
        &[
            "--epochs",
            "3",
            "--lr",
            "0.01",
            "--schedule",
            "cosine",
            "--checkpoint-every",
            "4",
            "--keep",
            "2",
            "--seed",
            "9",
        ],
    );
    // A run stopped once it has a checkpoint at step 8 or later (48 steps in all).
    let child = spawn(&args);
    let started = Instant::now();
    let mut child = Some(child);
    while newest(&run) < 8 {
        let c = child.as_mut().unwrap();
        assert!(
            c.try_wait().unwrap().is_none(),
            "the run ended before it was stopped"
        );
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    kill(child.take().unwrap());
    let (step, last) = checkpoint::list(&run.join("checkpoints")).pop().unwrap();
    assert!(step < 48, "stopped before the end");
    assert_good_checkpoint(&last, step);
    let before = snapshot(&last);

    // Resumed where files may grow to half a checkpoint only: the next checkpoint fails.
    let limit = before.0.len() as u64 / 2;
    let (ok, err) = zoo_with_file_size_limit(&resume_args(&run), limit);
    assert!(!ok, "the run cannot have written its checkpoints: {err}");
    let failed = checkpoint::path(&run.join("checkpoints"), step + 4);
    for expected in [
        format!("cannot write `{}`", failed.display()),
        "File too large".to_string(),
        format!(
            "the last good checkpoint is step {step} ({})",
            last.display()
        ),
        format!("`zoo train --resume {}`", run.display()),
    ] {
        assert!(err.contains(&expected), "`{expected}` missing from: {err}");
    }
    // The previous checkpoint is the newest, untouched and loadable; nothing half-written.
    assert_eq!(newest(&run), step);
    assert!(snapshot(&last) == before, "the previous checkpoint changed");
    assert_good_checkpoint(&last, step);
    assert!(!failed.exists());
    assert_eq!(temporaries(&run), Vec::<String>::new());

    // With room again, the run resumes and finishes.
    let (ok, out, err) = zoo(&resume_args(&run));
    assert!(ok, "{err}");
    assert!(out.contains("resuming"), "{out}");
    assert_eq!(summary_steps(&run), 48);
    assert_eq!(metrics_lines(&run), 3);
    assert!(file_finite(&run.join("model.safetensors")));
    assert_eq!(temporaries(&run), Vec::<String>::new());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// When a kill lands.
#[derive(Clone, Copy, Debug)]
enum When {
    /// As soon as a new run's `config.json` exists, before its first checkpoint if possible.
    Started,
    /// As soon as a temporary file whose name starts so is seen: while it is being written
    /// (or, should the write be missed, 4 steps later).
    Writing(&'static str),
    /// As soon as a new checkpoint appears: while old ones are deleted, or the next step runs.
    Written,
    /// This many milliseconds after a new checkpoint appears.
    After(u64),
}

/// A kill point: `when`, once the newest checkpoint is at step `from` or later.
#[derive(Clone, Copy, Debug)]
struct Kill {
    from: u64,
    when: When,
}

#[test]
fn kill_9_at_any_moment_leaves_a_run_that_resumes_to_the_same_weights() {
    let (dir, spec, data) = tiny_setup("kill");
    // 32 steps, a checkpoint after every one; the first epoch ends at step 16 (validation,
    // metrics, best weights).
    let flags = [
        "--epochs",
        "2",
        "--lr",
        "0.01",
        "--schedule",
        "cosine",
        "--checkpoint-every",
        "1",
        "--keep",
        "2",
        "--seed",
        "3",
    ];
    let straight = dir.join("straight");
    let (ok, _, err) = zoo(&train_args(&spec, &data, &straight, &flags));
    assert!(ok, "{err}");

    let run = dir.join("killed");
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut random = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let points = [
        Kill {
            from: 0,
            when: When::Started,
        },
        Kill {
            from: 2,
            when: When::Writing(".step-"),
        },
        Kill {
            from: 6,
            when: When::Written,
        },
        Kill {
            from: 9,
            when: When::After(random(40)),
        },
        Kill {
            from: 12,
            when: When::Writing(".best."),
        },
        Kill {
            from: 17,
            when: When::Written,
        },
        Kill {
            from: 21,
            when: When::After(random(40)),
        },
        Kill {
            from: 27,
            when: When::Writing(".step-"),
        },
    ];
    let (mut kills, mut mid_write) = (Vec::new(), 0);
    for point in points {
        let resuming = run.join("config.json").exists();
        let args = match resuming {
            true => resume_args(&run),
            false => train_args(&spec, &data, &run, &flags),
        };
        let target = point.from.max(newest(&run) + 1);
        let mut child = spawn(&args);
        let started = Instant::now();
        let mut reached: Option<Instant> = None;
        let finished = loop {
            if child.try_wait().unwrap().is_some() {
                break true;
            }
            let step = newest(&run);
            if step >= target && reached.is_none() {
                reached = Some(Instant::now());
            }
            let now = match point.when {
                When::Started => run.join("config.json").exists(),
                When::Writing(prefix) => {
                    (step >= point.from && temporaries(&run).iter().any(|n| n.starts_with(prefix)))
                        || step >= target + 4
                }
                When::Written => reached.is_some(),
                When::After(ms) => {
                    reached.is_some_and(|t| t.elapsed() >= Duration::from_millis(ms))
                }
            };
            if now {
                break false;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "{point:?}: the run made no progress towards step {target}"
            );
            std::thread::sleep(Duration::from_micros(200));
        };
        if finished {
            // Only a run that completed may end by itself.
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{point:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            break;
        }
        let stderr = kill(child);
        let left = temporaries(&run);
        mid_write += usize::from(!left.is_empty());
        kills.push(format!(
            "{:?} from {} at step {}{}",
            point.when,
            point.from,
            newest(&run),
            match left.is_empty() {
                true => String::new(),
                false => format!(", leaving {left:?}"),
            }
        ));
        // What a resume starts from is whole: the newest checkpoint loads and is finite, or
        // there is none yet and `config.json` holds the run.
        match checkpoint::list(&run.join("checkpoints")).pop() {
            Some((step, path)) => {
                assert_good_checkpoint(&path, step);
            }
            None => {
                let text = std::fs::read_to_string(run.join("config.json")).unwrap();
                serde_json::from_str::<zoo::train::RunConfig>(&text)
                    .unwrap_or_else(|e| panic!("{point:?}: config.json: {e}\n{stderr}"));
            }
        }
        assert!(!run.join("model.safetensors").exists());
    }
    eprintln!(
        "kills: {}; {mid_write} left a temporary file",
        kills.join("; ")
    );
    assert!(
        kills.len() >= 6,
        "the run ended after {} kills",
        kills.len()
    );

    // The last resume finishes, with the weights and epochs of the uninterrupted run and
    // nothing temporary left.
    if !run.join("summary.json").exists() {
        let (ok, out, err) = zoo(&resume_args(&run));
        assert!(ok, "{err}");
        assert!(out.contains("resuming"), "{out}");
    }
    assert_eq!(summary_steps(&run), 32);
    assert_eq!(metrics_lines(&run), 2);
    let difference = max_difference(
        &straight.join("model.safetensors"),
        &run.join("model.safetensors"),
    );
    assert!(difference < 1e-5, "resumed weights differ by {difference}");
    assert_eq!(temporaries(&run), Vec::<String>::new());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// What a kill mid-write can leave, made on purpose at every stage of the write: temporary
/// files of a dead writer, from empty to complete. Resuming removes them (and nothing else)
/// and continues from the newest whole checkpoint.
#[test]
fn resuming_removes_what_a_killed_writer_left_and_nothing_else() {
    let (dir, spec, data) = tiny_setup("debris");
    let run = dir.join("run");
    let args = train_args(
        &spec,
        &data,
        &run,
        &[
            "--epochs",
            "1",
            "--max-steps",
            "12",
            "--lr",
            "0.01",
            "--checkpoint-every",
            "4",
            "--seed",
            "4",
        ],
    );
    let (ok, _, err) = zoo(&args);
    assert!(ok, "{err}");
    let checkpoints = run.join("checkpoints");
    let whole = std::fs::read(checkpoint::path(&checkpoints, 8)).unwrap();
    // A dead writer's process id: a child that has exited and been reaped.
    let dead = {
        let mut c = Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        pid
    };
    // Drop the step-12 checkpoint, as if the run was killed while writing it; leave its
    // temporary file at each stage of the write, and temporary files of the other writes.
    std::fs::remove_file(checkpoint::path(&checkpoints, 12)).unwrap();
    std::fs::remove_file(run.join("model.safetensors")).unwrap();
    std::fs::remove_file(run.join("summary.json")).unwrap();
    let mut debris = Vec::new();
    for (i, cut) in [0, 8, 100, whole.len() / 2, whole.len()]
        .into_iter()
        .enumerate()
    {
        let name = format!(".step-{:09}.safetensors.{dead}.tmp", 12 + i);
        std::fs::write(checkpoints.join(&name), &whole[..cut]).unwrap();
        debris.push(checkpoints.join(name));
    }
    for name in ["model.safetensors", "best.safetensors", "metrics.jsonl"] {
        let path = run.join(format!(".{name}.{dead}.tmp"));
        std::fs::write(&path, b"partial").unwrap();
        debris.push(path);
    }
    // Look-alikes that are not a writer's temporary files stay.
    let keep = [
        run.join("notes.tmp"),
        run.join(".model.safetensors.tmp"),
        checkpoints.join("step-000000012.safetensors.tmp"),
    ];
    for path in &keep {
        std::fs::write(path, b"mine").unwrap();
    }

    let (ok, out, err) = zoo(&resume_args(&run));
    assert!(ok, "{err}");
    assert!(out.contains("resuming"), "{out}");
    for path in &debris {
        assert!(!path.exists(), "{} is left", path.display());
        assert!(err.contains(&path.display().to_string()), "{err}");
    }
    for path in &keep {
        assert_eq!(std::fs::read(path).unwrap(), b"mine");
    }
    assert_eq!(summary_steps(&run), 12);
    assert_good_checkpoint(&checkpoint::path(&checkpoints, 12), 12);
    assert!(file_finite(&run.join("model.safetensors")));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A run killed after writing `config.json` but before its first checkpoint resumes from the
/// start, to the same weights as a run never stopped.
#[test]
fn a_run_without_a_checkpoint_yet_resumes_from_the_start() {
    let (dir, spec, data) = tiny_setup("fresh");
    let flags = [
        "--epochs",
        "1",
        "--max-steps",
        "6",
        "--lr",
        "0.01",
        "--seed",
        "2",
    ];
    let straight = dir.join("straight");
    let (ok, _, err) = zoo(&train_args(&spec, &data, &straight, &flags));
    assert!(ok, "{err}");
    let run = dir.join("run");
    let (ok, _, err) = zoo(&train_args(&spec, &data, &run, &flags));
    assert!(ok, "{err}");
    // What a kill before the first checkpoint leaves: config.json, an empty checkpoints/.
    for entry in std::fs::read_dir(&run).unwrap().flatten() {
        let path = entry.path();
        match entry.file_name().to_str() {
            Some("config.json") => {}
            Some("checkpoints") => {
                std::fs::remove_dir_all(&path).unwrap();
                std::fs::create_dir(&path).unwrap();
            }
            _ if path.is_dir() => std::fs::remove_dir_all(&path).unwrap(),
            _ => std::fs::remove_file(&path).unwrap(),
        }
    }
    let (ok, _, err) = zoo(&resume_args(&run));
    assert!(ok, "{err}");
    assert!(err.contains("starts over from step 0"), "{err}");
    assert_eq!(summary_steps(&run), 6);
    let difference = max_difference(
        &straight.join("model.safetensors"),
        &run.join("model.safetensors"),
    );
    assert!(difference < 1e-5, "the weights differ by {difference}");
    std::fs::remove_dir_all(&dir).unwrap();
}

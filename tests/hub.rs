//! The hub end to end on loopback: `scripts/publish_fmnist.sh` (train, `zoo push --tag`) into
//! the test hub, `zoo::load` / `zoo pull` / `zoo predict` back, the cache shared with Python's
//! `huggingface_hub`, the error paths, and Larq Zoo's release weights converted on first use.

#[path = "support/hub_server.rs"]
#[allow(dead_code)]
mod hub_server;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use hub_server::HubServer;
use zoo::hub::Hub;

const ORG: &str = "testorg";
const REPO: &str = "testorg/quicknet-lab.fmnist";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A `zoo` command with the hub settings of `server` and a cache of its own.
fn zoo_command(server: &HubServer, cache: &Path) -> Command {
    command(env!("CARGO_BIN_EXE_zoo"), server, cache)
}

/// `program` run from the repository with the hub settings of `server`.
fn command(program: &str, server: &HubServer, cache: &Path) -> Command {
    let mut command = Command::new(program);
    command
        .current_dir(repo_root())
        .env("HF_ENDPOINT", server.url())
        .env("HF_HUB_CACHE", cache)
        .env("HF_TOKEN", "test-token")
        .env("ZOO_HUB_ORG", ORG)
        .env_remove("HF_HUB_OFFLINE");
    command
}

fn run(mut command: Command) -> (bool, String, String) {
    let out = command.output().expect("the command runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A hub holding `testorg/quicknet-lab.fmnist`, published by the publishing script from a
/// 2-step run, and that run's directory. Made once per test binary.
struct Published {
    server: HubServer,
    run: PathBuf,
    _dirs: tempfile::TempDir,
}

fn published() -> &'static Published {
    static PUBLISHED: OnceLock<Published> = OnceLock::new();
    PUBLISHED.get_or_init(|| {
        let dirs = tempfile::tempdir().unwrap();
        let server = HubServer::start(&dirs.path().join("hub"));
        let runs = dirs.path().join("runs");
        let mut script = command("bash", &server, &dirs.path().join("script-cache"));
        script
            .arg("scripts/publish_fmnist.sh")
            .env("ZOO", env!("CARGO_BIN_EXE_zoo"))
            .env("MODELS", "quicknet-lab")
            .env("BUDGET", "--max-steps 3 --batch-size 8")
            .env("TRAIN", "--no-eval")
            .env("RUNS", &runs);
        let (ok, out, err) = run(script);
        assert!(ok, "publish script failed:\n{out}\n{err}");
        assert!(
            out.contains(&format!("pushed 5 files to {REPO} in one commit")),
            "{out}"
        );
        Published {
            server,
            run: runs.join("quicknet-lab"),
            _dirs: dirs,
        }
    })
}

fn hub(server: &HubServer, cache: &Path) -> Hub {
    Hub::from_env()
        .endpoint(server.url())
        .cache_dir(cache)
        .organisation(ORG)
        .token("test-token")
        .offline(false)
}

/// Logits of the run's own weights on a fixed batch.
fn run_logits(run: &Path, images: &Tensor) -> Vec<f32> {
    let weights = run.join("model.safetensors");
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &Device::Cpu)
    }
    .unwrap();
    let config = zoo::ModelConfig {
        input: "32x32x1".parse().unwrap(),
        classes: 10,
    };
    let model = zoo::build("quicknet-lab", vb, &config).unwrap();
    logits(&*model, images)
}

fn logits(model: &dyn zoo::Model, images: &Tensor) -> Vec<f32> {
    model
        .forward(images, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn images() -> Tensor {
    Tensor::randn(0f32, 1.0, (2, 1, 32, 32), &Device::Cpu).unwrap()
}

#[test]
fn published_weights_load_by_name_with_the_same_logits_and_cache_layout() {
    let p = published();
    let cache = tempfile::tempdir().unwrap();
    let pretrained = hub(&p.server, cache.path()).load("quicknet-lab").unwrap();
    let config = pretrained.config();
    assert_eq!((config.input.as_str(), config.classes), ("32x32x1", 10));
    assert_eq!(config.class_names.as_ref().unwrap()[9], "Ankle boot");
    assert_eq!(config.dataset, "fashion-mnist");
    assert_eq!(config.recipe.as_ref().unwrap().max_steps, Some(3));

    let x = images();
    assert_eq!(logits(&*pretrained.model, &x), run_logits(&p.run, &x));
    // The packed model from the repo's model.zoo gives the same logits, to float rounding.
    let engine = pretrained.engine(1).unwrap();
    let flat: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    let packed = engine.run(&flat, 2).unwrap();
    let reference = logits(&*pretrained.model, &x);
    let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (a, b) in packed.iter().zip(&reference) {
        assert!((a - b).abs() <= 1e-4 * scale, "{packed:?} vs {reference:?}");
    }

    // Python's cache layout, with the commit the hub reported.
    let repo = cache.path().join("models--testorg--quicknet-lab.fmnist");
    let commit = std::fs::read_to_string(repo.join("refs/main")).unwrap();
    assert_eq!(commit.trim().len(), 40);
    assert_eq!(
        pretrained.repo.dir,
        repo.join("snapshots").join(commit.trim())
    );
    for file in [
        "model.safetensors",
        "spec.yaml",
        "config.json",
        "model.zoo",
        "README.md",
    ] {
        assert!(pretrained.repo.dir.join(file).is_file(), "{file}");
    }
    assert!(std::fs::read_dir(repo.join("blobs")).unwrap().count() >= 5);

    // Offline from that cache, by name and by repo id; offline with an empty cache names
    // what is missing.
    let offline = hub(&p.server, cache.path())
        .offline(true)
        .endpoint("http://127.0.0.1:9"); // nothing listens: any request would fail
    let again = offline.load(REPO).unwrap();
    assert_eq!(logits(&*again.model, &x), reference);
    offline.load("quicknet-lab.fmnist").unwrap();
    let empty = tempfile::tempdir().unwrap();
    let e = hub(&p.server, empty.path())
        .offline(true)
        .load("quicknet-lab")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("offline") && e.contains(REPO) && e.contains("not in the cache"),
        "{e}"
    );
}

#[test]
fn the_model_card_and_config_describe_the_run() {
    let p = published();
    let cache = tempfile::tempdir().unwrap();
    let repo = hub(&p.server, cache.path()).pull(REPO).unwrap();
    let card = std::fs::read_to_string(repo.dir.join("README.md")).unwrap();
    let (front, page) = card
        .strip_prefix("---\n")
        .and_then(|c| c.split_once("\n---\n"))
        .expect("YAML front matter");
    for line in [
        "library_name: zoo",
        "license: apache-2.0",
        "pipeline_tag: image-classification",
        "- lab",
        "- zalando-datasets/fashion_mnist",
    ] {
        assert!(front.lines().any(|l| l == line), "{line} in\n{front}");
    }
    assert!(page.contains(&format!("# {REPO}")), "{page}");
    assert!(page.contains(&format!("zoo::load(\"{REPO}\")")), "{page}");
    assert!(page.contains("--max-steps 3"), "{page}");
    // The run's training time, summed from its `metrics.jsonl` (its third step is timed).
    let time = zoo::train::TrainingTime::of_run(&p.run).expect("a timed step");
    // Through config.json, to serde_json's float parsing (within an ulp or two).
    let read = repo.config.training.expect("the run's training time");
    for (a, b) in [
        (read.seconds, time.seconds),
        (read.images_per_second, time.images_per_second),
    ] {
        assert!((a - b).abs() <= 1e-12 * b, "{read:?} against {time:?}");
    }
    let hours = format!(
        "Its training steps took {:.2} h at {:.0} images/s",
        time.seconds / 3600.0,
        time.images_per_second
    );
    assert!(page.contains(&hours), "{hours} in\n{page}");
    // A run evaluated on the test set carries its metrics into model-index form.
    let mut config = repo.config.clone();
    config.metrics = Some(zoo::hub::Metrics {
        top1: 91.25,
        top5: 99.5,
        split: "test".into(),
        images: Some(10_000),
        measured_by: None,
    });
    let card = zoo::hub::publish::model_card("org/m.fmnist", &config, Some(&repo.spec));
    for line in [
        "model-index:",
        "- name: org/m.fmnist",
        "      type: zalando-datasets/fashion_mnist",
        "      split: test",
        "      value: 91.25",
        "      value: 99.5",
    ] {
        assert!(card.lines().any(|l| l == line), "{line} in\n{card}");
    }
    assert!(
        card.contains("| fashion-mnist | test | 91.25% | 99.50% |"),
        "{card}"
    );
    // The cost at the repo's input, and the distillation of a distilled run.
    assert!(card.contains("## Cost") && card.contains("MiB |"), "{card}");
    let recipe = config.recipe.as_mut().expect("a run's recipe");
    recipe.distill = Some(zoo::train::distill::Distillation {
        teacher: "quicknet-float-e16-s0".into(),
        teacher_sha256: "ab".repeat(32),
        loss: zoo::train::distill::KdLoss::Distributional,
    });
    let card = zoo::hub::publish::model_card("org/m.fmnist", &config, Some(&repo.spec));
    assert!(
        card.contains(
            "Distilled with the distributional loss from the teacher `quicknet-float-e16-s0`"
        ),
        "{card}"
    );
}

#[test]
fn cli_pull_predict_bench_and_export_take_hub_names() {
    let p = published();
    let cache = tempfile::tempdir().unwrap();
    let mut pull = zoo_command(&p.server, cache.path());
    pull.args(["pull", "quicknet-lab"]);
    let (ok, out, err) = run(pull);
    assert!(ok, "{err}");
    let last = out.lines().last().unwrap();
    assert!(
        Path::new(last).join("model.safetensors").is_file() && last.contains("snapshots"),
        "{out}"
    );

    let image = cache.path().join("shoe.png");
    image::GrayImage::from_fn(28, 28, |x, y| image::Luma([((x * 7 + y * 3) % 256) as u8]))
        .save(&image)
        .unwrap();
    let mut predict = zoo_command(&p.server, cache.path());
    predict.args(["predict", "quicknet-lab.fmnist"]).arg(&image);
    let (ok, out, err) = run(predict);
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 5, "{out}");
    assert!(out.contains("Ankle boot") || out.contains("Sneaker") || out.contains("Bag"));

    let mut bench = zoo_command(&p.server, cache.path());
    bench.args([
        "bench",
        REPO,
        "--runs",
        "2",
        "--batch",
        "2",
        "--threads",
        "1",
    ]);
    let (ok, out, err) = run(bench);
    assert!(ok && out.contains("quicknet-lab at 32x32x1"), "{out}{err}");

    let packed = cache.path().join("m.zoo");
    let mut export = zoo_command(&p.server, cache.path());
    export
        .args(["export", "quicknet-lab"])
        .arg("-o")
        .arg(&packed);
    let (ok, out, err) = run(export);
    assert!(ok, "{err}");
    assert!(
        out.contains("exported `quicknet-lab` at 32x32x1 with 10 classes"),
        "{out}"
    );
    let model = zoo::engine::ZooModel::load(&packed).unwrap();
    assert_eq!(model.labels.unwrap()[0], "T-shirt/top");
}

#[test]
fn push_local_dir_writes_exactly_the_upload_and_refuses_a_full_dir() {
    let p = published();
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("repo");
    let mut push = zoo_command(&p.server, dir.path());
    push.arg("push")
        .arg(&p.run)
        .args(["--tag", "fmnist", "--local-dir"])
        .arg(&out_dir)
        .env("HF_ENDPOINT", "http://127.0.0.1:9"); // nothing listens: an upload would fail
    let (ok, out, err) = run(push);
    assert!(ok, "{err}");
    let mut names: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "README.md",
            "config.json",
            "model.safetensors",
            "model.zoo",
            "spec.yaml"
        ]
    );
    assert!(out.contains("nothing uploaded"), "{out}");
    // The staged directory is itself a loadable repo.
    let local = hub(&p.server, dir.path())
        .load(out_dir.to_str().unwrap())
        .unwrap();
    let x = images();
    assert_eq!(logits(&*local.model, &x), run_logits(&p.run, &x));

    // A `.zoo` file alone: the packed model runs, the candle model is refused by name.
    let packed = dir.path().join("m.zoo");
    let mut export = zoo_command(&p.server, dir.path());
    export.arg("export").arg(&p.run).arg("-o").arg(&packed);
    assert!(run(export).0);
    let packed_dir = dir.path().join("packed-repo");
    let mut push = zoo_command(&p.server, dir.path());
    push.arg("push")
        .arg(&packed)
        .args(["--repo", "me/packed", "--local-dir"])
        .arg(&packed_dir);
    let (ok, _, err) = run(push);
    assert!(ok, "{err}");
    let h = hub(&p.server, dir.path());
    let e = h
        .load(packed_dir.to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.safetensors"), "{e}");
    let model = h.load_packed(packed_dir.to_str().unwrap()).unwrap();
    assert_eq!(model.labels.unwrap()[1], "Trouser");
    assert!(!packed_dir.join("model.safetensors").exists());

    let mut again = zoo_command(&p.server, dir.path());
    again
        .arg("push")
        .arg(&p.run)
        .args(["--tag", "fmnist", "--local-dir"])
        .arg(&out_dir);
    let (ok, _, err) = run(again);
    assert!(!ok && err.contains("new or empty directory"), "{err}");
}

#[test]
fn push_as_a_pull_request_and_to_a_missing_branch() {
    let p = published();
    let dir = tempfile::tempdir().unwrap();
    let mut push = zoo_command(&p.server, dir.path());
    push.arg("push").arg(&p.run).args([
        "--repo",
        "testorg/pr-target",
        "--create-pr",
        "--message",
        "try",
    ]);
    let (ok, out, err) = run(push);
    assert!(ok, "{err}");
    assert!(
        out.contains("opened a pull request on testorg/pr-target"),
        "{out}"
    );
    let mut push = zoo_command(&p.server, dir.path());
    push.arg("push")
        .arg(&p.run)
        .args(["--repo", "testorg/pr-target", "--revision", "dev"]);
    let (ok, _, err) = run(push);
    assert!(!ok && err.contains("has no branch `dev`"), "{err}");
}

#[test]
fn unknown_names_missing_repos_and_tokens_are_clear_errors() {
    let p = published();
    let cache = tempfile::tempdir().unwrap();
    let h = hub(&p.server, cache.path());
    let e = h.load("resnet50").unwrap_err().to_string();
    assert!(e.contains("resnet50") && e.contains("reactnet-lab"), "{e}");
    let e = h.load("reactnet-lab.in1k").unwrap_err().to_string();
    assert!(e.contains("reactnet-lab.fmnist"), "{e}");
    // A known name whose repo was never published: 404, listing the pretrained names.
    let e = h.load("reactnet-lab").unwrap_err().to_string();
    assert!(
        e.contains("no repo `testorg/reactnet-lab.fmnist`") && e.contains("quicknet.larq_in1k"),
        "{e}"
    );
    let e = h.load("bad id/x").unwrap_err().to_string();
    assert!(e.contains("org/name"), "{e}");
}

#[test]
fn a_hub_asking_for_a_token_says_how_to_set_one() {
    let dir = tempfile::tempdir().unwrap();
    let server = HubServer::start(&dir.path().join("hub"));
    server.add_file("org/private", "config.json", b"{}");
    server.faults().require_token(Some("secret"));
    let e = Hub::from_env()
        .endpoint(server.url())
        .cache_dir(dir.path().join("cache"))
        .token("wrong")
        .offline(false)
        .pull("org/private")
        .unwrap_err()
        .to_string();
    assert!(e.contains("401") && e.contains("HF_TOKEN"), "{e}");
    assert!(!e.contains("wrong"), "the token leaked: {e}");
}

/// Copies the published repo into a fresh hub whose faults this test may set.
fn fresh_copy(dir: &Path) -> HubServer {
    let p = published();
    let source = hub(&p.server, &dir.join("source-cache"))
        .pull(REPO)
        .unwrap();
    let server = HubServer::start(&dir.join("hub"));
    for file in [
        "model.safetensors",
        "spec.yaml",
        "config.json",
        "model.zoo",
        "README.md",
    ] {
        server.add_file(REPO, file, &std::fs::read(source.dir.join(file)).unwrap());
    }
    server
}

#[test]
fn server_errors_are_retried() {
    let dir = tempfile::tempdir().unwrap();
    let server = fresh_copy(dir.path());
    server.faults().fail_next(2, 503);
    let h = hub(&server, &dir.path().join("cache"));
    h.load(REPO).unwrap();
    let requests = server.requests();
    assert!(requests.len() >= 3, "{requests:?}");
}

#[test]
fn truncated_and_corrupt_downloads_leave_nothing_loadable() {
    let dir = tempfile::tempdir().unwrap();
    let server = fresh_copy(dir.path());
    let cache = dir.path().join("cache");
    let h = hub(&server, &cache);

    server.faults().truncate(Some("model.safetensors"));
    let e = h.load(REPO).unwrap_err().to_string();
    assert!(e.contains(REPO), "{e}");
    let offline = h.clone().offline(true).load(REPO);
    assert!(offline.is_err(), "a truncated download loads");
    server.faults().truncate(None);

    server.faults().corrupt(Some("model.safetensors"));
    let e = h.load(REPO).unwrap_err().to_string();
    assert!(e.contains("SHA-256") && e.contains("removed"), "{e}");
    let offline = h.clone().offline(true).load(REPO);
    assert!(offline.is_err(), "a corrupt download loads");
    server.faults().corrupt(None);

    // A regular (non-LFS) file is checked against its git blob id.
    let fresh = hub(&server, &dir.path().join("fresh-cache"));
    server.faults().corrupt(Some("config.json"));
    let e = fresh.load(REPO).unwrap_err().to_string();
    assert!(
        e.contains("git blob id") && e.contains("config.json"),
        "{e}"
    );
    assert!(fresh.clone().offline(true).load(REPO).is_err());
    server.faults().corrupt(None);
    fresh.load(REPO).unwrap();

    // Once the server behaves, the same cache completes and loads.
    h.load(REPO).unwrap();
}

/// Serves `body` at `/<path>` on loopback for one or more GETs, until dropped.
struct FileServer {
    url: String,
    _thread: std::thread::JoinHandle<()>,
}

fn serve_file(path: &'static str, body: Vec<u8>) -> FileServer {
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let url = format!("http://{}", server.server_addr().to_ip().unwrap());
    let thread = std::thread::spawn(move || {
        for request in server.incoming_requests() {
            let response = if request.url() == format!("/{path}") {
                tiny_http::Response::from_data(body.clone())
            } else {
                tiny_http::Response::from_data(Vec::new()).with_status_code(404)
            };
            let _ = request.respond(response);
        }
    });
    FileServer {
        url,
        _thread: thread,
    }
}

#[test]
fn larq_release_weights_download_convert_and_load_once() {
    let fixtures = repo_root().join("tests/fixtures/larq");
    let h5 = std::fs::read(fixtures.join("larq-zoo-quicknet.h5")).unwrap();
    let sha256 = {
        use sha2::Digest;
        sha2::Sha256::digest(&h5)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let server = serve_file("quicknet-v1.0/quicknet_weights.h5", h5);
    let spec = fixtures.join("larq-zoo-quicknet.yaml");
    let variant = zoo::hub::Variant {
        model: Box::leak(spec.display().to_string().into_boxed_str()),
        tag: "larq_in1k",
        default: true,
        source: zoo::hub::Source::LarqRelease {
            path: "quicknet-v1.0/quicknet_weights.h5",
            sha256: Box::leak(sha256.into_boxed_str()),
        },
        dataset: "imagenet-1k",
        input: "32x32x3",
        classes: 1000,
        accuracy: Some((63.3, 84.6)),
        measured: "test",
    };
    let cache = tempfile::tempdir().unwrap();
    let h = Hub::from_env()
        .cache_dir(cache.path())
        .larq_base_url(&server.url)
        .offline(false);
    let repo = h.pull_variant(&variant).unwrap();
    assert_eq!(repo.config.metrics.as_ref().unwrap().top1, 63.3);
    let names = repo.config.class_names.as_ref().unwrap();
    assert_eq!(
        (names.len(), names[386].as_str()),
        (1000, "African elephant")
    );
    assert!(repo
        .config
        .source
        .as_ref()
        .unwrap()
        .starts_with(&server.url));
    let model = repo.build(&Device::Cpu).unwrap();
    let input = Tensor::read_npy(fixtures.join("larq-zoo-quicknet.input.npy")).unwrap();
    let reference: Vec<f32> = Tensor::read_npy(fixtures.join("larq-zoo-quicknet.logits.npy"))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let got = logits(&*model, &input);
    let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (a, b) in got.iter().zip(&reference) {
        assert!((a - b).abs() <= 1e-4 * scale, "{a} vs {b}");
    }
    // Converted once: offline, with the server gone, it loads from the cache.
    drop(server);
    let again = h.clone().offline(true).pull_variant(&variant).unwrap();
    assert_eq!(again.dir, repo.dir);
}

#[test]
fn a_larq_release_that_does_not_match_its_checksum_is_deleted() {
    let server = serve_file(
        "quicknet-v1.0/quicknet_weights.h5",
        b"not the weights".to_vec(),
    );
    let cache = tempfile::tempdir().unwrap();
    let h = Hub::from_env()
        .cache_dir(cache.path())
        .larq_base_url(&server.url)
        .offline(false);
    let e = h.load("quicknet").unwrap_err().to_string();
    assert!(
        e.contains("SHA-256 mismatch") && e.contains("deleted"),
        "{e}"
    );
    let home = cache.path().join("zoo/larq_in1k/quicknet");
    let left: Vec<_> = std::fs::read_dir(&home).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
    let e = h
        .offline(true)
        .load("quicknet.larq_in1k")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("offline") && e.contains("zoo pull quicknet.larq_in1k"),
        "{e}"
    );
}

/// Python's `huggingface_hub` downloads what `zoo push` uploaded, and `zoo::load` works
/// offline from the cache Python filled.
#[test]
fn python_client_reads_what_zoo_pushed_and_zoo_reads_pythons_cache() {
    let Some(python) = std::env::var_os("ZOO_HUB_PYTHON") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must set ZOO_HUB_PYTHON to a python with huggingface_hub"
        );
        println!("skipped: set ZOO_HUB_PYTHON to a python with huggingface_hub");
        return;
    };
    let p = published();
    let cache = tempfile::tempdir().unwrap();
    let script = "import json, sys\n\
                  from huggingface_hub import snapshot_download\n\
                  path = snapshot_download(sys.argv[1], cache_dir=sys.argv[2])\n\
                  print(path)";
    let out = Command::new(python)
        .args(["-c", script, REPO])
        .arg(cache.path())
        .env("HF_ENDPOINT", p.server.url())
        .env("HF_TOKEN", "test-token")
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let snapshot = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    let ours = hub(&p.server, &cache.path().join("zoo-client"))
        .pull(REPO)
        .unwrap();
    for file in [
        "model.safetensors",
        "model.zoo",
        "config.json",
        "spec.yaml",
        "README.md",
    ] {
        assert!(
            std::fs::read(snapshot.join(file)).unwrap()
                == std::fs::read(ours.dir.join(file)).unwrap(),
            "{file} differs between the clients"
        );
    }
    let loaded = hub(&p.server, cache.path())
        .offline(true)
        .load("quicknet-lab")
        .unwrap();
    let x = images();
    assert_eq!(logits(&*loaded.model, &x), run_logits(&p.run, &x));
}

#[test]
fn the_readme_lists_every_pretrained_variant() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    for v in zoo::hub::PRETRAINED {
        let row = format!(
            "| `{}` | {} |",
            v.name(),
            if v.default { "yes" } else { "no" }
        );
        assert!(readme.contains(&row), "README lacks {row}");
        assert!(readme.contains(&format!("| {} | {} |", v.input, v.classes)));
    }
}

/// A run evaluated on the test set carries its final accuracy into `config.json` and the card.
#[test]
fn staging_a_run_takes_its_final_metrics() {
    let p = published();
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    std::fs::create_dir(&run_dir).unwrap();
    std::fs::copy(
        p.run.join("model.safetensors"),
        run_dir.join("model.safetensors"),
    )
    .unwrap();
    let mut summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p.run.join("summary.json")).unwrap())
            .unwrap();
    summary["final_val"] = serde_json::json!({
        "top1": 84.5, "top5": 99.25, "loss": 0.45, "images": 10000, "skipped": 0
    });
    std::fs::write(run_dir.join("summary.json"), summary.to_string()).unwrap();
    let staged = dir.path().join("staged");
    zoo::hub::stage(&run_dir, None, Some("org/m"), &staged).unwrap();
    let repo = zoo::hub::RepoDir::open(&staged).unwrap();
    let m = repo.config.metrics.unwrap();
    assert_eq!((m.top1, m.top5, m.split.as_str()), (84.5, 99.25, "test"));
    let card = std::fs::read_to_string(staged.join("README.md")).unwrap();
    assert!(card.contains("      value: 84.5\n"), "{card}");
}

//! Publishing: a run, a weights file or a `.zoo` model staged as a repo directory with its
//! model card ([`stage`]), and uploaded to the hub in one commit ([`push`]).

use std::path::{Path, PathBuf};

use hf_hub::{HFError, RepoTypeModel};

use super::repo::{self, Metrics, Preprocessing, RepoConfig};
use super::Hub;
use crate::engine::ZooModel;
use crate::train::{RunConfig, RunSummary, RunWeights, TrainingTime};
use crate::Error;

/// `zoo push` options.
#[derive(Clone, Debug, Default)]
pub struct PushOptions {
    /// Create the repo as private (when it does not exist yet).
    pub private: bool,
    /// The branch to commit to (default `main`).
    pub revision: Option<String>,
    /// The commit message (default: `Upload <name> with zoo <version>`).
    pub message: Option<String>,
    /// Open a pull request instead of committing to the branch.
    pub create_pr: bool,
}

/// What [`push`] made.
#[derive(Clone, Debug)]
pub struct Pushed {
    /// The commit's URL.
    pub commit_url: String,
    /// The commit id.
    pub commit: Option<String>,
    /// The pull request's URL, with `create_pr`.
    pub pull_request_url: Option<String>,
}

/// Writes the repo files of `source` into `dest` (created if missing) and returns their
/// paths:
/// - a run directory: `model.safetensors`, `spec.yaml`, `config.json` (recipe and final
///   metrics from the run), `model.zoo` and `README.md`;
/// - a safetensors weights file: the same, its architecture from its run metadata or `spec`;
/// - a `.zoo` file: `model.zoo`, `spec.yaml`, `config.json` and `README.md`.
///
/// `name` titles the model card (default: the architecture's name).
pub fn stage(
    source: &Path,
    spec: Option<&str>,
    name: Option<&str>,
    dest: &Path,
) -> Result<Vec<PathBuf>, Error> {
    std::fs::create_dir_all(dest).map_err(|e| Error::Write {
        path: dest.display().to_string(),
        message: e.to_string(),
    })?;
    let (config, spec_text) = if source.extension().is_some_and(|e| e == "zoo") {
        let model = ZooModel::load(source)?;
        let config = packed_config(&model);
        model.save(&dest.join(repo::PACKED))?;
        (config, model.spec_text)
    } else {
        stage_weights(source, spec, dest)?
    };
    let title = name.unwrap_or(&config.architecture).to_string();
    write_repo_files(dest, &config, &spec_text, &title)?;
    let mut files: Vec<PathBuf> = [repo::WEIGHTS, repo::SPEC, repo::CONFIG, repo::PACKED]
        .iter()
        .map(|f| dest.join(f))
        .filter(|p| p.is_file())
        .collect();
    files.push(dest.join(repo::CARD));
    Ok(files)
}

/// Writes `config.json`, `spec.yaml` and the model card `README.md` into `dir`.
pub(super) fn write_repo_files(
    dir: &Path,
    config: &RepoConfig,
    spec_text: &str,
    title: &str,
) -> Result<(), Error> {
    let json = serde_json::to_string_pretty(config).expect("a repo configuration serialises");
    crate::io::write_bytes_atomically(&dir.join(repo::CONFIG), json.as_bytes())?;
    crate::io::write_bytes_atomically(&dir.join(repo::SPEC), spec_text.as_bytes())?;
    crate::io::write_bytes_atomically(
        &dir.join(repo::CARD),
        model_card(
            title,
            config,
            Some(&zoo_spec::parse_str(spec_text, repo::SPEC)?),
        )
        .as_bytes(),
    )
}

/// Stages a run directory or weights file: weights, packed model; returns the configuration
/// and the spec's text.
fn stage_weights(
    source: &Path,
    spec: Option<&str>,
    dest: &Path,
) -> Result<(RepoConfig, String), Error> {
    let mut run = RunWeights::open(source)?;
    // A teacher's local path says nothing to the hub's readers: keep its last component.
    if let Some(d) = run.config.as_mut().and_then(|c| c.distill.as_mut()) {
        if let Some(name) = Path::new(&d.teacher)
            .file_name()
            .filter(|_| Path::new(&d.teacher).is_absolute())
        {
            d.teacher = name.to_string_lossy().into_owned();
        }
    }
    let model = match (spec, &run.config) {
        (Some(s), _) => s.to_string(),
        (None, Some(c)) => c.model.clone(),
        (None, None) => {
            return Err(Error::Run {
                path: source.display().to_string(),
                message: "a plain weights file: name its architecture with --spec".into(),
            })
        }
    };
    let parsed = crate::spec(&model)?;
    let spec_text = crate::spec_text(&model)?;
    if let Some(c) = run.config.as_ref().filter(|_| spec.is_none()) {
        if crate::train::spec_sha256(&model)? != c.spec_sha256 {
            return Err(Error::Run {
                path: source.display().to_string(),
                message: format!(
                    "the spec `{model}` changed since this run trained; name the spec it \
                     trained with using --spec"
                ),
            });
        }
    }
    let model_config = match &run.config {
        Some(c) => c.model_config()?,
        None => parsed.default_config(),
    };
    let summary = source
        .is_dir()
        .then(|| std::fs::read_to_string(source.join("summary.json")).ok())
        .flatten()
        .and_then(|s| serde_json::from_str::<RunSummary>(&s).ok())
        // The summary's metrics are of the final weights, not of `best.safetensors`.
        .filter(|s| Path::new(&s.weights).file_name() == run.path.file_name());
    let config = RepoConfig {
        architecture: parsed.name.clone(),
        input: model_config.input.to_string(),
        classes: model_config.classes,
        class_names: run.config.as_ref().and_then(class_names),
        preprocessing: match &run.config {
            Some(c) => Preprocessing::of_dataset(&c.data),
            None => default_preprocessing(model_config.input.channels),
        },
        dataset: run
            .config
            .as_ref()
            .map_or("unknown".to_string(), |c| dataset_name(&c.data)),
        recipe: run.config.clone(),
        metrics: summary.and_then(|s| s.final_val).map(|a| Metrics {
            top1: a.top1,
            top5: a.top5,
            split: split_of(run.config.as_ref()).into(),
            images: Some(a.images),
            measured_by: None,
        }),
        training: TrainingTime::of_run(source),
        source: None,
        zoo_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let mut tensors: Vec<(String, candle_core::Tensor)> = run.tensors.into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let packed_tensors = tensors.iter().cloned().collect();
    let metadata = run.config.as_ref().map(|c| {
        [(
            "zoo.config".to_string(),
            serde_json::to_string(c).expect("a run configuration serialises"),
        )]
        .into()
    });
    crate::io::save_safetensors(&tensors, metadata, &dest.join(repo::WEIGHTS))?;
    let mut packed = crate::engine::export(&spec_text, &parsed, &model_config, &packed_tensors)?;
    packed.labels = config.class_names.clone();
    packed.save(&dest.join(repo::PACKED))?;
    Ok((config, spec_text))
}

fn packed_config(model: &ZooModel) -> RepoConfig {
    RepoConfig {
        architecture: model.spec.name.clone(),
        input: model.config.input.to_string(),
        classes: model.config.classes,
        class_names: model.labels.clone(),
        preprocessing: default_preprocessing(model.config.input.channels),
        dataset: "unknown".into(),
        recipe: None,
        metrics: None,
        training: None,
        source: None,
        zoo_version: env!("CARGO_PKG_VERSION").to_string(),
    }
}

/// Fashion-MNIST's for one channel, ImageNet's otherwise.
fn default_preprocessing(channels: usize) -> Preprocessing {
    Preprocessing::of_dataset(if channels == 1 {
        crate::train::FASHION_MNIST
    } else {
        "imagenet"
    })
}

fn class_names(run: &RunConfig) -> Option<Vec<String>> {
    if crate::train::is_fashion_mnist(&run.data) {
        return Some(
            crate::data::fashion_mnist::CLASSES
                .iter()
                .map(|c| c.to_string())
                .collect(),
        );
    }
    let side = run.model_config().ok()?.input.height;
    let data = crate::train::open_dataset(&run.data, crate::data::Split::Validation, side, false);
    data.ok().map(|d| d.classes().to_vec())
}

fn dataset_name(data: &str) -> String {
    if crate::train::is_fashion_mnist(data) {
        return crate::train::FASHION_MNIST.to_string();
    }
    Path::new(data)
        .file_name()
        .map_or(data.to_string(), |n| n.to_string_lossy().into_owned())
}

fn split_of(run: Option<&RunConfig>) -> &'static str {
    match run {
        Some(c) if crate::train::is_fashion_mnist(&c.data) => "test",
        _ => "validation",
    }
}

/// The hub's id of a dataset, for the card's metadata.
fn hub_dataset(dataset: &str) -> Option<&'static str> {
    match dataset {
        "fashion-mnist" => Some("zalando-datasets/fashion_mnist"),
        "imagenet-1k" => Some("ILSVRC/imagenet-1k"),
        d if d.starts_with("imagenette") => Some("frgfm/imagenette"),
        _ => None,
    }
}

/// The model card: YAML metadata (library, tags, pipeline, dataset, licence, metrics in
/// model-index form) and a page with the results table and how to use the model.
pub fn model_card(title: &str, config: &RepoConfig, spec: Option<&crate::Spec>) -> String {
    let mut card = card_metadata(title, config);
    card += &format!(
        "# {title}\n\nA binary neural network (`{}`) of the [zoo](https://github.com/zoo-bnn/zoo), \
         for {} images of {} ({} classes).\n\n",
        config.architecture, config.input, config.dataset, config.classes
    );
    card += &card_results(config);
    card += &card_use(title, config);
    card += &card_training(config);
    card += &card_cost(config, spec);
    if let Some(source) = &config.source {
        card += &format!("## Source\n\nConverted from {source}.\n\n");
    }
    card += "## Files\n\n- `model.safetensors`: latent weights (zoo tensor names)\n\
             - `spec.yaml`: the architecture\n- `config.json`: input, classes, normalisation, \
             recipe, metrics\n- `model.zoo`: packed model for the zoo's inference engine\n";
    card
}

/// The card's YAML front matter: library, licence, tags, dataset and the metrics in the
/// hub's model-index form.
fn card_metadata(title: &str, config: &RepoConfig) -> String {
    let uses_lab = config
        .recipe
        .as_ref()
        .map_or(title.contains("lab"), |r| r.model.contains("lab"))
        || config.architecture.contains("lab");
    let mut yaml = String::from("---\nlibrary_name: zoo\nlicense: apache-2.0\n");
    yaml += "pipeline_tag: image-classification\ntags:\n- zoo\n- binary-neural-network\n";
    yaml += "- image-classification\n";
    if uses_lab {
        yaml += "- lab\n";
    }
    yaml += &format!("- {}\n", yaml_string(&config.architecture));
    if let Some(id) = hub_dataset(&config.dataset) {
        yaml += &format!("datasets:\n- {id}\n");
    }
    if let Some(m) = &config.metrics {
        yaml += "metrics:\n- accuracy\nmodel-index:\n";
        yaml += &format!("- name: {}\n  results:\n", yaml_string(title));
        yaml += "  - task:\n      type: image-classification\n      name: Image Classification\n";
        yaml += &format!(
            "    dataset:\n      name: {}\n      type: {}\n      split: {}\n",
            yaml_string(&config.dataset),
            yaml_string(hub_dataset(&config.dataset).unwrap_or(&config.dataset)),
            m.split
        );
        yaml += &format!(
            "    metrics:\n    - type: accuracy\n      name: Top-1 accuracy\n      value: {}\n",
            m.top1
        );
        yaml += &format!(
            "    - type: top_5_accuracy\n      name: Top-5 accuracy\n      value: {}\n",
            m.top5
        );
    }
    yaml + "---\n\n"
}

/// The results table: top-1 and top-5 on the recorded split, or "not measured".
fn card_results(config: &RepoConfig) -> String {
    let row = match &config.metrics {
        Some(m) => format!(
            "| {} | {} | {:.2}% | {:.2}% | {} |",
            config.dataset,
            m.split,
            m.top1,
            m.top5,
            m.measured_by.as_deref().unwrap_or("`zoo train`")
        ),
        None => format!("| {} | - | not measured | - | - |", config.dataset),
    };
    format!(
        "## Results\n\n| dataset | split | top-1 | top-5 | measured by |\n|---|---|---|---|---|\n{row}\n\n"
    )
}

/// How to load and run the model, and what its input must be.
fn card_use(title: &str, config: &RepoConfig) -> String {
    let input = config.model_config().map(|c| c.input);
    let p = &config.preprocessing;
    format!(
        "## Use\n\n```rust\nlet pretrained = zoo::load(\"{title}\")?;\nlet logits = \
         pretrained.model.forward(&images, false)?; // N x {} x {} x {} images\n```\n\n\
         ```sh\nzoo predict {title} image.png\nzoo bench {title} --threads 2\n```\n\n\
         Input: {}; then `(pixel / 255 - mean) / std` with mean {:?} and std {:?}.\n\n",
        input.as_ref().map_or(0, |i| i.channels),
        input.as_ref().map_or(0, |i| i.height),
        input.as_ref().map_or(0, |i| i.width),
        p.resize,
        p.mean,
        p.std
    )
}

/// The command that trained the weights, the teacher they were distilled from and how long
/// their training steps took (empty for weights without a recipe).
fn card_training(config: &RepoConfig) -> String {
    let Some(r) = &config.recipe else {
        return String::new();
    };
    let mut text = format!(
        "## Training\n\n`zoo train {} --data {} --epochs {} --batch-size {} --lr {} \
         --schedule {} --optimizer {} --seed {}{}`\n\n",
        r.model,
        r.data,
        r.epochs,
        r.batch_size,
        r.learning_rate,
        r.schedule,
        r.optimizer,
        r.seed,
        r.max_steps
            .map(|s| format!(" --max-steps {s}"))
            .unwrap_or_default()
    );
    if let Some(d) = &r.distill {
        text += &format!(
            "Distilled with {} from the teacher `{}` (weights SHA-256 `{}`).\n\n",
            d.loss, d.teacher, d.teacher_sha256
        );
    }
    if let Some(t) = &config.training {
        text += &format!(
            "Its training steps took {:.2} h at {:.0} images/s over the whole run (every \
             session's steps; evaluation excluded), on the machine that trained it.\n\n",
            t.seconds / 3600.0,
            t.images_per_second
        );
    }
    text
}

/// The cost at the model's input, from its spec (empty without one).
fn card_cost(config: &RepoConfig, spec: Option<&crate::Spec>) -> String {
    let Some(totals) = spec
        .zip(config.model_config().ok())
        .and_then(|(spec, c)| crate::spec::analyze(spec, &c).ok())
        .map(|a| a.totals())
    else {
        return String::new();
    };
    format!(
        "## Cost\n\n| input | binary MACs | float MACs | packed size |\n|---|---|---|---|\n\
         | {} | {:.1} M | {:.1} M | {:.2} MiB |\n\n",
        config.input,
        totals.binary_macs as f64 / 1e6,
        totals.float_macs as f64 / 1e6,
        totals.model_size_bytes() / (1024.0 * 1024.0)
    )
}

/// A YAML scalar, quoted when plain style could misread it.
fn yaml_string(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
        && s.parse::<f64>().is_err();
    if plain {
        s.to_string()
    } else {
        serde_json::to_string(s).expect("a string serialises")
    }
}

/// Uploads `folder`'s files to `repo_id` in one commit, creating the repo when missing.
pub(super) fn push(
    hub: &Hub,
    folder: &Path,
    repo_id: &str,
    options: &PushOptions,
) -> Result<Pushed, Error> {
    super::check_repo_id(repo_id)?;
    if hub.offline {
        return Err(Error::Hub(
            "offline (HF_HUB_OFFLINE): cannot push; unset HF_HUB_OFFLINE".into(),
        ));
    }
    let client = hub.client()?;
    client
        .create_repository()
        .repo_id(repo_id)
        .repo_type(RepoTypeModel)
        .private(options.private)
        .exist_ok(true)
        .send()
        .map_err(|e| hub.explain(e, repo_id, false))?;
    let (owner, name) = hf_hub::split_id(repo_id);
    let message = options
        .message
        .clone()
        .unwrap_or_else(|| format!("Upload {repo_id} with zoo {}", env!("CARGO_PKG_VERSION")));
    let info = client
        .model(owner, name)
        .upload_folder()
        .folder_path(folder.to_path_buf())
        .maybe_revision(options.revision.clone())
        .commit_message(message)
        .create_pr(options.create_pr)
        .send()
        .map_err(|e| match e {
            // The repo exists (created above): what is missing is the branch.
            HFError::RepoNotFound { .. } | HFError::RevisionNotFound { .. } => Error::Hub(format!(
                "`{repo_id}` has no branch `{}` on the hub at {}: create the branch there \
                     first, or push to `main` (no --revision) or with --create-pr",
                options.revision.as_deref().unwrap_or("main"),
                hub.endpoint
            )),
            other => hub.explain(other, repo_id, false),
        })?;
    Ok(Pushed {
        commit_url: info.commit_url.clone().unwrap_or_default(),
        commit: info.commit_oid.clone(),
        pull_request_url: info.pr_url.clone(),
    })
}

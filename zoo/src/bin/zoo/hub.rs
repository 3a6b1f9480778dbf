//! `zoo pull` and `zoo push`, and hub names wherever a command takes weights.

use std::path::{Path, PathBuf};

use zoo::hub::{Hub, PushOptions, RepoDir};

/// `zoo pull`.
#[derive(clap::Args)]
pub struct PullArgs {
    /// A pretrained name (`reactnet-lab`, `quicknet.larq_in1k`; see `zoo list`) or a hub repo
    /// `org/name`.
    name: String,
    /// A branch, tag or commit of a hub repo (default `main`).
    #[arg(long)]
    revision: Option<String>,
}

/// `zoo push`.
#[derive(clap::Args)]
pub struct PushArgs {
    /// A run directory, a safetensors weights file or a `.zoo` model.
    source: PathBuf,
    /// The hub repo `org/name` (created if missing).
    #[arg(long, required_unless_present_any = ["local_dir", "tag"])]
    repo: Option<String>,
    /// Publish as the zoo's `<model>.<tag>` instead of --repo: the repo
    /// `<org>/<architecture>.<tag>` (`ZOO_HUB_ORG`, default `zoo-bnn`), which `zoo::load`
    /// finds by that name.
    #[arg(long, conflicts_with = "repo")]
    tag: Option<String>,
    /// Create the repo as private.
    #[arg(long)]
    private: bool,
    /// The branch to commit to (default `main`).
    #[arg(long)]
    revision: Option<String>,
    /// The commit message.
    #[arg(long)]
    message: Option<String>,
    /// Open a pull request instead of committing to the branch.
    #[arg(long)]
    create_pr: bool,
    /// Write the files that would be uploaded into this (new or empty) directory and upload
    /// nothing.
    #[arg(long)]
    local_dir: Option<PathBuf>,
    /// The architecture of a plain weights file: a registered name or a spec file.
    #[arg(long)]
    spec: Option<String>,
}

/// Downloads into the cache and prints the snapshot directory last.
pub fn pull(args: PullArgs) -> Result<(), zoo::Error> {
    let mut hub = Hub::from_env();
    if let Some(revision) = args.revision {
        hub = hub.revision(revision);
    }
    let repo = hub.pull(&args.name)?;
    describe(&args.name, &repo);
    println!("{}", repo.dir.display());
    Ok(())
}

fn describe(name: &str, repo: &RepoDir) {
    let c = &repo.config;
    let metrics = c.metrics.as_ref().map_or(String::new(), |m| {
        format!(
            ", top-1 {:.2}% / top-5 {:.2}% ({})",
            m.top1, m.top5, m.split
        )
    });
    println!(
        "{name}: `{}` for {} images, {} classes, trained on {}{metrics}",
        c.architecture, c.input, c.classes, c.dataset
    );
}

/// Stages the repo files and uploads them in one commit, or writes them to `--local-dir`.
pub fn push(args: PushArgs) -> Result<(), zoo::Error> {
    let hub = Hub::from_env();
    if let Some(dir) = &args.local_dir {
        if std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some()) {
            return Err(zoo::Error::Write {
                path: dir.display().to_string(),
                message: "--local-dir must be a new or empty directory (it receives exactly \
                          the files a push would upload)"
                    .into(),
            });
        }
        let (files, _) = stage(&hub, &args, dir)?;
        list_files(&files);
        println!(
            "wrote {} files to {} (nothing uploaded)",
            files.len(),
            dir.display()
        );
        return Ok(());
    }
    let staging = tempfile::tempdir().map_err(|e| zoo::Error::Write {
        path: std::env::temp_dir().display().to_string(),
        message: format!("cannot make a staging directory: {e}"),
    })?;
    let (files, repo) = stage(&hub, &args, staging.path())?;
    list_files(&files);
    let pushed = hub.push(
        staging.path(),
        &repo,
        &PushOptions {
            private: args.private,
            revision: args.revision,
            message: args.message,
            create_pr: args.create_pr,
        },
    )?;
    if args.create_pr {
        // hf-hub 1.0 reads the pull request's URL from `prUrl`, which the hub does not send
        // (it sends `pullRequestUrl`), so it is usually unknown here.
        match &pushed.pull_request_url {
            Some(pr) => println!("opened a pull request on {repo}: {pr}"),
            None => {
                println!("opened a pull request on {repo} (listed under the repo's community tab)")
            }
        }
    }
    println!(
        "pushed {} files to {repo} in one commit: {}",
        files.len(),
        pushed.commit_url
    );
    Ok(())
}

/// Stages the files into `dir` and names the repo: `--repo`, or the zoo's repo of the staged
/// architecture and `--tag` (the card is titled with it).
fn stage(hub: &Hub, args: &PushArgs, dir: &Path) -> Result<(Vec<PathBuf>, String), zoo::Error> {
    let files = zoo::hub::stage(
        &args.source,
        args.spec.as_deref(),
        args.repo.as_deref(),
        dir,
    )?;
    let repo = match (&args.repo, &args.tag) {
        (Some(repo), _) => repo.clone(),
        (None, Some(tag)) => {
            let staged = RepoDir::open(dir)?;
            let repo = hub.repo_id(&staged.config.architecture, tag);
            let card = zoo::hub::publish::model_card(&repo, &staged.config, Some(&staged.spec));
            zoo::io::write_bytes_atomically(&dir.join(zoo::hub::repo::CARD), card.as_bytes())?;
            repo
        }
        (None, None) => String::new(),
    };
    Ok((files, repo))
}

fn list_files(files: &[PathBuf]) {
    for f in files {
        let size = std::fs::metadata(f).map_or(0, |m| m.len());
        let name = f
            .file_name()
            .map_or(String::new(), |n| n.to_string_lossy().into_owned());
        println!("  {name:<20} {size:>12} bytes");
    }
}

/// Weights named on the command line: a run directory or weights file as it is, else a
/// pretrained model or repo directory, pulled, with what its repo says about them.
pub struct WeightsSource {
    /// The run directory or weights file to open.
    pub path: PathBuf,
    /// The architecture, when given or known from the repo.
    pub spec: Option<String>,
    /// The dataset the weights were trained on, when the zoo can load it.
    pub dataset: Option<String>,
    /// Class names from the repo.
    pub class_names: Option<Vec<String>>,
}

impl WeightsSource {
    /// Resolves `arg`; `spec` (from `--spec`) wins over the repo's.
    pub fn resolve(arg: &str, spec: Option<String>) -> Result<WeightsSource, zoo::Error> {
        let path = Path::new(arg);
        let is_repo_dir = path.join(zoo::hub::repo::SPEC).is_file();
        let plain_path = path.exists() || zoo::hub::looks_like_path(arg);
        if plain_path && !is_repo_dir {
            return Ok(WeightsSource {
                path: path.to_path_buf(),
                spec,
                dataset: None,
                class_names: None,
            });
        }
        let repo = Hub::from_env().pull(arg)?;
        let spec_file = repo.dir.join(zoo::hub::repo::SPEC);
        Ok(WeightsSource {
            path: repo.dir.join(zoo::hub::repo::WEIGHTS),
            spec: spec.or(Some(spec_file.display().to_string())),
            dataset: zoo::train::is_fashion_mnist(&repo.config.dataset)
                .then(|| zoo::train::FASHION_MNIST.to_string()),
            class_names: repo.config.class_names.clone(),
        })
    }
}

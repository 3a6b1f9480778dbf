//! Pretrained weights from the Hugging Face hub: [`crate::load`], `zoo pull` and `zoo push`.
//!
//! A name is one of:
//! - `<model>` or `<model>.<tag>`: a row of the [`pretrained::PRETRAINED`] table (`reactnet-lab`
//!   is `reactnet-lab.fmnist`, `quicknet` is `quicknet.larq_in1k`);
//! - `org/repo`: any hub repo in the zoo's layout ([`repo`]);
//! - a local directory in that layout.
//!
//! Hub repos go through the `hf-hub` client into the cache that Python's `huggingface_hub`
//! uses (`models--org--name/{blobs,snapshots,refs}`), so either client reuses what the other
//! downloaded. Larq Zoo's ImageNet weights are downloaded from its GitHub releases (size and
//! SHA-256 checked, resumable), converted once and kept under `<cache>/zoo/`.
//!
//! [`Hub`] carries the settings, read from the environment as Python's client does:
//! `HF_ENDPOINT`, `HF_TOKEN` (else `HF_TOKEN_PATH`, else `$HF_HOME/token`), `HF_HUB_CACHE`
//! (else `$HF_HOME/hub`), `HF_HUB_OFFLINE=1`; and the zoo's own `ZOO_HUB_ORG` (the
//! organisation of the zoo's weights) and `ZOO_LARQ_BASE_URL` (where Larq's releases are).

pub mod larq;
pub mod pretrained;
pub mod publish;
pub mod repo;

use std::path::{Path, PathBuf};

use candle_core::Device;
use hf_hub::{HFClient, HFClientSync, HFError};
use sha2::{Digest, Sha256};

use crate::engine::{Engine, ZooModel};
use crate::{Error, Model};
pub use pretrained::{Source, Variant, DEFAULT_ORGANISATION, PRETRAINED};
pub use publish::{stage, PushOptions, Pushed};
pub use repo::{Metrics, Preprocessing, RepoConfig, RepoDir};

/// Where Larq Zoo publishes its weights (`larq_zoo.core.utils.download_pretrained_model`).
pub const LARQ_BASE_URL: &str = "https://github.com/larq/zoo/releases/download";

/// The hub the zoo's weights live on, unless `HF_ENDPOINT` says otherwise.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Hub settings: endpoint, token, cache, revision, offline mode, device. Start from
/// [`Hub::from_env`] and override what you need:
///
/// ```no_run
/// let model = zoo::hub::Hub::from_env()
///     .revision("main")
///     .offline(true)
///     .load("reactnet-lab")?;
/// # Ok::<(), zoo::Error>(())
/// ```
#[derive(Clone)]
pub struct Hub {
    endpoint: String,
    token: Option<String>,
    cache_dir: PathBuf,
    revision: Option<String>,
    offline: bool,
    device: Device,
    organisation: String,
    larq_base_url: String,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        f.debug_struct("Hub")
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("cache_dir", &self.cache_dir)
            .field("revision", &self.revision)
            .field("offline", &self.offline)
            .field("organisation", &self.organisation)
            .finish()
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// `$HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
fn hf_home() -> PathBuf {
    env("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
        env("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| env("HOME").map(|h| Path::new(&h).join(".cache")))
            .unwrap_or_else(|| PathBuf::from("/tmp"))
            .join("huggingface")
    })
}

impl Hub {
    /// Settings from the environment (see the module's documentation), on the CPU.
    pub fn from_env() -> Hub {
        let offline = env("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
        });
        Hub {
            endpoint: env("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.to_string()),
            token: None,
            cache_dir: env("HF_HUB_CACHE")
                .or_else(|| env("HUGGINGFACE_HUB_CACHE"))
                .map(PathBuf::from)
                .unwrap_or_else(|| hf_home().join("hub")),
            revision: None,
            offline,
            device: Device::Cpu,
            organisation: env("ZOO_HUB_ORG").unwrap_or_else(|| DEFAULT_ORGANISATION.to_string()),
            larq_base_url: env("ZOO_LARQ_BASE_URL").unwrap_or_else(|| LARQ_BASE_URL.to_string()),
        }
    }

    /// The hub's base URL.
    pub fn endpoint(mut self, url: impl Into<String>) -> Hub {
        self.endpoint = url.into().trim_end_matches('/').to_string();
        self
    }

    /// The access token (default: `HF_TOKEN`, `HF_TOKEN_PATH` or `$HF_HOME/token`).
    pub fn token(mut self, token: impl Into<String>) -> Hub {
        self.token = Some(token.into());
        self
    }

    /// The hub cache (default: `HF_HUB_CACHE`, else `$HF_HOME/hub`).
    pub fn cache_dir(mut self, dir: impl Into<PathBuf>) -> Hub {
        self.cache_dir = dir.into();
        self
    }

    /// A branch, tag or commit of hub repos (default `main`).
    pub fn revision(mut self, revision: impl Into<String>) -> Hub {
        self.revision = Some(revision.into());
        self
    }

    /// Only the cache, no network (default: `HF_HUB_OFFLINE`).
    pub fn offline(mut self, offline: bool) -> Hub {
        self.offline = offline;
        self
    }

    /// Where [`Hub::load`] puts the candle model (default: the CPU).
    pub fn device(mut self, device: Device) -> Hub {
        self.device = device;
        self
    }

    /// The organisation of the zoo's own weights (default: `ZOO_HUB_ORG`, else
    /// [`DEFAULT_ORGANISATION`]).
    pub fn organisation(mut self, organisation: impl Into<String>) -> Hub {
        self.organisation = organisation.into();
        self
    }

    /// Where Larq Zoo's release files are downloaded from (default: `ZOO_LARQ_BASE_URL`, else
    /// [`LARQ_BASE_URL`]).
    pub fn larq_base_url(mut self, url: impl Into<String>) -> Hub {
        self.larq_base_url = url.into().trim_end_matches('/').to_string();
        self
    }

    /// The hub repo of the zoo's `<model>.<tag>`: `<organisation>/<model>.<tag>`.
    pub fn repo_id(&self, model: &str, tag: &str) -> String {
        format!("{}/{model}.{tag}", self.organisation)
    }

    /// The hub cache directory.
    pub fn cache(&self) -> &Path {
        &self.cache_dir
    }

    /// Downloads (or finds in the cache) what `name` names and returns its directory.
    pub fn pull(&self, name: &str) -> Result<RepoDir, Error> {
        match self.target(name)? {
            Target::Local(dir) => RepoDir::open(&dir),
            Target::Repo(id) => self.pull_repo(&id, false),
            Target::Variant(variant) => self.pull_variant(variant),
        }
    }

    /// Downloads what a [`Variant`] names, as for a row of the table: its hub repo, or Larq's
    /// release file converted on first use. `variant.model` may be a spec file.
    pub fn pull_variant(&self, variant: &Variant) -> Result<RepoDir, Error> {
        match variant.source {
            Source::Hub => self.pull_repo(&self.repo_id(variant.model, variant.tag), true),
            Source::LarqRelease { .. } => larq::pull(self, variant),
        }
    }

    /// The candle model of `name` on the hub's device, with its configuration.
    pub fn load(&self, name: &str) -> Result<Pretrained, Error> {
        let repo = self.pull(name)?;
        let model = repo.build(&self.device)?;
        Ok(Pretrained { model, repo })
    }

    /// The packed inference model of `name`: the repo's `model.zoo`, else exported from its
    /// weights.
    pub fn load_packed(&self, name: &str) -> Result<ZooModel, Error> {
        self.pull(name)?.packed()
    }

    /// Uploads the files of `folder` (see [`stage`]) to the hub repo `repo_id` in one commit,
    /// creating the repo if missing.
    pub fn push(
        &self,
        folder: &Path,
        repo_id: &str,
        options: &PushOptions,
    ) -> Result<Pushed, Error> {
        publish::push(self, folder, repo_id, options)
    }

    fn target(&self, name: &str) -> Result<Target, Error> {
        let path = Path::new(name);
        if path.is_dir() {
            return Ok(Target::Local(path.to_path_buf()));
        }
        if looks_like_path(name) {
            return Err(Error::Run {
                path: name.to_string(),
                message: "no such directory (a local repo), and not a pretrained name or hub \
                          repo id"
                    .into(),
            });
        }
        let id = name.strip_prefix("hf-hub:").unwrap_or(name);
        if id.contains('/') {
            check_repo_id(id)?;
            return Ok(Target::Repo(id.to_string()));
        }
        Ok(Target::Variant(pretrained::variant(name)?))
    }

    fn client(&self) -> Result<HFClientSync, Error> {
        let mut builder = HFClient::builder()
            .endpoint(&self.endpoint)
            .cache_dir(&self.cache_dir);
        if let Some(token) = &self.token {
            builder = builder.token(token);
        }
        builder
            .build_sync()
            .map_err(|e| Error::Hub(format!("cannot set up the hub client: {e}")))
    }

    fn pull_repo(&self, id: &str, known: bool) -> Result<RepoDir, Error> {
        let (owner, name) = hf_hub::split_id(id);
        let dir = self
            .client()?
            .model(owner, name)
            .snapshot_download()
            .maybe_revision(self.revision.clone())
            .local_files_only(self.offline)
            .send()
            .map_err(|e| self.explain(e, id, known))?;
        if !self.offline {
            verify_snapshot(&dir)?;
        }
        RepoDir::open(&dir).map_err(|e| match self.offline {
            true => Error::Hub(format!(
                "offline (HF_HUB_OFFLINE): the cached snapshot of `{id}` is incomplete: {e}; \
                 run `zoo pull {id}` with the network to complete it"
            )),
            false => e,
        })
    }

    /// A hub client error in the user's terms.
    fn explain(&self, e: HFError, id: &str, known: bool) -> Error {
        let at = &self.endpoint;
        let revision = self.revision.as_deref().unwrap_or("main");
        // The client reports a missing repo as a missing revision when it asked for one; the
        // hub's error code tells them apart.
        let repo_missing = match &e {
            HFError::RepoNotFound { .. } => true,
            HFError::RevisionNotFound {
                context: Some(c), ..
            } => c.error_code.as_deref() == Some("RepoNotFound"),
            _ => false,
        };
        Error::Hub(match e {
            _ if repo_missing => {
                let hint = if known {
                    format!(
                        "; its weights have not been published there yet (pretrained names: {})",
                        pretrained_names()
                    )
                } else {
                    format!(
                        "; no local directory `{id}` either. Pretrained names: {}",
                        pretrained_names()
                    )
                };
                format!("no repo `{id}` on the hub at {at}{hint}")
            }
            HFError::AuthRequired { .. } | HFError::Forbidden { .. } => {
                format!(
                "the hub at {at} refused access to `{id}` ({}): set a token with `HF_TOKEN=...`, \
                 or save one in `$HF_HOME/token` (`huggingface-cli login`), or pass `--token`",
                if matches!(e, HFError::AuthRequired { .. }) { "401" } else { "403" }
            )
            }
            HFError::RevisionNotFound { .. } => {
                format!("`{id}` has no revision `{revision}` on the hub at {at}")
            }
            HFError::LocalEntryNotFound { .. } => format!(
                "offline (HF_HUB_OFFLINE): `{id}` at revision `{revision}` is not in the cache \
                 {}; run `zoo pull {id}` with the network first",
                self.cache_dir.display()
            ),
            other => format!("downloading `{id}` from {at}: {other}"),
        })
    }
}

enum Target {
    Local(PathBuf),
    Repo(String),
    Variant(&'static Variant),
}

/// Every pretrained `<model>.<tag>`.
pub fn pretrained_names() -> String {
    PRETRAINED
        .iter()
        .map(|v| v.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether `name` can only be a file system path: absolute or relative to `.`, with more than
/// one `/`, or ending in a file extension the zoo reads (never a hub name).
pub fn looks_like_path(name: &str) -> bool {
    let path = Path::new(name);
    path.is_absolute()
        || name.starts_with('.')
        || name.matches('/').count() > 1
        || path.extension().is_some_and(|e| {
            ["safetensors", "zoo", "h5", "yaml", "json"].contains(&&*e.to_string_lossy())
        })
}

/// Accepts `org/name` with hub-legal characters.
fn check_repo_id(id: &str) -> Result<(), Error> {
    let legal = |part: &str| {
        !part.is_empty()
            && part.len() <= 96
            && !part.starts_with(['.', '-'])
            && !part.contains("..")
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    match id.split_once('/') {
        Some((org, name)) if legal(org) && legal(name) => Ok(()),
        _ => Err(Error::Hub(format!(
            "`{id}` is neither a local directory nor a hub repo id `org/name` (letters, digits, \
             `-`, `_`, `.`)"
        ))),
    }
}

/// Checks every file of a snapshot against the hash its blob is named by: the SHA-256 of an
/// LFS file, the git blob id (SHA-1 of `blob <len>\0` and the bytes) of a regular one. The
/// hub client checks neither. A file that does not match is removed with its link, so nothing
/// corrupt stays in the cache.
fn verify_snapshot(snapshot: &Path) -> Result<(), Error> {
    let entries = std::fs::read_dir(snapshot).map_err(|e| Error::Run {
        path: snapshot.display().to_string(),
        message: format!("cannot list the snapshot: {e}"),
    })?;
    for entry in entries.flatten() {
        let link = entry.path();
        if link.is_dir() {
            verify_snapshot(&link)?;
            continue;
        }
        let Ok(blob) = std::fs::canonicalize(&link) else {
            continue;
        };
        let Some(expected) = blob.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let read = |e: std::io::Error| Error::Run {
            path: blob.display().to_string(),
            message: format!("cannot read: {e}"),
        };
        let got = match expected.len() {
            64 => {
                let mut hasher = Sha256::new();
                std::io::copy(&mut std::fs::File::open(&blob).map_err(read)?, &mut hasher)
                    .map_err(read)?;
                hex(&hasher.finalize())
            }
            40 => {
                let bytes = std::fs::read(&blob).map_err(read)?;
                let mut hasher = sha1::Sha1::new();
                hasher.update(format!("blob {}\0", bytes.len()).as_bytes());
                hasher.update(&bytes);
                hex(&hasher.finalize())
            }
            _ => continue, // not named by a hash
        };
        if !got.eq_ignore_ascii_case(expected) {
            let _ = std::fs::remove_file(&blob);
            let _ = std::fs::remove_file(&link);
            let kind = if expected.len() == 64 {
                "SHA-256"
            } else {
                "git blob id (SHA-1)"
            };
            return Err(Error::Hub(format!(
                "`{}` does not match its {kind} (expected {expected}, got {got}); the corrupt \
                 download was removed from the cache: run again to download it anew",
                link.display()
            )));
        }
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A model loaded by [`crate::load`]: the candle model and the repo it came from.
pub struct Pretrained {
    /// The candle model, in inference mode when called with `train = false`.
    pub model: Box<dyn Model>,
    /// The repo's directory, configuration and spec.
    pub repo: RepoDir,
}

impl Pretrained {
    /// Input shape, classes, class names and normalisation.
    pub fn config(&self) -> &RepoConfig {
        &self.repo.config
    }

    /// The packed model for the inference engine (`model.zoo`, else exported on the fly).
    pub fn packed(&self) -> Result<ZooModel, Error> {
        self.repo.packed()
    }

    /// The CPU inference engine on `threads` threads.
    pub fn engine(&self, threads: usize) -> Result<Engine, Error> {
        Engine::new(&self.packed()?, threads)
    }
}

impl std::fmt::Debug for Pretrained {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pretrained")
            .field("dir", &self.repo.dir)
            .field("config", &self.repo.config)
            .finish_non_exhaustive()
    }
}

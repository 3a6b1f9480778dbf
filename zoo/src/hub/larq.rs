//! Larq Zoo's ImageNet weights: downloaded from its GitHub releases, verified against the
//! SHA-256 that `larq_zoo` 2.4 pins, converted with [`crate::import`] and kept as a repo
//! directory under `<cache>/zoo/larq_in1k/<model>/<sha256 prefix>/`.

use std::path::Path;

use super::pretrained::{Source, Variant};
use super::repo::{self, Metrics, Preprocessing, RepoConfig, RepoDir};
use super::Hub;
use crate::data::fetch::{fetch_file, RemoteFile};
use crate::Error;

/// The ILSVRC-2012 class names in the standard class-index order (the order of Keras'
/// `imagenet_class_index.json`, which Larq Zoo's `decode_predictions` reads), one per line.
const IMAGENET_CLASSES: &str = include_str!("imagenet_classes.txt");

/// `larq_zoo.preprocess_input`: the centre 224/256 of the shorter side, bicubic resize to 224,
/// ImageNet mean and standard deviation.
fn preprocessing() -> Preprocessing {
    Preprocessing {
        resize: "RGB, centre square crop of 224/256 of the shorter side, bicubic resize to \
                 224x224 (larq_zoo.preprocess_input)"
            .into(),
        mean: crate::data::folder::IMAGENET_MEAN.to_vec(),
        std: crate::data::folder::IMAGENET_STD.to_vec(),
    }
}

/// The converted weights of `variant`, downloading and converting them on first use.
pub(super) fn pull(hub: &Hub, variant: &Variant) -> Result<RepoDir, Error> {
    let Source::LarqRelease { path, sha256 } = variant.source else {
        unreachable!("only Larq release variants come here");
    };
    let home = hub
        .cache()
        .join("zoo")
        .join(variant.tag)
        .join(crate::spec(variant.model)?.name);
    if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::Hub(format!(
            "`{}`: expected a SHA-256 of 64 hexadecimal digits, found `{sha256}`",
            variant.name()
        )));
    }
    let converted = home.join(&sha256[..16]);
    if converted.is_dir() {
        return RepoDir::open(&converted);
    }
    let url = format!("{}/{path}", hub.larq_base_url);
    if hub.offline {
        return Err(Error::Hub(format!(
            "offline (HF_HUB_OFFLINE): `{}` is not in the cache {} yet; run `zoo pull {}` \
             with the network first (it downloads {url})",
            variant.name(),
            home.display(),
            variant.name()
        )));
    }
    let file_name = path.rsplit('/').next().expect("a path has a last part");
    let remote = RemoteFile {
        url: url.clone(),
        file_name: file_name.to_string(),
        sha256: sha256.to_string(),
        size: None,
    };
    let (bar, mut progress) = crate::data::fetch::download_bar(file_name);
    let h5 = fetch_file(&remote, &home, &mut progress)?;
    bar.finish_and_clear();
    convert(variant, &h5, &url, &converted)?;
    RepoDir::open(&converted)
}

/// Imports `h5` and writes the repo directory `dest` atomically (a temporary directory
/// renamed into place).
fn convert(variant: &Variant, h5: &Path, url: &str, dest: &Path) -> Result<(), Error> {
    let spec = crate::spec(variant.model)?;
    let spec_text = crate::spec_text(variant.model)?;
    let model_config = crate::ModelConfig {
        input: variant.input.parse().map_err(Error::Hub)?,
        classes: variant.classes,
    };
    let tensors = crate::import::read_keras_h5(h5, &spec, &model_config)?;
    let config = RepoConfig {
        architecture: spec.name.clone(),
        input: variant.input.to_string(),
        classes: variant.classes,
        class_names: (variant.classes == 1000)
            .then(|| IMAGENET_CLASSES.lines().map(String::from).collect()),
        preprocessing: preprocessing(),
        dataset: variant.dataset.to_string(),
        recipe: None,
        metrics: variant.accuracy.map(|(top1, top5)| Metrics {
            top1,
            top5,
            split: "validation".into(),
            images: Some(50_000),
            measured_by: Some(variant.measured.to_string()),
        }),
        training: None,
        source: Some(url.to_string()),
        zoo_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let parent = dest.parent().expect("the destination is inside the cache");
    let tmp = parent.join(format!(".converting.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let write = || -> Result<(), Error> {
        std::fs::create_dir_all(&tmp).map_err(|e| Error::Write {
            path: tmp.display().to_string(),
            message: e.to_string(),
        })?;
        crate::import::write_safetensors_atomically(&tensors, &tmp.join(repo::WEIGHTS))?;
        super::publish::write_repo_files(&tmp, &config, &spec_text, &variant.name())?;
        match std::fs::rename(&tmp, dest) {
            // Another process converted the same file first: keep its copy.
            Err(_) if RepoDir::open(dest).is_ok() => {
                let _ = std::fs::remove_dir_all(&tmp);
                Ok(())
            }
            result => result.map_err(|e| Error::Write {
                path: dest.display().to_string(),
                message: e.to_string(),
            }),
        }
    };
    let result = write();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

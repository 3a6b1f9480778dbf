//! Every reader of outside input, as a fuzz target: each writes the input where the zoo would
//! find such a file and runs the zoo's own reader on it, as a user's command would. Shared by
//! the hostile-input test (`tests/hostile_files.rs`) and the cargo-fuzz targets (`fuzz/`).
//!
//! A target returns the reader's verdict; an `Err` is a clear refusal, which is fine. What is
//! not fine is a panic, an abort, a hang or an allocation out of proportion to the input.

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// One reader, by name.
pub struct Target {
    /// The name: the cargo-fuzz target and the corpus folder.
    pub name: &'static str,
    /// Reads `input` the way the zoo reads such a file, in the scratch folder `dir`.
    pub read: fn(&Path, &[u8]) -> Result<(), String>,
}

/// The readers.
pub const TARGETS: [Target; 9] = [
    Target {
        name: "spec",
        read: read_spec,
    },
    Target {
        name: "keras_h5",
        read: read_keras_h5,
    },
    Target {
        name: "weights",
        read: read_weights,
    },
    Target {
        name: "checkpoint",
        read: read_checkpoint,
    },
    Target {
        name: "zoo_model",
        read: read_zoo_model,
    },
    Target {
        name: "idx",
        read: read_idx,
    },
    Target {
        name: "image",
        read: read_image,
    },
    Target {
        name: "run_config",
        read: read_run_config,
    },
    Target {
        name: "repo_config",
        read: read_repo_config,
    },
];

/// The target called `name`.
pub fn target(name: &str) -> &'static Target {
    TARGETS
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no fuzz target `{name}`"))
}

/// A scratch folder of this process and thread, created on first use.
pub fn scratch() -> PathBuf {
    let thread = format!("{:?}", std::thread::current().id());
    let id: String = thread.chars().filter(char::is_ascii_digit).collect();
    let dir = std::env::temp_dir().join(format!("zoo-readers-{}-{id}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("the scratch folder can be made");
    dir
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).expect("the scratch file can be written");
}

fn verdict<T, E: std::fmt::Display>(r: Result<T, E>) -> Result<(), String> {
    r.map(|_| ()).map_err(|e| e.to_string())
}

/// A small LAB network for 32x32 grayscale images: the model of the generated seeds.
pub const TINY_SPEC: &str = include_str!("tiny_lab.yaml");

/// The tiny spec, written once per process (weights and checkpoints name it).
fn tiny_spec_file() -> &'static Path {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    FILE.get_or_init(|| {
        let path =
            std::env::temp_dir().join(format!("zoo-readers-{}-tiny.yaml", std::process::id()));
        write(&path, TINY_SPEC.as_bytes());
        path
    })
}

fn read_spec(dir: &Path, input: &[u8]) -> Result<(), String> {
    let path = dir.join("spec.yaml");
    write(&path, input);
    verdict(zoo::spec::load_file(&path))
}

/// Keras weights, mapped onto the Bi-Real Net fixture's architecture.
fn read_keras_h5(dir: &Path, input: &[u8]) -> Result<(), String> {
    static SPEC: OnceLock<zoo::Spec> = OnceLock::new();
    let spec = SPEC.get_or_init(|| {
        let file =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/larq/birealnet.yaml");
        zoo::spec::load_file(file).expect("the fixture spec parses")
    });
    let path = dir.join("weights.h5");
    write(&path, input);
    verdict(zoo::import::read_keras_h5(
        &path,
        spec,
        &spec.default_config(),
    ))
}

/// A weights file as `zoo eval` reads it: the tensors, then the network they claim to be
/// (their run configuration's model, else the tiny spec) built from them.
fn read_weights(dir: &Path, input: &[u8]) -> Result<(), String> {
    let path = dir.join("model.safetensors");
    write(&path, input);
    let weights = zoo::train::RunWeights::open(&path).map_err(|e| e.to_string())?;
    let spec = tiny_spec_file().display().to_string();
    let config = match &weights.config {
        Some(c) => c.model_config().map_err(|e| e.to_string())?,
        None => zoo::spec(&spec)
            .map_err(|e| e.to_string())?
            .default_config(),
    };
    verdict(weights.network_for(&spec, &config))
}

fn read_checkpoint(dir: &Path, input: &[u8]) -> Result<(), String> {
    let path = dir.join("step-000000001.safetensors");
    write(&path, input);
    verdict(zoo::train::checkpoint::load(&path))
}

/// A `.zoo` model as `zoo bench` and `zoo predict` read it: loaded, then made an engine.
fn read_zoo_model(dir: &Path, input: &[u8]) -> Result<(), String> {
    let path = dir.join("model.zoo");
    write(&path, input);
    let model = zoo::engine::ZooModel::load(&path).map_err(|e| e.to_string())?;
    verdict(zoo::engine::Engine::new(&model, 1))
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(bytes).expect("gzip to memory");
    gz.finish().expect("gzip to memory")
}

/// Fashion-MNIST's IDX files: the input (uncompressed; it is gzipped as the files are) is the
/// images file when its fourth byte says 3 dimensions, else the labels file; the other file is
/// a valid one of 4 entries.
fn read_idx(dir: &Path, input: &[u8]) -> Result<(), String> {
    let images_file = dir.join("t10k-images-idx3-ubyte.gz");
    let labels_file = dir.join("t10k-labels-idx1-ubyte.gz");
    let (images, labels) = idx_files(4);
    if input.get(3) == Some(&3) {
        write(&images_file, &gzip(input));
        write(&labels_file, &gzip(&labels));
    } else {
        write(&images_file, &gzip(&images));
        write(&labels_file, &gzip(input));
    }
    verdict(zoo::data::FashionMnist::open(
        dir,
        zoo::data::Split::Validation,
        32,
    ))
}

/// The uncompressed images and labels IDX files of `n` 28x28 images, class `i % 10`.
pub fn idx_files(n: usize) -> (Vec<u8>, Vec<u8>) {
    let mut images = vec![0, 0, 8, 3];
    for d in [n as u32, 28, 28] {
        images.extend(d.to_be_bytes());
    }
    let mut labels = vec![0, 0, 8, 1];
    labels.extend((n as u32).to_be_bytes());
    for i in 0..n {
        labels.push((i % 10) as u8);
        images.extend((0..28 * 28).map(|p| ((p * 7 + i * 25) % 256) as u8));
    }
    (images, labels)
}

/// An image as an image folder's sample and as `zoo predict` reads it (colour and gray).
fn read_image(dir: &Path, input: &[u8]) -> Result<(), String> {
    let path = dir.join("image");
    write(&path, input);
    zoo::data::folder::eval_image(&path, 32).map_err(|e| e.to_string())?;
    verdict(zoo::data::fashion_mnist::eval_image(&path, 32))
}

/// A run's `config.json` as `zoo train --resume` reads it: checked, and its model analysed at
/// its input size.
fn read_run_config(dir: &Path, input: &[u8]) -> Result<(), String> {
    let path = dir.join("config.json");
    write(&path, input);
    let config = zoo::train::RunConfig::read(&path).map_err(|e| e.to_string())?;
    let model = config.model_config().map_err(|e| e.to_string())?;
    let spec = zoo::spec(&config.model).map_err(|e| e.to_string())?;
    verdict(zoo::spec::analyze(&spec, &model))
}

/// A hub repo's `config.json`, in a folder with a valid spec and weights, as `zoo::load`
/// opens a download.
fn read_repo_config(dir: &Path, input: &[u8]) -> Result<(), String> {
    let repo = dir.join("repo");
    std::fs::create_dir_all(&repo).expect("the repo folder can be made");
    write(&repo.join(zoo::hub::repo::SPEC), TINY_SPEC.as_bytes());
    write(&repo.join(zoo::hub::repo::WEIGHTS), b"");
    write(&repo.join(zoo::hub::repo::CONFIG), input);
    verdict(zoo::hub::RepoDir::open(&repo))
}

/// Real files to start from, per target: the shipped specs, Larq's Keras fixtures, and the
/// files of a tiny run that this function trains (weights, checkpoint, `.zoo` model, run
/// configuration, hub repo), its dataset and images in both formats. Written as
/// `<dir>/<target>/<file>`.
pub fn write_seeds(dir: &Path) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let put = |target: &str, name: &str, bytes: &[u8]| {
        let folder = dir.join(target);
        std::fs::create_dir_all(&folder).unwrap();
        write(&folder.join(name), bytes);
    };
    let copy = |target: &str, from: &Path| {
        put(
            target,
            &from.file_name().unwrap().to_string_lossy(),
            &std::fs::read(from).unwrap(),
        );
    };
    for entry in std::fs::read_dir(root.join("specs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            copy("spec", &path);
        }
    }
    put("spec", "tiny.yaml", TINY_SPEC.as_bytes());
    copy("keras_h5", &root.join("tests/fixtures/larq/birealnet.h5"));
    let (images, labels) = idx_files(4);
    put("idx", "images.idx", &images);
    put("idx", "labels.idx", &labels);

    let png = image::RgbImage::from_fn(12, 9, |x, y| {
        image::Rgb([(x * 20) as u8, (y * 25) as u8, 128])
    });
    let mut bytes = std::io::Cursor::new(Vec::new());
    png.write_to(&mut bytes, image::ImageFormat::Png).unwrap();
    put("image", "small.png", bytes.get_ref());
    let mut bytes = std::io::Cursor::new(Vec::new());
    png.write_to(&mut bytes, image::ImageFormat::Jpeg).unwrap();
    put("image", "small.jpg", bytes.get_ref());

    // A tiny run: one epoch on 64 images.
    let work = dir.join(".work");
    let data = work.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let (images, labels) = idx_files(64);
    for prefix in ["train", "t10k"] {
        write(
            &data.join(format!("{prefix}-images-idx3-ubyte.gz")),
            &gzip(&images),
        );
        write(
            &data.join(format!("{prefix}-labels-idx1-ubyte.gz")),
            &gzip(&labels),
        );
    }
    // Kept beside the seeds: the run's configuration names it.
    let spec = dir.join("tiny-lab.yaml");
    write(&spec, TINY_SPEC.as_bytes());
    let run = work.join("run");
    let mut config = zoo::train::RunConfig::new(
        &spec.display().to_string(),
        &data.display().to_string(),
        &zoo::train::fashion_mnist_recipe(),
    )
    .unwrap();
    (config.epochs, config.batch_size) = (1, 32);
    zoo::train::train(Some(config), &run, &zoo::train::Session::default()).unwrap();
    copy("weights", &run.join("model.safetensors"));
    copy("run_config", &run.join("config.json"));
    let (_, checkpoint) = zoo::train::checkpoint::list(&run.join("checkpoints"))
        .pop()
        .unwrap();
    copy("checkpoint", &checkpoint);
    let repo = work.join("repo");
    zoo::hub::stage(&run, None, Some("tiny-lab"), &repo).unwrap();
    copy("repo_config", &repo.join(zoo::hub::repo::CONFIG));
    copy("zoo_model", &repo.join(zoo::hub::repo::PACKED));
    std::fs::remove_dir_all(&work).unwrap();
}

//! What several integration tests share (`#[path = "support/fixtures.rs"] mod fixtures;`): the
//! tiny LAB spec, a Fashion-MNIST-format dataset made on the spot, scratch folders and the
//! `zoo` binary.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A small LAB network for 32x32 grayscale images (`tests/support/tiny_lab.yaml`).
pub const TINY_SPEC: &str = include_str!("tiny_lab.yaml");

/// An empty scratch folder for test `name` of this test binary and process.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "zoo-{}-{name}-{}",
        env!("CARGO_CRATE_NAME"),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes `bytes` gzipped to `path`.
pub fn write_gz(path: &Path, bytes: &[u8]) {
    let file = std::fs::File::create(path).unwrap();
    let mut gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap();
}

/// A Fashion-MNIST-format folder with `train` and `test` images whose class is easy to see
/// (whatever the flips and shifts): class `k` has brightness `25 k` plus noise.
pub fn tiny_idx_dataset(dir: &Path, train: usize, test: usize) {
    let mut seed = 12345u64;
    let mut noise = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % 60) as u8
    };
    for (prefix, n) in [("train", train), ("t10k", test)] {
        let mut images = vec![0, 0, 8, 3];
        for d in [n as u32, 28, 28] {
            images.extend(d.to_be_bytes());
        }
        let mut labels = vec![0, 0, 8, 1];
        labels.extend((n as u32).to_be_bytes());
        for i in 0..n {
            let class = (i * 7 + 3) % 10;
            labels.push(class as u8);
            images.extend((0..28 * 28).map(|_| 25 * class as u8 + noise() / 3));
        }
        write_gz(&dir.join(format!("{prefix}-images-idx3-ubyte.gz")), &images);
        write_gz(&dir.join(format!("{prefix}-labels-idx1-ubyte.gz")), &labels);
    }
}

/// A scratch folder with the tiny spec and 256 training, 64 test images (16 steps an epoch at
/// batch 16): `(folder, spec file, data folder)`.
pub fn tiny_setup(name: &str) -> (PathBuf, String, String) {
    let dir = temp_dir(name);
    let spec = dir.join("tiny_lab.yaml");
    std::fs::write(&spec, TINY_SPEC).unwrap();
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    tiny_idx_dataset(&data, 256, 64);
    (dir, spec.display().to_string(), data.display().to_string())
}

/// Runs the `zoo` binary: success, stdout, stderr.
pub fn zoo<S: AsRef<OsStr>>(args: &[S]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_zoo"))
        .args(args)
        .output()
        .expect("the zoo binary runs");
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// The largest absolute difference between same-named tensors of two safetensors files (which
/// must hold the same names).
pub fn max_difference(a: &Path, b: &Path) -> f32 {
    let device = &candle_core::Device::Cpu;
    let a = candle_core::safetensors::load(a, device).unwrap();
    let b = candle_core::safetensors::load(b, device).unwrap();
    assert_eq!(a.len(), b.len());
    a.iter()
        .map(|(name, t)| {
            (t - &b[name])
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .fold(0.0, f32::max)
}

//! Fashion-MNIST (Zalando, MIT licence): the embedded default dataset.
//!
//! The repository carries the four IDX files (gzip) under `data/fashion-mnist/`, so training
//! works on a fresh machine with no network. Images are 28x28 grayscale; they are normalised
//! with the training set's mean and standard deviation and placed in the middle of the
//! requested input size (32x32 for QuickNet), the border filled with the normalised
//! background. Training augmentation: horizontal flip and a shift of up to two pixels.

use std::io::Read;
use std::path::{Path, PathBuf};

use rand::Rng as _;

use super::{DataError, Dataset, Rng, Split};

/// Side of the stored images.
pub const SIDE: usize = 28;
/// Mean pixel value of the training images (scaled to 0..1).
pub const MEAN: f32 = 0.2860;
/// Standard deviation of the training pixels (scaled to 0..1).
pub const STD: f32 = 0.3530;
/// Largest shift, in pixels, of the training augmentation.
pub const MAX_SHIFT: i64 = 2;
/// The ten class names, indexed by label.
pub const CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// The folder with the four files that ships with the repository: `data/fashion-mnist` of the
/// checkout this binary was built from, else of the current directory or of a folder above the
/// executable (a checkout moved or copied elsewhere).
pub fn embedded_dir() -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/fashion-mnist");
    let relative = Path::new("data/fashion-mnist");
    let exe = std::env::current_exe().ok();
    let beside_exe = exe
        .iter()
        .flat_map(|e| e.ancestors().skip(1))
        .map(|d| d.join(relative));
    std::iter::once(built.clone())
        .chain(std::iter::once(relative.to_path_buf()))
        .chain(beside_exe)
        .find(|d| d.join("train-images-idx3-ubyte.gz").is_file())
        .unwrap_or(built)
}

/// One split of Fashion-MNIST, decoded in memory.
pub struct FashionMnist {
    pixels: Vec<u8>,
    labels: Vec<u8>,
    side: usize,
    classes: Vec<String>,
}

impl FashionMnist {
    /// Reads a split from `dir` (the `*-idx?-ubyte.gz` files) producing `side x side` images
    /// (`side` >= 28).
    pub fn open(dir: &Path, split: Split, side: usize) -> Result<FashionMnist, DataError> {
        if side < SIDE {
            return Err(DataError::Invalid(format!(
                "Fashion-MNIST images are {SIDE}x{SIDE}: the input must be at least that large, found {side}x{side}"
            )));
        }
        let prefix = match split {
            Split::Train => "train",
            Split::Validation => "t10k",
        };
        let images = read_idx(&dir.join(format!("{prefix}-images-idx3-ubyte.gz")), 3)?;
        let labels = read_idx(&dir.join(format!("{prefix}-labels-idx1-ubyte.gz")), 1)?;
        let (image_dims, pixels) = images;
        let (label_dims, labels) = labels;
        let labels_path = dir.join(format!("{prefix}-labels-idx1-ubyte.gz"));
        if image_dims[1..] != [SIDE, SIDE] {
            return Err(DataError::File {
                path: dir.join(format!("{prefix}-images-idx3-ubyte.gz")),
                message: format!(
                    "expected {SIDE}x{SIDE} images, found {:?}",
                    &image_dims[1..]
                ),
            });
        }
        if label_dims[0] != image_dims[0] {
            return Err(DataError::File {
                path: labels_path,
                message: format!("{} labels for {} images", label_dims[0], image_dims[0]),
            });
        }
        if let Some(bad) = labels.iter().find(|&&l| l as usize >= CLASSES.len()) {
            return Err(DataError::File {
                path: labels_path,
                message: format!("label {bad} is not one of the {} classes", CLASSES.len()),
            });
        }
        Ok(FashionMnist {
            pixels,
            labels,
            side,
            classes: CLASSES.iter().map(|c| c.to_string()).collect(),
        })
    }
}

/// The most values an IDX file may hold: 2^30 (1 GiB), 20 times Fashion-MNIST's training set.
const MAX_IDX_VALUES: u64 = 1 << 30;

/// Reads a gzip-compressed IDX file of unsigned bytes with `rank` dimensions. The header is
/// checked before the values are read, and no more values than it promises are decompressed.
fn read_idx(path: &Path, rank: usize) -> Result<(Vec<usize>, Vec<u8>), DataError> {
    let fail = |message: String| DataError::File {
        path: path.to_path_buf(),
        message,
    };
    let file = std::fs::File::open(path).map_err(|e| {
        fail(format!(
            "cannot open ({e}); expected a Fashion-MNIST IDX file (gzip) here"
        ))
    })?;
    let mut gz = flate2::read::GzDecoder::new(file);
    let unreadable = |e: std::io::Error| fail(format!("not a readable gzip file: {e}"));
    let mut header = vec![0u8; 4 + 4 * rank];
    let short = match gz.read_exact(&mut header) {
        Ok(()) => false,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => true,
        Err(e) => return Err(unreadable(e)),
    };
    if short || header[..3] != [0, 0, 8] || header[3] as usize != rank {
        return Err(fail(format!(
            "not an IDX file of unsigned bytes with {rank} dimension(s)"
        )));
    }
    let dims: Vec<usize> = header[4..]
        .chunks(4)
        .map(|d| u32::from_be_bytes(d.try_into().expect("4 bytes")) as usize)
        .collect();
    let expected = dims.iter().fold(1u64, |n, &d| n.saturating_mul(d as u64));
    if expected > MAX_IDX_VALUES {
        return Err(fail(format!(
            "the header promises {expected} values of shape {dims:?}, more than the limit of {MAX_IDX_VALUES}"
        )));
    }
    let mut bytes = Vec::new();
    gz.take(expected + 1)
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    if bytes.len() as u64 != expected {
        return Err(fail(format!(
            "the header promises {expected} values of shape {dims:?}, the file holds {}{}",
            bytes.len(),
            if bytes.len() as u64 > expected {
                " or more"
            } else {
                ""
            }
        )));
    }
    Ok((dims, bytes))
}

impl Dataset for FashionMnist {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn classes(&self) -> &[String] {
        &self.classes
    }

    fn shape(&self) -> [usize; 3] {
        [1, self.side, self.side]
    }

    fn load(
        &self,
        index: usize,
        augment: Option<&mut Rng>,
        out: &mut [f32],
    ) -> Result<u32, DataError> {
        let (flip, dy, dx) = match augment {
            Some(rng) => (
                rng.random_bool(0.5),
                rng.random_range(-MAX_SHIFT..=MAX_SHIFT),
                rng.random_range(-MAX_SHIFT..=MAX_SHIFT),
            ),
            None => (false, 0, 0),
        };
        let image = &self.pixels[index * SIDE * SIDE..(index + 1) * SIDE * SIDE];
        let offset = ((self.side - SIDE) / 2) as i64;
        let background = -MEAN / STD;
        for y in 0..self.side {
            for x in 0..self.side {
                // The output pixel (y, x) shows source pixel (sy, sx) of the shifted image.
                let sy = y as i64 - offset - dy;
                let mut sx = x as i64 - offset - dx;
                if flip {
                    sx = SIDE as i64 - 1 - sx;
                }
                out[y * self.side + x] =
                    if (0..SIDE as i64).contains(&sy) && (0..SIDE as i64).contains(&sx) {
                        (image[sy as usize * SIDE + sx as usize] as f32 / 255.0 - MEAN) / STD
                    } else {
                        background
                    };
            }
        }
        Ok(self.labels[index] as u32)
    }
}

/// One image file prepared like a Fashion-MNIST test sample: gray, resized to 28 x 28
/// (light garment on a dark background, as in the dataset), centered on a `side x side`
/// canvas, normalised; `1 x side x side`.
pub fn eval_image(path: &Path, side: usize) -> Result<Vec<f32>, DataError> {
    let fail = |message: String| DataError::File {
        path: path.to_path_buf(),
        message,
    };
    let image = super::folder::open_image(path)
        .map_err(fail)?
        .decode()
        .map_err(|e| fail(format!("cannot decode: {e}")))?
        .into_luma8();
    if side < SIDE {
        return Err(DataError::Invalid(format!(
            "Fashion-MNIST images need an input of at least {SIDE}x{SIDE}, found {side}x{side}"
        )));
    }
    let small = super::folder::resize(&image, SIDE as u32, SIDE as u32);
    let offset = (side - SIDE) / 2;
    let mut out = vec![-MEAN / STD; side * side];
    for (y, row) in small.as_raw().chunks(SIDE).enumerate() {
        for (x, &v) in row.iter().enumerate() {
            out[(y + offset) * side + x + offset] = (v as f32 / 255.0 - MEAN) / STD;
        }
    }
    Ok(out)
}

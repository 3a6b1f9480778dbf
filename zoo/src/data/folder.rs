//! Image folders in the ImageNet / Imagenette layout: `root/train/<class>/*.JPEG` and
//! `root/val/<class>/*.JPEG`.
//!
//! Classes are the sorted subfolder names of `train/`; the validation split uses the same list
//! so that labels agree. Images are decoded with the `image` crate, converted to RGB and
//! normalised with the ImageNet mean and standard deviation. Training samples get a random
//! resized crop and a horizontal flip (as torchvision's `RandomResizedCrop` and
//! `RandomHorizontalFlip`); validation samples are resized so that their shorter side is
//! `round(size / 0.875)` and center-cropped.

use std::borrow::Cow;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use image::imageops::{self, FilterType};
use image::{GenericImageView, ImageBuffer, ImageReader, Pixel, RgbImage};
use rand::Rng as _;

use super::{DataError, Dataset, Rng, Split};

/// Per-channel mean of ImageNet (RGB, pixel values scaled to 0..1).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// Per-channel standard deviation of ImageNet (RGB, pixel values scaled to 0..1).
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];
/// File extensions read as images (compared case-insensitively).
pub const EXTENSIONS: [&str; 3] = ["jpeg", "jpg", "png"];
/// Fraction of the resized validation image kept by the center crop.
pub const CROP_FRACTION: f64 = 0.875;
/// Range of the area fraction of the random resized crop.
pub const CROP_SCALE: (f64, f64) = (0.08, 1.0);
/// Range of the aspect ratio (width / height) of the random resized crop.
pub const CROP_RATIO: (f64, f64) = (3.0 / 4.0, 4.0 / 3.0);
/// Attempts to draw a fitting random crop before falling back to a center crop.
const CROP_TRIES: usize = 10;
/// The resampling filter (bilinear, widened when shrinking).
const FILTER: FilterType = FilterType::Triangle;
/// The most elongated image read: its long side at most this many times its short side. A
/// strip of 1 x 100000 pixels compresses to a few hundred bytes, and resizing its short side
/// to 256 would make 25.6 million pixels of it.
pub const MAX_ASPECT: u32 = 64;
/// The most memory one decoded image may take: 192 MiB, a 64-megapixel colour photograph. A
/// JPEG of a few hundred bytes can declare 151 million pixels (453 MB) and hold the reader for
/// seconds; the decoder refuses such an image from its header.
pub const MAX_DECODED_BYTES: u64 = 192 << 20;

/// A resize by more than this factor first averages boxes of pixels down to this many times
/// the target size, then filters: the same picture at a fraction of the cost. Filtering a
/// 25-megapixel photograph straight down to 32x32 spans hundreds of source pixels per output
/// pixel (over 10 s under the fuzzer's sanitizer).
const PRESHRINK: u32 = 4;

/// `image` resized to `width x height` with [`FILTER`], through a box-averaged intermediate
/// at most [`PRESHRINK`] times the target where the source is larger.
pub(crate) fn resize<I, P>(image: &I, width: u32, height: u32) -> ImageBuffer<P, Vec<u8>>
where
    I: GenericImageView<Pixel = P>,
    P: Pixel<Subpixel = u8> + 'static,
{
    let (w, h) = image.dimensions();
    if w > PRESHRINK * width || h > PRESHRINK * height {
        let (w, h) = (w.min(PRESHRINK * width), h.min(PRESHRINK * height));
        return imageops::resize(&imageops::thumbnail(image, w, h), width, height, FILTER);
    }
    imageops::resize(image, width, height, FILTER)
}

/// Opens an image file for decoding (format guessed from its content) within
/// [`MAX_DECODED_BYTES`].
pub(crate) fn open_image(path: &Path) -> Result<ImageReader<std::io::BufReader<fs::File>>, String> {
    let mut reader = ImageReader::open(path)
        .map_err(|e| format!("cannot open: {e}"))?
        .with_guessed_format()
        .map_err(|e| format!("cannot read: {e}"))?;
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(MAX_DECODED_BYTES);
    reader.limits(limits);
    Ok(reader)
}

/// The validation image's shorter side before the center crop: `round(size / 0.875)`.
pub fn resize_side(size: usize) -> usize {
    (size as f64 / CROP_FRACTION).round() as usize
}

/// The normalised value of an 8-bit `value` of channel `channel` (0 = red, 1 = green,
/// 2 = blue): `(value / 255 - mean) / std`.
pub fn normalise(channel: usize, value: u8) -> f32 {
    (value as f32 / 255.0 - IMAGENET_MEAN[channel]) / IMAGENET_STD[channel]
}

/// Settings of an [`ImageFolder`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FolderOptions {
    /// Keep every decoded image in memory after its first use, so that later epochs skip
    /// decoding. Images are stored as 8-bit RGB, shrunk so that their shorter side is at
    /// most `cache_side`. Meant for small datasets such as Imagenette (about 1 GB at a
    /// 160-pixel input); a full ImageNet does not fit.
    pub cache: bool,
    /// Shorter side of cached images; `None` is [`resize_side`]`(size)`, with which the
    /// validation transform gives exactly the same pixels with or without the cache.
    /// Training crops are drawn from the cached image, so a larger side keeps more detail
    /// for small crops.
    pub cache_side: Option<usize>,
}

/// A decoded sample in the cache: the image, or why it cannot be decoded.
type Cached = Result<Arc<RgbImage>, String>;

/// An image file and its label.
type Sample = (PathBuf, u32);

/// One split of an image folder dataset.
pub struct ImageFolder {
    split_dir: PathBuf,
    samples: Vec<Sample>,
    classes: Vec<String>,
    size: usize,
    ignored: Vec<PathBuf>,
    lut: Box<[[f32; 256]; 3]>,
    cache: Option<Cache>,
}

struct Cache {
    side: usize,
    slots: Vec<OnceLock<Cached>>,
    bytes: AtomicU64,
}

impl ImageFolder {
    /// Opens `split` of the folder `root` (holding `train/` and, for validation, `val/`),
    /// producing `3 x size x size` images.
    ///
    /// Errors name the path and what was expected: a missing `root`, `train/` or `val/`, a
    /// `train/` without class folders, a class folder without images, or a `val/` class
    /// folder that `train/` does not have. Files with other extensions are skipped and
    /// listed by [`ImageFolder::ignored_files`].
    pub fn open(
        root: &Path,
        split: Split,
        size: usize,
        options: FolderOptions,
    ) -> Result<ImageFolder, DataError> {
        if size == 0 || size > 4096 {
            return Err(DataError::Invalid(format!(
                "image folder input size must be between 1 and 4096 pixels, found {size}"
            )));
        }
        if options.cache_side == Some(0) {
            return Err(DataError::Invalid(
                "the cache side must be at least one pixel".to_string(),
            ));
        }
        if !root.is_dir() {
            return Err(DataError::File {
                path: root.to_path_buf(),
                message: "no such folder: expected a dataset folder holding `train/` and \
                          `val/`, one subfolder per class (`zoo data fetch imagenette` \
                          downloads one)"
                    .to_string(),
            });
        }
        let classes = training_classes(root)?;
        let (split_dir, folders) = match split {
            Split::Train => (root.join("train"), classes.clone()),
            Split::Validation => (root.join("val"), validation_folders(root, &classes)?),
        };
        let (samples, ignored) = list_samples(&split_dir, &folders, &classes)?;
        let mut lut = Box::new([[0f32; 256]; 3]);
        for (channel, table) in lut.iter_mut().enumerate() {
            for (value, slot) in table.iter_mut().enumerate() {
                *slot = normalise(channel, value as u8);
            }
        }
        let cache = options.cache.then(|| Cache {
            side: options.cache_side.unwrap_or_else(|| resize_side(size)),
            slots: (0..samples.len()).map(|_| OnceLock::new()).collect(),
            bytes: AtomicU64::new(0),
        });
        Ok(ImageFolder {
            split_dir,
            samples,
            classes,
            size,
            ignored,
            lut,
            cache,
        })
    }

    /// The split's folder (`root/train` or `root/val`).
    pub fn dir(&self) -> &Path {
        &self.split_dir
    }

    /// Files and folders that were skipped because they are not images of a class folder
    /// (other extensions, loose files next to the class folders), sorted.
    pub fn ignored_files(&self) -> &[PathBuf] {
        &self.ignored
    }

    /// The file and label of sample `index`.
    pub fn sample(&self, index: usize) -> Option<(&Path, u32)> {
        self.samples
            .get(index)
            .map(|(path, label)| (path.as_path(), *label))
    }

    /// Bytes of decoded pixels held by the cache (0 without a cache).
    pub fn cached_bytes(&self) -> u64 {
        self.cache
            .as_ref()
            .map_or(0, |cache| cache.bytes.load(Ordering::Relaxed))
    }

    /// The decoded RGB image of sample `index`, from the cache when enabled.
    fn image(&self, index: usize, path: &Path) -> Result<Arc<RgbImage>, DataError> {
        let sample_error = |message: String| DataError::Sample {
            path: path.to_path_buf(),
            message,
        };
        let Some(cache) = &self.cache else {
            return decode(path).map(Arc::new).map_err(sample_error);
        };
        let slot = &cache.slots[index];
        let entry = match slot.get() {
            Some(entry) => entry,
            None => {
                // Decode outside the lock; if two workers race, the first result is kept.
                let decoded = decode(path).map(|image| {
                    let smaller = match resize_shorter(&image, cache.side, true) {
                        Cow::Borrowed(_) => None,
                        Cow::Owned(smaller) => Some(smaller),
                    };
                    Arc::new(smaller.unwrap_or(image))
                });
                let mut stored = false;
                let entry = slot.get_or_init(|| {
                    stored = true;
                    decoded
                });
                if stored {
                    if let Ok(image) = entry {
                        cache
                            .bytes
                            .fetch_add(image.as_raw().len() as u64, Ordering::Relaxed);
                    }
                }
                entry
            }
        };
        entry.clone().map_err(sample_error)
    }

    /// Writes the `size x size` window of `image` at `(x0, y0)` as normalised `C x H x W`,
    /// mirrored horizontally when `flip`.
    fn write(&self, image: &RgbImage, x0: usize, y0: usize, flip: bool, out: &mut [f32]) {
        let size = self.size;
        let plane = size * size;
        let width = image.width() as usize;
        let raw = image.as_raw();
        for y in 0..size {
            let row = &raw[((y0 + y) * width + x0) * 3..][..size * 3];
            for x in 0..size {
                let source = if flip { size - 1 - x } else { x };
                let pixel = &row[source * 3..source * 3 + 3];
                for c in 0..3 {
                    out[c * plane + y * size + x] = self.lut[c][pixel[c] as usize];
                }
            }
        }
    }
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.samples.len()
    }

    fn classes(&self) -> &[String] {
        &self.classes
    }

    fn shape(&self) -> [usize; 3] {
        [3, self.size, self.size]
    }

    fn load(
        &self,
        index: usize,
        augment: Option<&mut Rng>,
        out: &mut [f32],
    ) -> Result<u32, DataError> {
        let (path, label) = self.samples.get(index).ok_or_else(|| {
            DataError::Invalid(format!(
                "sample {index} is out of range: `{}` has {} images",
                self.split_dir.display(),
                self.samples.len()
            ))
        })?;
        let size = self.size;
        if out.len() != 3 * size * size {
            return Err(DataError::Invalid(format!(
                "output buffer holds {} values, a 3x{size}x{size} image needs {}",
                out.len(),
                3 * size * size
            )));
        }
        let image = self.image(index, path)?;
        let side = size as u32;
        match augment {
            Some(rng) => {
                let (x, y, w, h) = random_resized_crop(image.width(), image.height(), rng);
                let flip = rng.random_bool(0.5);
                let view = imageops::crop_imm(&*image, x, y, w, h);
                let crop = resize(&*view, side, side);
                self.write(&crop, 0, 0, flip, out);
            }
            None => {
                let resized = resize_shorter(&image, resize_side(size), false);
                let (x, y) = (
                    center_offset(resized.width(), side),
                    center_offset(resized.height(), side),
                );
                self.write(&resized, x as usize, y as usize, false, out);
            }
        }
        Ok(*label)
    }
}

/// One image file as the validation split sees it: shorter side resized to
/// [`resize_side`]`(size)`, center `size x size` crop, ImageNet normalisation, `3 x H x W`.
pub fn eval_image(path: &Path, size: usize) -> Result<Vec<f32>, DataError> {
    let image = decode(path).map_err(|message| DataError::File {
        path: path.to_path_buf(),
        message,
    })?;
    let resized = resize_shorter(&image, resize_side(size), false);
    let (x0, y0) = (
        center_offset(resized.width(), size as u32) as usize,
        center_offset(resized.height(), size as u32) as usize,
    );
    let width = resized.width() as usize;
    let mut out = vec![0.0; 3 * size * size];
    for y in 0..size {
        for x in 0..size {
            let pixel = &resized.as_raw()[((y0 + y) * width + x0 + x) * 3..][..3];
            for c in 0..3 {
                out[c * size * size + y * size + x] = normalise(c, pixel[c]);
            }
        }
    }
    Ok(out)
}

/// Decodes an image file (format guessed from its content) into 8-bit RGB.
fn decode(path: &Path) -> Result<RgbImage, String> {
    let reader = open_image(path)?;
    if reader.format().is_none() {
        return Err("not a JPEG or PNG image".to_string());
    }
    let image = reader.decode().map_err(|e| format!("cannot decode: {e}"))?;
    let (width, height) = (image.width(), image.height());
    if width == 0 || height == 0 {
        return Err("the image is empty".to_string());
    }
    if width.max(height) / width.min(height) > MAX_ASPECT {
        return Err(format!(
            "{width}x{height} pixels: the long side is more than {MAX_ASPECT} times the short one"
        ));
    }
    Ok(image.into_rgb8())
}

/// Resizes `image` so that its shorter side is `side` (the longer one truncated, as
/// torchvision does), keeping the aspect ratio. With `shrink_only`, smaller images are
/// returned as they are. An image already of that size is borrowed.
fn resize_shorter(image: &RgbImage, side: usize, shrink_only: bool) -> Cow<'_, RgbImage> {
    let (width, height) = (image.width() as u64, image.height() as u64);
    let (short, long) = (width.min(height), width.max(height));
    let side = side as u64;
    if short == side || (shrink_only && short < side) {
        return Cow::Borrowed(image);
    }
    let new_long = (side * long / short).max(1);
    let (w, h) = if width <= height {
        (side, new_long)
    } else {
        (new_long, side)
    };
    Cow::Owned(resize(image, w as u32, h as u32))
}

/// Offset of a centered window of `inner` pixels in `outer` (rounded half to even, as
/// Python's `round` in torchvision's center crop).
fn center_offset(outer: u32, inner: u32) -> u32 {
    let difference = outer - inner;
    let half = difference / 2;
    if difference % 2 == 1 && half % 2 == 1 {
        half + 1
    } else {
        half
    }
}

/// Draws the crop `(x, y, width, height)` of torchvision's `RandomResizedCrop` from an image
/// of `width x height`: an area fraction uniform in [`CROP_SCALE`] and an aspect ratio
/// log-uniform in [`CROP_RATIO`], up to ten tries, then the largest center crop whose aspect
/// ratio lies in that range.
pub fn random_resized_crop(width: u32, height: u32, rng: &mut Rng) -> (u32, u32, u32, u32) {
    let area = width as f64 * height as f64;
    let (log_low, log_high) = (CROP_RATIO.0.ln(), CROP_RATIO.1.ln());
    for _ in 0..CROP_TRIES {
        let target = area * rng.random_range(CROP_SCALE.0..CROP_SCALE.1);
        let ratio = rng.random_range(log_low..log_high).exp();
        let w = (target * ratio).sqrt().round() as u32;
        let h = (target / ratio).sqrt().round() as u32;
        if w > 0 && h > 0 && w <= width && h <= height {
            let x = rng.random_range(0..=width - w);
            let y = rng.random_range(0..=height - h);
            return (x, y, w, h);
        }
    }
    let aspect = width as f64 / height as f64;
    let (w, h) = if aspect < CROP_RATIO.0 {
        (
            width,
            ((width as f64 / CROP_RATIO.0).round() as u32).clamp(1, height),
        )
    } else if aspect > CROP_RATIO.1 {
        (
            ((height as f64 * CROP_RATIO.1).round() as u32).clamp(1, width),
            height,
        )
    } else {
        (width, height)
    };
    ((width - w) / 2, (height - h) / 2, w, h)
}

/// The class names: the sorted subfolders of `root/train`, at least one.
fn training_classes(root: &Path) -> Result<Vec<String>, DataError> {
    let train_dir = root.join("train");
    let classes = class_folders(&train_dir, "training")?;
    if classes.is_empty() {
        return Err(DataError::File {
            path: train_dir,
            message: "has no class folders: expected one subfolder of images per class".to_string(),
        });
    }
    Ok(classes)
}

/// The class folders of `root/val`: at least one, each a class of `train/`.
fn validation_folders(root: &Path, classes: &[String]) -> Result<Vec<String>, DataError> {
    let split_dir = root.join("val");
    let folders = class_folders(&split_dir, "validation")?;
    if let Some(unknown) = folders.iter().find(|f| classes.binary_search(f).is_err()) {
        return Err(DataError::File {
            path: split_dir.join(unknown),
            message: format!(
                "class `{unknown}` is not among the {} classes of `{}`",
                classes.len(),
                root.join("train").display()
            ),
        });
    }
    if folders.is_empty() {
        return Err(DataError::File {
            path: split_dir,
            message: "has no class folders: expected one subfolder of images per class, \
                      named as in `train/`"
                .to_string(),
        });
    }
    Ok(folders)
}

/// Every image of the class `folders` of `split_dir` with its label (the class's index in
/// `classes`), sorted within each class, and the sorted files that are not images (loose files
/// next to the class folders included). A class folder without images is an error.
fn list_samples(
    split_dir: &Path,
    folders: &[String],
    classes: &[String],
) -> Result<(Vec<Sample>, Vec<PathBuf>), DataError> {
    let mut samples = Vec::new();
    let mut ignored = Vec::new();
    for entry in read_dir(split_dir)? {
        if !entry.is_dir() {
            ignored.push(entry);
        }
    }
    for folder in folders {
        let label = classes.binary_search(folder).expect("class list checked") as u32;
        let dir = split_dir.join(folder);
        let mut images = Vec::new();
        collect_images(&dir, &mut images, &mut ignored)?;
        if images.is_empty() {
            return Err(DataError::File {
                path: dir,
                message: format!(
                    "class folder has no images (expected files ending in .{})",
                    EXTENSIONS.join(", .")
                ),
            });
        }
        images.sort();
        samples.extend(images.into_iter().map(|path| (path, label)));
    }
    ignored.sort();
    Ok((samples, ignored))
}

/// The class folders of `dir` (sorted names), with an error naming `dir` when it is missing.
fn class_folders(dir: &Path, what: &str) -> Result<Vec<String>, DataError> {
    if !dir.is_dir() {
        return Err(DataError::File {
            path: dir.to_path_buf(),
            message: format!("missing: expected the {what} split, one subfolder per class"),
        });
    }
    let mut names: Vec<String> = read_dir(dir)?
        .into_iter()
        .filter(|path| path.is_dir())
        .filter_map(|path| path.file_name().map(|n| n.to_string_lossy().into_owned()))
        .filter(|name| !name.starts_with('.'))
        .collect();
    names.sort();
    Ok(names)
}

/// The entries of `dir`, as paths.
fn read_dir(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let error = |e: std::io::Error| DataError::File {
        path: dir.to_path_buf(),
        message: format!("cannot list: {e}"),
    };
    fs::read_dir(dir)
        .map_err(error)?
        .map(|entry| entry.map(|e| e.path()).map_err(error))
        .collect()
}

/// Collects the image files under `dir` (recursively, not following links to folders, which
/// could loop) into `images`, anything else into `ignored`.
fn collect_images(
    dir: &Path,
    images: &mut Vec<PathBuf>,
    ignored: &mut Vec<PathBuf>,
) -> Result<(), DataError> {
    for path in read_dir(dir)? {
        if path.is_dir() {
            if path.is_symlink() {
                ignored.push(path);
            } else {
                collect_images(&path, images, ignored)?;
            }
        } else if is_image(&path) {
            images.push(path);
        } else {
            ignored.push(path);
        }
    }
    Ok(())
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .is_some_and(|e| EXTENSIONS.contains(&e.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn crops_fit_the_image() {
        let mut rng = Rng::seed_from_u64(7);
        for (width, height) in [(160, 213), (500, 375), (1, 1), (3, 200), (200, 3), (37, 41)] {
            for _ in 0..200 {
                let (x, y, w, h) = random_resized_crop(width, height, &mut rng);
                assert!(w >= 1 && h >= 1, "{width}x{height}: empty crop");
                assert!(
                    x + w <= width && y + h <= height,
                    "{width}x{height}: {x},{y},{w},{h}"
                );
            }
        }
    }

    #[test]
    fn extreme_shapes_fall_back_to_a_center_crop() {
        let mut rng = Rng::seed_from_u64(1);
        // 3x200: no crop of the allowed aspect ratios fits, so the fallback takes the full
        // width and a centered 4-pixel-high window (ratio 3/4).
        assert_eq!(random_resized_crop(3, 200, &mut rng), (0, 98, 3, 4));
        assert_eq!(random_resized_crop(200, 3, &mut rng), (98, 0, 4, 3));
    }

    #[test]
    fn strips_are_refused_before_any_resizing() {
        let dir = std::env::temp_dir().join(format!("zoo-strip-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (w, h, ok) in [
            (1, 65, false),
            (6500, 100, false),
            (1, 64, true),
            (64, 1, true),
        ] {
            let path = dir.join(format!("{w}x{h}.png"));
            RgbImage::new(w, h).save(&path).unwrap();
            let read = eval_image(&path, 32);
            assert_eq!(read.is_ok(), ok, "{w}x{h}: {read:?}");
            if !ok {
                let err = read.unwrap_err().to_string();
                assert!(err.contains(&format!("{w}x{h} pixels")), "{err}");
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_jpeg_bomb_is_refused_from_its_header() {
        // 773 bytes declaring 2316 x 65280 pixels (found by the fuzz campaign).
        let bomb = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/jpeg-bomb-2316x65280.jpg");
        let started = std::time::Instant::now();
        let err = eval_image(&bomb, 32).unwrap_err().to_string();
        assert!(err.contains("jpeg-bomb"), "{err}");
        let err = crate::data::fashion_mnist::eval_image(&bomb, 32)
            .unwrap_err()
            .to_string();
        assert!(err.contains("jpeg-bomb"), "{err}");
        assert!(
            started.elapsed().as_secs_f64() < 1.0,
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn a_25_megapixel_jpeg_is_read_by_both_preprocessings() {
        // 688 bytes declaring 8201 x 3072 pixels, within the decoded-size bound (found by the
        // fuzz campaign: the direct resize took over 10 s under the sanitizer).
        let photo =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/jpeg-8201x3072.jpg");
        assert_eq!(eval_image(&photo, 32).unwrap().len(), 3 * 32 * 32);
        let gray = crate::data::fashion_mnist::eval_image(&photo, 32).unwrap();
        assert_eq!(gray.len(), 32 * 32);
    }

    #[test]
    fn a_large_image_shrinks_through_box_averages_to_the_same_picture() {
        // A smooth picture with detail at every scale the target keeps: 2000 x 1200 to 32 x 24
        // goes through a 128 x 96 box average; the direct filter's result differs little.
        let big = RgbImage::from_fn(2000, 1200, |x, y| {
            let (u, v) = (x as f64 / 2000.0, y as f64 / 1200.0);
            let wave = |f: f64, p: f64| (127.5 + 127.5 * (f * u + p * v).sin()) as u8;
            image::Rgb([wave(7.0, 3.0), wave(2.0, 9.0), wave(11.0, 5.0)])
        });
        let (fast, direct) = (resize(&big, 32, 24), imageops::resize(&big, 32, 24, FILTER));
        assert_eq!(fast.dimensions(), (32, 24));
        let diffs: Vec<f64> = fast
            .as_raw()
            .iter()
            .zip(direct.as_raw())
            .map(|(&a, &b)| (a as f64 - b as f64).abs())
            .collect();
        let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
        let worst = diffs.iter().fold(0f64, |m, &d| m.max(d));
        assert!(
            mean < 1.5 && worst < 8.0,
            "mean {mean}, worst {worst} of 255"
        );
        // Within the factor, the filter alone.
        assert_eq!(
            resize(&big, 600, 400),
            imageops::resize(&big, 600, 400, FILTER)
        );
    }

    #[test]
    fn center_offsets_round_half_to_even() {
        assert_eq!(center_offset(30, 16), 7);
        assert_eq!(center_offset(19, 16), 2); // 1.5 -> 2
        assert_eq!(center_offset(21, 16), 2); // 2.5 -> 2
        assert_eq!(center_offset(16, 16), 0);
    }

    #[test]
    fn validation_resize_side() {
        assert_eq!(resize_side(224), 256);
        assert_eq!(resize_side(128), 146);
        assert_eq!(resize_side(16), 18);
    }
}

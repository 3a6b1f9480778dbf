//! Datasets and the batch loader used by training and evaluation.
//!
//! A [`Dataset`] turns a sample index into a normalised `C x H x W` image and its label,
//! optionally augmented with a random generator. The [`Loader`] walks a dataset in a given
//! order on worker threads and hands out [`Batch`]es ahead of the model, so that the model
//! never waits on decoding. Randomness is derived from `(seed, epoch, position)` only, which
//! makes an epoch's batches identical whether it runs straight through or resumes mid-way.

pub mod fashion_mnist;
pub mod fetch;
pub mod folder;

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;

use rand::seq::SliceRandom;
use rand::SeedableRng;

pub use fashion_mnist::FashionMnist;

/// The random generator handed to [`Dataset::load`] for augmentation.
pub type Rng = rand::rngs::StdRng;

/// Errors of datasets and downloads.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A dataset file or folder is missing, unreadable or malformed.
    #[error("`{path}`: {message}")]
    File {
        /// The file or folder.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A setting does not fit the dataset (for example an input size it cannot produce).
    #[error("{0}")]
    Invalid(String),
    /// One sample cannot be decoded; the loader counts and reports it as a skip.
    #[error("skipped `{path}`: {message}")]
    Sample {
        /// The sample's file.
        path: PathBuf,
        /// Why it cannot be used.
        message: String,
    },
}

/// Which part of a dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// The training images (augmented during training).
    Train,
    /// The held-out images used for validation and test accuracy.
    Validation,
}

/// A labelled image dataset, indexable and shareable between worker threads.
pub trait Dataset: Send + Sync {
    /// Number of samples.
    fn len(&self) -> usize;

    /// Whether there are no samples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Class names, indexed by label.
    fn classes(&self) -> &[String];

    /// The produced image shape `[channels, height, width]`.
    fn shape(&self) -> [usize; 3];

    /// Writes sample `index` as a normalised `C x H x W` image into `out` (of length
    /// `C*H*W`) and returns its label. With `augment`, applies the training augmentation
    /// drawn from that generator; without, the deterministic validation transform.
    fn load(
        &self,
        index: usize,
        augment: Option<&mut Rng>,
        out: &mut [f32],
    ) -> Result<u32, DataError>;
}

/// A batch of images (`len x C x H x W`, row-major) and their labels.
#[derive(Debug)]
pub struct Batch {
    /// Normalised pixels, `labels.len() * C * H * W` values.
    pub images: Vec<f32>,
    /// One label per image.
    pub labels: Vec<u32>,
    /// Samples of this batch that could not be decoded and were left out.
    pub skipped: Vec<DataError>,
}

/// The order in which an epoch visits the samples: a permutation drawn from `(seed, epoch)`.
pub fn shuffled_order(len: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    order.shuffle(&mut Rng::seed_from_u64(mix(seed, epoch, u64::MAX)));
    order
}

/// The augmentation generator of the sample at `position` of an epoch.
pub fn sample_rng(seed: u64, epoch: u64, position: u64) -> Rng {
    Rng::seed_from_u64(mix(seed, epoch, position))
}

/// Mixes three words into one seed (SplitMix64 finaliser over a running combination).
fn mix(a: u64, b: u64, c: u64) -> u64 {
    let mut z = 0x9E37_79B9_7F4A_7C15u64;
    for word in [a, b, c] {
        z = (z ^ word).wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
    }
    z
}

/// Settings of a [`Loader`].
#[derive(Clone, Debug)]
pub struct LoaderOptions {
    /// Images per batch (the last batch of an epoch may be smaller unless `drop_last`).
    pub batch_size: usize,
    /// Leave out a final partial batch.
    pub drop_last: bool,
    /// `Some((seed, epoch))` augments every sample with [`sample_rng`]; `None` does not.
    pub augment: Option<(u64, u64)>,
    /// Decoding threads.
    pub workers: usize,
    /// Batches prepared ahead of the consumer.
    pub prefetch: usize,
}

/// Walks `order` in batches on worker threads. Iterating yields the batches in order,
/// starting at batch `start`; dropping the loader stops the workers. A sample that fails with
/// [`DataError::Sample`] is left out of its batch and listed in [`Batch::skipped`]; any other
/// error ends the iteration with that error.
pub struct Loader {
    receivers: Vec<mpsc::Receiver<Result<Batch, DataError>>>,
    start: usize,
    next: usize,
    batches: usize,
    _workers: Vec<std::thread::JoinHandle<()>>,
}

impl Loader {
    /// Starts workers that prepare the batches `start..` of `order`.
    pub fn new(
        dataset: Arc<dyn Dataset>,
        order: Vec<usize>,
        start: usize,
        options: &LoaderOptions,
    ) -> Loader {
        let batch_size = options.batch_size.max(1);
        let batches = if options.drop_last {
            order.len() / batch_size
        } else {
            order.len().div_ceil(batch_size)
        };
        let workers = options.workers.max(1);
        let order = Arc::new(order);
        let mut receivers = Vec::with_capacity(workers);
        let mut handles = Vec::with_capacity(workers);
        // Worker w prepares batches start+w, start+w+workers, ...; each has its own bounded
        // channel, so the consumer reads them back in order and nobody runs far ahead.
        let depth = options.prefetch.div_ceil(workers).max(1);
        for w in 0..workers {
            let (sender, receiver) = mpsc::sync_channel(depth);
            receivers.push(receiver);
            let (dataset, order, augment) = (dataset.clone(), order.clone(), options.augment);
            handles.push(std::thread::spawn(move || {
                let mut b = start + w;
                while b < batches {
                    let positions = b * batch_size..((b + 1) * batch_size).min(order.len());
                    let batch = assemble(&*dataset, &order, positions, augment);
                    let failed = batch.is_err();
                    if sender.send(batch).is_err() || failed {
                        return;
                    }
                    b += workers;
                }
            }));
        }
        Loader {
            receivers,
            start,
            next: start,
            batches,
            _workers: handles,
        }
    }

    /// Number of batches in the whole order (including those before `start`).
    pub fn batches(&self) -> usize {
        self.batches
    }
}

impl Iterator for Loader {
    type Item = Result<Batch, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.batches {
            return None;
        }
        let receiver = &self.receivers[(self.next - self.start) % self.receivers.len()];
        let batch = receiver.recv().ok()?;
        // An error ends the iteration: later batches of other workers are not handed out.
        self.next = if batch.is_err() {
            self.batches
        } else {
            self.next + 1
        };
        Some(batch)
    }
}

fn assemble(
    dataset: &dyn Dataset,
    order: &[usize],
    positions: std::ops::Range<usize>,
    augment: Option<(u64, u64)>,
) -> Result<Batch, DataError> {
    let [c, h, w] = dataset.shape();
    let size = c * h * w;
    let mut images = vec![0f32; positions.len() * size];
    let mut labels = Vec::with_capacity(positions.len());
    let mut skipped = Vec::new();
    for position in positions {
        let slot = labels.len();
        let out = &mut images[slot * size..(slot + 1) * size];
        let mut rng = augment.map(|(seed, epoch)| sample_rng(seed, epoch, position as u64));
        match dataset.load(order[position], rng.as_mut(), out) {
            Ok(label) => labels.push(label),
            Err(e @ DataError::Sample { .. }) => skipped.push(e),
            Err(e) => return Err(e),
        }
    }
    images.truncate(labels.len() * size);
    Ok(Batch {
        images,
        labels,
        skipped,
    })
}

//! What the binarizers of a trained model do on real images: for every binarized activation,
//! the share of +1 outputs, how it spreads over channels, channels stuck at one sign, and LAB's
//! `beta`. A binarizer that gives almost only +1 or -1 carries little information; comparing
//! a sign model with its LAB twin layer by layer shows where LAB keeps more.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::data::Dataset;
use crate::layers::Binarizer;
use crate::{Error, Network};

/// One binarized activation, over the images seen.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BinarizerStats {
    /// The layer whose input (or, for a `binarize` layer, output) it is.
    pub layer: String,
    /// `sign`, `approx_sign`, `swish_sign` or `lab`.
    pub binarizer: &'static str,
    /// Channels.
    pub channels: usize,
    /// Height and width of the binarized map: LAB's 3x3 window sees a neighbourhood only
    /// where they exceed 1.
    pub map: [usize; 2],
    /// Share of +1 over all images, channels and pixels.
    pub plus: f64,
    /// The smallest, median and largest share of +1 of a channel.
    pub channel_plus: [f64; 3],
    /// Channels whose output was the same sign at every pixel of every image.
    pub constant_channels: usize,
    /// LAB's learnt `beta`.
    pub beta: Option<f64>,
}

/// Per-channel counts of +1 and of values, for one layer.
struct Counts {
    binarizer: &'static str,
    map: [usize; 2],
    beta: Option<f64>,
    plus: Vec<f64>,
    total: f64,
}

/// Runs `network` in inference mode on the first `images` images of `dataset` (all when
/// fewer), `batch` at a time, and gathers the statistics of every binarizer, in network order.
pub fn binarizer_statistics(
    network: &Network,
    dataset: &Arc<dyn Dataset>,
    images: usize,
    batch: usize,
) -> Result<Vec<BinarizerStats>, Error> {
    let shape = dataset.shape();
    let size: usize = shape.iter().product();
    let images = images.min(dataset.len());
    if images == 0 {
        return Err(Error::Train("no image to inspect the binarizers on".into()));
    }
    let mut order: Vec<String> = Vec::new();
    let mut counts: HashMap<String, Counts> = HashMap::new();
    for start in (0..images).step_by(batch.max(1)) {
        let n = batch.max(1).min(images - start);
        let mut pixels = vec![0f32; n * size];
        for (i, out) in pixels.chunks_mut(size).enumerate() {
            dataset.load(start + i, None, out)?;
        }
        let xs = Tensor::from_vec(pixels, (n, shape[0], shape[1], shape[2]), &Device::Cpu)?;
        network.forward_observed(&xs, false, &mut |layer, binarizer, _, ys| {
            let (n, c, h, w) = ys.dims4()?;
            let plus = ys.ge(0f32)?.to_dtype(DType::F32)?.sum((0, 2, 3))?;
            let plus = plus.to_vec1::<f32>()?;
            let entry = counts.entry(layer.to_string()).or_insert_with(|| {
                order.push(layer.to_string());
                Counts {
                    binarizer: binarizer.name(),
                    map: [h, w],
                    beta: match binarizer {
                        Binarizer::Lab(lab) => lab
                            .beta()
                            .flatten_all()
                            .and_then(|b| b.get(0))
                            .and_then(|b| b.to_scalar::<f32>())
                            .ok()
                            .map(f64::from),
                        _ => None,
                    },
                    plus: vec![0.0; c],
                    total: 0.0,
                }
            });
            for (sum, p) in entry.plus.iter_mut().zip(plus) {
                *sum += p as f64;
            }
            entry.total += (n * h * w) as f64;
            Ok(())
        })?;
    }
    Ok(order
        .into_iter()
        .map(|layer| {
            let c = &counts[&layer];
            let mut shares: Vec<f64> = c.plus.iter().map(|p| p / c.total).collect();
            let plus = shares.iter().sum::<f64>() / shares.len() as f64;
            let constant_channels = shares.iter().filter(|&&s| s == 0.0 || s == 1.0).count();
            shares.sort_by(f64::total_cmp);
            BinarizerStats {
                binarizer: c.binarizer,
                channels: shares.len(),
                map: c.map,
                plus,
                channel_plus: [
                    shares[0],
                    shares[shares.len() / 2],
                    shares[shares.len() - 1],
                ],
                constant_channels,
                beta: c.beta,
                layer,
            }
        })
        .collect())
}

//! Max pooling of a packed ±1 map.

use super::{word_mask, PackedMap};
use rayon::prelude::*;

/// Max pooling of a ±1 map: the maximum of ±1 values is `-1` only where every value is `-1`,
/// so each output word is the bit AND of the window taps inside the image.
///
/// `size` and `stride` are `[height, width]`; `pads` (`[top, bottom, left, right]`, e.g.
/// TensorFlow's SAME padding) only shape the output, `floor((height + top + bottom - size) /
/// stride) + 1` rows (0 where the window does not fit) and the same for columns; padded
/// positions are ignored, as in TensorFlow's max pooling. A window with no tap inside the image
/// gives `-1`. Rows run in parallel on the current rayon pool.
///
/// # Panics
/// If a stride is 0.
pub fn max_pool(
    input: &PackedMap,
    size: [usize; 2],
    stride: [usize; 2],
    pads: [usize; 4],
) -> PackedMap {
    assert!(
        stride[0] > 0 && stride[1] > 0,
        "max_pool: strides must be at least 1"
    );
    let [top, bottom, left, right] = pads;
    let out_size = |n: usize, k: usize, s: usize| if n < k { 0 } else { (n - k) / s + 1 };
    let oh = out_size(input.height + top + bottom, size[0], stride[0]);
    let ow = out_size(input.width + left + right, size[1], stride[1]);
    let mut out = PackedMap::zeros(oh, ow, input.channels);
    let words = input.words;
    if out.data.is_empty() {
        return out;
    }
    let full: Vec<u64> = (0..words).map(|k| word_mask(input.channels, k)).collect();
    // The input rows or columns inside the window starting at padded position `start`.
    let clip = |start: usize, k: usize, pad: usize, n: usize| {
        start.saturating_sub(pad).min(n)..(start + k).saturating_sub(pad).min(n)
    };
    out.data
        .par_chunks_mut(ow * words)
        .enumerate()
        .for_each(|(oy, row)| {
            let rows = clip(oy * stride[0], size[0], top, input.height);
            for (ox, px) in row.chunks_exact_mut(words).enumerate() {
                let cols = clip(ox * stride[1], size[1], left, input.width);
                px.copy_from_slice(&full);
                for y in rows.clone() {
                    let src =
                        &input.data[(y * input.width + cols.start) * words..][..cols.len() * words];
                    for tap in src.chunks_exact(words) {
                        for (d, &s) in px.iter_mut().zip(tap) {
                            *d &= s;
                        }
                    }
                }
            }
        });
    out
}

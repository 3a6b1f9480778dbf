//! Max pooling of a packed ±1 map.

use super::{word_mask, PackedMap, Window};
use rayon::prelude::*;

/// Max pooling of a ±1 map: the maximum of ±1 values is `-1` only where every value is `-1`,
/// so each output word is the bit AND of the window taps inside the image.
///
/// The window's padding (e.g. TensorFlow's SAME padding) only shapes the output
/// ([`Window::output`]); padded positions are ignored, as in TensorFlow's max pooling. A window
/// with no tap inside the image gives `-1`. Rows run in parallel on the current rayon pool.
///
/// # Panics
/// If a stride is 0.
pub fn max_pool(input: &PackedMap, window: Window) -> PackedMap {
    let Window {
        kernel: size,
        stride,
        pads: [top, _, left, _],
    } = window;
    let (oh, ow) = window.output(input.height, input.width);
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

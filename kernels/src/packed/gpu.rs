//! What the GPU's packed kernels (`kernels/cuda/packed.cu`) read, laid out on the host: maps
//! as `u32` words, and a binary convolution's filters as the columns of its tensor-core
//! product with their bit counts. Plain data, built and checked without a GPU; the `cuda`
//! feature uploads it (`packed::cuda`).

use super::{PackedConvWeights, PackedMap};

/// Bits of one reduction step of the tensor cores (`mma.m16n8k256`), in `u32` words.
pub const CHUNK_WORDS: usize = 8;

/// Filters are padded to a multiple of the output channels one block computes.
pub const FILTER_BLOCK: usize = 32;

/// A map's `u64` words as the GPU reads them: each word as two `u32` words, the low half
/// first (channels `64 k .. 64 k + 32`, then the rest), so that channel `c` is bit `c % 32` of
/// `u32` word `c / 32`.
pub fn map_words(words: &[u64]) -> Vec<u32> {
    words
        .iter()
        .flat_map(|&w| [w as u32, (w >> 32) as u32])
        .collect()
}

/// The inverse of [`map_words`].
///
/// # Panics
/// If `words` has an odd length.
pub fn words_from_gpu(words: &[u32]) -> Vec<u64> {
    assert!(
        words.len().is_multiple_of(2),
        "words_from_gpu: an odd number of words"
    );
    words
        .chunks_exact(2)
        .map(|w| u64::from(w[0]) | u64::from(w[1]) << 32)
        .collect()
}

/// A binary convolution's filters as the tensor-core kernel reads them.
#[derive(Clone, Debug, PartialEq)]
pub struct ConvLayout {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Kernel height and width.
    pub kernel: [usize; 2],
    /// `u32` words per pixel of the input (twice the CPU's `u64` words).
    pub words: usize,
    /// 256-bit steps of the reduction over `(tap, word)`: `ceil(taps * words / 8)`.
    pub chunks: usize,
    /// Filters, `[out_padded][chunks * 8]`: word `t * words + q` of filter `o` is word `q` of
    /// its tap `t`; zeros past the taps and for the filters added up to a multiple of
    /// [`FILTER_BLOCK`].
    pub filters: Vec<u32>,
    /// The number of -1 bits of each filter, `[out_channels]`.
    pub filter_popc: Vec<i32>,
    /// `sum_c w_c` of each tap of each filter, `[out_channels][taps]`: what a tap that reads
    /// the padding adds when the padded input is read as +1, subtracted for zero padding.
    pub tap_sums: Vec<i32>,
}

impl ConvLayout {
    /// The layout of `weights`.
    pub fn new(weights: &PackedConvWeights) -> Self {
        let taps = weights.kernel[0] * weights.kernel[1];
        let words = 2 * weights.words;
        let chunks = (taps * words).div_ceil(CHUNK_WORDS);
        let row = chunks * CHUNK_WORDS;
        let padded = weights.out_channels.div_ceil(FILTER_BLOCK) * FILTER_BLOCK;
        let mut filters = vec![0u32; padded * row];
        let mut filter_popc = Vec::with_capacity(weights.out_channels);
        let mut tap_sums = Vec::with_capacity(weights.out_channels * taps);
        let per_filter = taps * weights.words;
        for o in 0..weights.out_channels {
            let filter = map_words(&weights.data[o * per_filter..(o + 1) * per_filter]);
            filters[o * row..o * row + filter.len()].copy_from_slice(&filter);
            filter_popc.push(filter.iter().map(|w| w.count_ones() as i32).sum());
            for t in 0..taps {
                let tap = &filter[t * words..(t + 1) * words];
                let negatives: i32 = tap.iter().map(|w| w.count_ones() as i32).sum();
                tap_sums.push(weights.in_channels as i32 - 2 * negatives);
            }
        }
        ConvLayout {
            in_channels: weights.in_channels,
            out_channels: weights.out_channels,
            kernel: weights.kernel,
            words,
            chunks,
            filters,
            filter_popc,
            tap_sums,
        }
    }

    /// The filters padded to a multiple of [`FILTER_BLOCK`].
    pub fn padded_filters(&self) -> usize {
        self.filters.len() / (self.chunks * CHUNK_WORDS).max(1)
    }
}

/// A batch of maps of one shape as the GPU reads them: the maps' words one after another.
///
/// # Panics
/// If the maps' shapes differ.
pub fn batch_words(maps: &[PackedMap]) -> Vec<u32> {
    if let Some(first) = maps.first() {
        let shape = (first.height, first.width, first.channels);
        assert!(
            maps.iter()
                .all(|m| (m.height, m.width, m.channels) == shape),
            "batch_words: maps of different shapes"
        );
    }
    maps.iter().flat_map(|m| map_words(&m.data)).collect()
}

/// One per-channel transform of a layer's output (the engine's channel ops), as the GPU
/// kernels apply it (`channel_ops` of `common.cuh`): parameters per output channel.
#[derive(Clone, Copy, Debug)]
pub enum EpilogueOp<'a> {
    /// `v * mul[c] + add[c]`, the product rounded before the sum.
    Affine {
        /// Multipliers.
        mul: &'a [f32],
        /// Offsets.
        add: &'a [f32],
    },
    /// `v * mul[c]`.
    Scale(&'a [f32]),
    /// `v + add[c]`.
    Add(&'a [f32]),
    /// `max(v, 0)`.
    Relu,
    /// `v` where positive, else `alpha[c] * v`.
    PRelu(&'a [f32]),
}

/// A list of [`EpilogueOp`]s as the GPU reads it: a kind and a parameter offset per op, all
/// parameters in one array.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EpilogueProgram {
    /// Output channels.
    pub channels: usize,
    /// The kind of each op (`OP_AFFINE` .. `OP_PRELU` of `common.cuh`).
    pub kinds: Vec<i32>,
    /// Where each op's parameters start in `params`.
    pub offsets: Vec<i32>,
    /// The parameters, op after op (an affine op's multipliers, then its offsets).
    pub params: Vec<f32>,
}

impl EpilogueProgram {
    /// `ops` for `channels` output channels.
    ///
    /// # Panics
    /// If an op's parameters are not one per channel.
    pub fn new(channels: usize, ops: &[EpilogueOp]) -> Self {
        let mut program = EpilogueProgram {
            channels,
            ..Default::default()
        };
        for op in ops {
            let (kind, params): (i32, Vec<&[f32]>) = match *op {
                EpilogueOp::Affine { mul, add } => (0, vec![mul, add]),
                EpilogueOp::Scale(mul) => (1, vec![mul]),
                EpilogueOp::Add(add) => (2, vec![add]),
                EpilogueOp::Relu => (3, vec![]),
                EpilogueOp::PRelu(alpha) => (4, vec![alpha]),
            };
            program.kinds.push(kind);
            program.offsets.push(program.params.len() as i32);
            for p in params {
                assert_eq!(
                    p.len(),
                    channels,
                    "EpilogueProgram: one parameter per channel"
                );
                program.params.extend_from_slice(p);
            }
        }
        program
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::Rng;
    use super::super::{binary_conv, ConvGeometry, PadValue};
    use super::*;

    /// The arithmetic of `binary_conv_mma` on the CPU: the dots of `n` images of `height x
    /// width` (`input`, their `u32` words), `[n][oh][ow][out_channels]`, from `popc(a & b)`,
    /// `popc(a)` and `filter_popc` over the padded reduction, then the zero padding's
    /// correction from `tap_sums`. Equal to the CPU kernel's dots, it leaves a GPU run only the
    /// kernel's own indexing to test.
    fn dots_like_the_gpu(
        layout: &ConvLayout,
        input: &[u32],
        n: usize,
        [height, width]: [usize; 2],
        geometry: &ConvGeometry,
    ) -> Vec<i32> {
        let [kh, kw] = layout.kernel;
        let (oh, ow) = geometry.output_size(height, width, layout.kernel);
        let [top, _, left, _] = geometry.pads;
        let row = layout.chunks * CHUNK_WORDS;
        let k_bits = (layout.in_channels * kh * kw) as i32;
        let mut dots = Vec::with_capacity(n * oh * ow * layout.out_channels);
        for img in 0..n {
            for oy in 0..oh {
                for ox in 0..ow {
                    let y0 = (oy * geometry.stride[0]) as isize - top as isize;
                    let x0 = (ox * geometry.stride[1]) as isize - left as isize;
                    let inside = |t: usize| {
                        let (y, x) = (y0 + (t / kw) as isize, x0 + (t % kw) as isize);
                        (0..height as isize).contains(&y) && (0..width as isize).contains(&x)
                    };
                    let word = |k: usize| {
                        let (t, q) = (k / layout.words.max(1), k % layout.words.max(1));
                        if t >= kh * kw || !inside(t) {
                            return 0;
                        }
                        let y = (y0 + (t / kw) as isize) as usize;
                        let x = (x0 + (t % kw) as isize) as usize;
                        input[((img * height + y) * width + x) * layout.words + q]
                    };
                    let window: Vec<u32> = (0..row).map(word).collect();
                    let popc_a: i32 = window.iter().map(|w| w.count_ones() as i32).sum();
                    for o in 0..layout.out_channels {
                        let filter = &layout.filters[o * row..(o + 1) * row];
                        let and: i32 = window
                            .iter()
                            .zip(filter)
                            .map(|(a, b)| (a & b).count_ones() as i32)
                            .sum();
                        let mut dot = k_bits - 2 * (popc_a + layout.filter_popc[o] - 2 * and);
                        if geometry.pad_value == PadValue::Zero {
                            dot -= (0..kh * kw)
                                .filter(|&t| !inside(t))
                                .map(|t| layout.tap_sums[o * kh * kw + t])
                                .sum::<i32>();
                        }
                        dots.push(dot);
                    }
                }
            }
        }
        dots
    }

    #[test]
    fn words_round_trip() {
        let words = [0x0123_4567_89ab_cdef_u64, u64::MAX, 1 << 63];
        let gpu = map_words(&words);
        assert_eq!(
            gpu,
            [0x89ab_cdef, 0x0123_4567, u32::MAX, u32::MAX, 0, 1 << 31]
        );
        assert_eq!(words_from_gpu(&gpu), words);
    }

    /// The ops as the kernels read them: a kind per op (the `OP_*` of `common.cuh`), each
    /// op's parameters at its offset, an affine op's multipliers before its offsets.
    #[test]
    fn epilogue_program_layout() {
        let (mul, add, alpha) = ([1.0, 2.0], [3.0, 4.0], [5.0, 6.0]);
        let program = EpilogueProgram::new(
            2,
            &[
                EpilogueOp::Affine {
                    mul: &mul,
                    add: &add,
                },
                EpilogueOp::Relu,
                EpilogueOp::Scale(&mul),
                EpilogueOp::PRelu(&alpha),
                EpilogueOp::Add(&add),
            ],
        );
        assert_eq!(program.kinds, [0, 3, 1, 4, 2]);
        assert_eq!(program.offsets, [0, 4, 4, 6, 8]);
        assert_eq!(
            program.params,
            [1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 5.0, 6.0, 3.0, 4.0]
        );
        let source = include_str!("../../cuda/common.cuh");
        for (name, kind) in [
            ("OP_AFFINE", 0),
            ("OP_SCALE", 1),
            ("OP_ADD", 2),
            ("OP_RELU", 3),
            ("OP_PRELU", 4),
        ] {
            assert!(
                source.contains(&format!("#define {name} {kind} ")),
                "{name} is not {kind} in common.cuh"
            );
        }
    }

    /// The GPU kernel's arithmetic on its layouts gives the CPU kernel's dots exactly, for
    /// both pad values, strides 1 and 2, asymmetric padding, channel counts around the word
    /// sizes and filter counts that are not multiples of the filter block.
    #[test]
    fn tensor_core_arithmetic_matches_the_cpu_kernel() {
        let mut rng = Rng(7);
        let cases = [
            // (n, h, w, in, out, kernel, stride, pads)
            (1, 5, 7, 1, 1, [3, 3], [1, 1], [1, 1, 1, 1]),
            (2, 6, 5, 31, 7, [3, 3], [2, 2], [1, 1, 1, 1]),
            (1, 7, 7, 33, 33, [3, 3], [1, 1], [1, 1, 1, 1]),
            (3, 4, 6, 64, 40, [3, 3], [2, 1], [0, 1, 1, 0]),
            (1, 5, 5, 65, 9, [1, 1], [1, 1], [0, 0, 0, 0]),
            (2, 9, 8, 130, 3, [3, 3], [2, 2], [0, 1, 0, 1]),
            (1, 3, 3, 200, 65, [2, 3], [1, 1], [1, 0, 2, 0]),
            (1, 2, 2, 96, 5, [3, 3], [1, 1], [2, 2, 2, 2]),
        ];
        for (n, h, w, cin, cout, kernel, stride, pads) in cases {
            let weights = PackedConvWeights::from_signs(
                &rng.signs(cout * cin * kernel[0] * kernel[1]),
                cout,
                cin,
                kernel,
            );
            let layout = ConvLayout::new(&weights);
            assert_eq!(layout.padded_filters() % FILTER_BLOCK, 0);
            let maps: Vec<PackedMap> = (0..n)
                .map(|_| PackedMap::from_signs(&rng.signs(h * w * cin), h, w, cin))
                .collect();
            let input = batch_words(&maps);
            for pad_value in [PadValue::Zero, PadValue::One] {
                let geometry = ConvGeometry {
                    stride,
                    pads,
                    pad_value,
                };
                let (oh, ow) = geometry.output_size(h, w, kernel);
                let mut expected = vec![0i32; n * oh * ow * cout];
                for (map, out) in maps
                    .iter()
                    .zip(expected.chunks_mut((oh * ow * cout).max(1)))
                {
                    binary_conv(map, &weights, &geometry, out, |_, dots, row| {
                        row.copy_from_slice(dots)
                    });
                }
                let gpu = dots_like_the_gpu(&layout, &input, n, [h, w], &geometry);
                assert_eq!(
                    gpu, expected,
                    "{n}x{h}x{w}x{cin} -> {cout}, {kernel:?}, {stride:?}, {pads:?}, {pad_value:?}"
                );
            }
        }
    }
}

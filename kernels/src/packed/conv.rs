//! The binary convolution: the driver shared by every variant, and the portable kernel.
//!
//! The dot product of a ±1 patch `x` and a ±1 filter `w` of `n` bits is `n - 2 popcount(x ^ w)`.
//! The input is copied once per call into a padded map whose pad bits are 0 (+1), so that the
//! patch of output pixel `(oy, ox)` is `kh` contiguous segments of `kw * words` words
//! (padded rows `oy * sy + ky`, from column `ox * sx`), matching the filter's layout
//! `[ky][kx][words]`. Every output pixel then counts `kh * kw * in_channels` bits, which is
//! exact for [`PadValue::One`]; for [`PadValue::Zero`] the border pixels subtract what their
//! padded taps added, `sum_c w_c = in_channels - 2 popcount(w_tap)` per tap and filter.
//!
//! The kernels compute tiles of a few output pixels times a few output channels, keeping the
//! counts in registers; the SIMD variants hold the filters transposed so that one vector holds
//! the same word of `LANES` consecutive filters (`[block][word][lane]`), XORed with the input
//! word broadcast to every lane.

use super::lab::LabScorer;
use super::{
    pack_signs, words_for, ConvGeometry, LabKernel, PackedConvWeights, PackedMap, PadValue, Variant,
};
use rayon::prelude::*;
use std::borrow::Cow;
use std::ops::Range;

/// Binary convolution: for every output pixel and output channel, the exact integer
/// dot = sum over the kernel taps inside the padded input of (x * w) where x, w are ±1, with
/// padded positions contributing 0 ([`PadValue::Zero`]: exact zero padding, computed with a
/// correction term for border pixels) or x = +1 ([`PadValue::One`]).
///
/// `out` holds `oh` rows of `out.len() / oh` elements ([`ConvGeometry::output_size`] gives
/// `(oh, ow)`); for each output row `oy` the kernel computes the dots of that row
/// (`ow * out_channels` i32, pixel-major: `dots[ox * out_channels + o]`) and calls
/// `epilogue(oy, &dots, row_of_out)`. Rows run in parallel on the current rayon pool, in no
/// particular order; where the rows are few for the pool's threads (small maps), the channels
/// of each row are split into groups computed in parallel too, before its epilogue.
///
/// This lays out the weights on every call; [`BinaryConv`] does it once for many calls and
/// also binarizes float inputs on the fly.
///
/// # Panics
/// If the input and weight channels differ, or `out.len()` is not a multiple of `oh`.
pub fn binary_conv<T: Send>(
    input: &PackedMap,
    weights: &PackedConvWeights,
    geometry: &ConvGeometry,
    out: &mut [T],
    epilogue: impl Fn(usize, &[i32], &mut [T]) + Sync,
) {
    BinaryConv::new(weights, *geometry).run(ConvInput::Packed(input), out, epilogue)
}

/// [`binary_conv`] with the kernel `variant`, which must be available.
#[cfg(test)]
pub(super) fn conv_with<T: Send>(
    variant: Variant,
    input: &PackedMap,
    weights: &PackedConvWeights,
    geometry: &ConvGeometry,
    out: &mut [T],
    epilogue: impl Fn(usize, &[i32], &mut [T]) + Sync,
) {
    BinaryConv::with_variant(variant, weights, *geometry).run(
        ConvInput::Packed(input),
        out,
        epilogue,
    )
}

/// What a [`BinaryConv`] convolves: signs already packed, or an NHWC float image binarized on
/// the fly, row by row, straight into the padded input of the kernel.
#[derive(Clone, Copy, Debug)]
pub enum ConvInput<'a> {
    /// Packed signs.
    Packed(&'a PackedMap),
    /// Floats (`height * width * in_channels`) binarized with [`PackedMap::from_signs`]'s sign.
    Signs {
        /// The values, NHWC.
        x: &'a [f32],
        /// Rows of the image.
        height: usize,
        /// Columns of the image.
        width: usize,
    },
    /// Floats (`height * width * in_channels`) binarized with LAB, as [`super::lab_pack`].
    Lab {
        /// The values, NHWC.
        x: &'a [f32],
        /// Rows of the image.
        height: usize,
        /// Columns of the image.
        width: usize,
        /// LAB's weights, for `in_channels` channels.
        lab: &'a LabKernel,
    },
}

impl ConvInput<'_> {
    /// Rows, columns and channels of the image.
    pub fn dims(&self) -> [usize; 3] {
        match *self {
            ConvInput::Packed(map) => [map.height, map.width, map.channels],
            ConvInput::Signs { x, height, width } => [
                height,
                width,
                x.len().checked_div(height * width).unwrap_or(0),
            ],
            ConvInput::Lab {
                height, width, lab, ..
            } => [height, width, lab.channels()],
        }
    }
}

/// A binary convolution prepared for many calls: the packed weights laid out for the kernel
/// variant in use (and, for zero padding, each filter's per-tap sums for the border
/// correction). [`BinaryConv::run`] computes what [`binary_conv`] does.
#[derive(Clone, Debug)]
pub struct BinaryConv {
    /// The kernel variant.
    variant: Variant,
    /// Input channels.
    in_channels: usize,
    /// Output channels.
    out_channels: usize,
    /// Kernel height and width.
    kernel: [usize; 2],
    /// Stride and padding.
    geometry: ConvGeometry,
    /// The filters, `[block][len][lanes]` (the packed layout itself for one lane), zero-padded
    /// to whole blocks.
    weights: Vec<u64>,
    /// For zero padding with some pad: `sum_c w_c` per `[tap][out channel]`; else empty.
    wsum: Vec<i32>,
}

impl BinaryConv {
    /// Prepares `weights` with `geometry` for the kernel variant in use.
    ///
    /// # Panics
    /// If a stride is 0.
    pub fn new(weights: &PackedConvWeights, geometry: ConvGeometry) -> Self {
        Self::with_variant(Variant::selected(), weights, geometry)
    }

    /// [`BinaryConv::new`] for `variant`, which must be available.
    pub(super) fn with_variant(
        variant: Variant,
        weights: &PackedConvWeights,
        geometry: ConvGeometry,
    ) -> Self {
        debug_assert!(variant.available());
        assert!(
            geometry.stride.iter().all(|&s| s > 0),
            "binary_conv: strides must be at least 1"
        );
        let [kh, kw] = weights.kernel;
        let (oc, words) = (weights.out_channels, weights.words);
        let len = kh * kw * words;
        let lanes = variant.lanes();
        let laid = if lanes == 1 {
            weights.data.clone()
        } else {
            transpose(&weights.data, oc, len, lanes)
        };
        let padding = geometry.pads.iter().any(|&p| p > 0);
        let mut wsum = Vec::new();
        if geometry.pad_value == PadValue::Zero && padding {
            let taps = kh * kw;
            wsum = vec![0i32; taps * oc];
            for o in 0..oc {
                for t in 0..taps {
                    let bits: u32 = weights.data[(o * taps + t) * words..][..words]
                        .iter()
                        .map(|v| v.count_ones())
                        .sum();
                    wsum[t * oc + o] = weights.in_channels as i32 - 2 * bits as i32;
                }
            }
        }
        BinaryConv {
            variant,
            in_channels: weights.in_channels,
            out_channels: oc,
            kernel: weights.kernel,
            geometry,
            weights: laid,
            wsum,
        }
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.out_channels
    }

    /// The output height and width for an input of `height x width`.
    pub fn output_size(&self, height: usize, width: usize) -> (usize, usize) {
        self.geometry.output_size(height, width, self.kernel)
    }

    /// The convolution of `input`, as [`binary_conv`] describes: each output row's dots handed
    /// to `epilogue(oy, dots, row_of_out)`, rows in parallel on the current rayon pool.
    ///
    /// # Panics
    /// If the input's channels are not the weights' input channels (for LAB: the kernel's
    /// channels), a float input's length is not `height * width * channels`, or `out.len()`
    /// is not a multiple of the output rows.
    pub fn run<T: Send>(
        &self,
        input: ConvInput,
        out: &mut [T],
        epilogue: impl Fn(usize, &[i32], &mut [T]) + Sync,
    ) {
        let [h, w, _] = self.check(input);
        self.run_padded(self.pad(input), [h, w], out, epilogue);
    }

    /// [`BinaryConv::run`] on a float image `x` (`height * width * in_channels`, NHWC; signs,
    /// or LAB where `lab` is given) whose output overwrites it: the whole input is binarized
    /// before the first row is computed, so `epilogue(oy, dots, row)` finds in `row` the input's
    /// values at the same pixels (a residual), and no output map is allocated.
    ///
    /// # Panics
    /// As [`BinaryConv::run`], and if the output's shape is not the input's (stride 1 with
    /// "same" padding, as many output channels as input channels).
    pub fn run_in_place(
        &self,
        x: &mut [f32],
        height: usize,
        width: usize,
        lab: Option<&LabKernel>,
        epilogue: impl Fn(usize, &[i32], &mut [f32]) + Sync,
    ) {
        assert!(
            self.output_size(height, width) == (height, width)
                && self.out_channels == self.in_channels,
            "binary_conv: in place needs the output shape of the input"
        );
        let input = match lab {
            None => ConvInput::Signs {
                x: &*x,
                height,
                width,
            },
            Some(lab) => ConvInput::Lab {
                x: &*x,
                height,
                width,
                lab,
            },
        };
        self.check(input);
        let padded = Cow::Owned(self.pad(input).into_owned());
        self.run_padded(padded, [height, width], x, epilogue);
    }

    /// Asserts that `input` fits the weights; returns its dimensions.
    fn check(&self, input: ConvInput) -> [usize; 3] {
        let [h, w, c] = input.dims();
        assert_eq!(
            c, self.in_channels,
            "binary_conv: the input has {c} channels, the weights {}",
            self.in_channels
        );
        if let ConvInput::Signs { x, .. } | ConvInput::Lab { x, .. } = input {
            assert_eq!(
                x.len(),
                h * w * c,
                "binary_conv: expected {h}x{w}x{c} input values"
            );
        }
        [h, w, c]
    }

    /// [`BinaryConv::run`] after [`BinaryConv::pad`].
    fn run_padded<T: Send>(
        &self,
        padded: Cow<[u64]>,
        [h, w]: [usize; 2],
        out: &mut [T],
        epilogue: impl Fn(usize, &[i32], &mut [T]) + Sync,
    ) {
        let (oh, ow) = self.output_size(h, w);
        if oh == 0 {
            return;
        }
        assert!(
            out.len().is_multiple_of(oh),
            "binary_conv: {} output elements do not make {oh} rows",
            out.len()
        );
        let row_len = out.len() / oh;
        let plan = Plan::new(self, padded, [h, w], [oh, ow]);
        let oc = self.out_channels;
        let dots_len = ow * oc;
        // Few rows (small maps, many threads): split each row's channels too.
        let threads = rayon::current_num_threads();
        let groups = if threads > 1 && oh < 4 * threads {
            (4 * threads).div_ceil(oh).min(oc / GROUP_CHANNELS).max(1)
        } else {
            1
        };
        let run = |dots: &mut Vec<i32>, oy: usize, row: &mut [T]| {
            plan.row(oy, dots, groups);
            epilogue(oy, dots, row);
        };
        if row_len == 0 {
            (0..oh)
                .into_par_iter()
                .for_each_init(|| vec![0; dots_len], |dots, oy| run(dots, oy, &mut []));
        } else {
            out.par_chunks_mut(row_len)
                .enumerate()
                .for_each_init(|| vec![0; dots_len], |dots, (oy, row)| run(dots, oy, row));
        }
    }

    /// The input with its padding (pad bits 0), `[h + top + bottom][w + left + right][words]`,
    /// binarizing float inputs row by row in parallel; a packed input without padding as is.
    fn pad<'a>(&self, input: ConvInput<'a>) -> Cow<'a, [u64]> {
        let [h, w, c] = input.dims();
        let [top, bottom, left, right] = self.geometry.pads;
        let words = words_for(c);
        let (ph, pw) = (h + top + bottom, w + left + right);
        if let ConvInput::Packed(map) = input {
            if ph == h && pw == w {
                return Cow::Borrowed(&map.data);
            }
        }
        let mut padded = vec![0u64; ph * pw * words];
        let row = w * words;
        if row == 0 {
            return Cow::Owned(padded);
        }
        let interior = &mut padded[top * pw * words..];
        let rows = |interior| row_slices(interior, pw * words, left * words, row, h);
        match input {
            ConvInput::Packed(map) => rows(interior)
                .zip(map.data.par_chunks(row))
                .for_each(|(dst, src)| dst.copy_from_slice(src)),
            ConvInput::Signs { x, .. } => rows(interior)
                .zip(x.par_chunks(w * c))
                .for_each(|(dst, src)| pack_signs(self.variant, src, c, dst)),
            ConvInput::Lab { x, lab, .. } => {
                LabScorer::new(self.variant, x, h, w, lab).score(interior, pw * words, left * words)
            }
        }
        Cow::Owned(padded)
    }
}

/// The `rows` slices of `len` words at `offset` in each `stride` words of `data`, in parallel.
fn row_slices(
    data: &mut [u64],
    stride: usize,
    offset: usize,
    len: usize,
    rows: usize,
) -> impl IndexedParallelIterator<Item = &mut [u64]> {
    data.par_chunks_mut(stride)
        .take(rows)
        .map(move |r| &mut r[offset..][..len])
}

/// The granularity of the channel groups of a row computed in parallel.
const GROUP_CHANNELS: usize = 32;

/// Everything a row kernel needs for one call.
pub(super) struct Plan<'a> {
    /// The kernel variant.
    variant: Variant,
    /// The input with its padding (pad bits 0), `[ph][pw][words]`.
    pub(super) padded: Cow<'a, [u64]>,
    /// Words per padded row, `pw * words`.
    pub(super) row_stride: usize,
    /// Words per pixel.
    pub(super) words: usize,
    /// Kernel height.
    pub(super) kh: usize,
    /// Kernel width.
    kw: usize,
    /// Vertical stride.
    pub(super) sy: usize,
    /// Horizontal stride.
    pub(super) sx: usize,
    /// Output width.
    pub(super) ow: usize,
    /// Output channels.
    pub(super) oc: usize,
    /// Words of one kernel row, `kw * words`.
    pub(super) seg: usize,
    /// Words of one filter, `kh * seg`.
    pub(super) len: usize,
    /// Bits of one filter, `kh * kw * in_channels`: the dot is `total - 2 popcount`.
    pub(super) total: i32,
    /// The filters as [`BinaryConv`] lays them out.
    pub(super) weights: &'a [u64],
    /// For zero padding with some pad: `sum_c w_c` per `[tap][out channel]`; else empty.
    wsum: &'a [i32],
    /// Input height and width.
    hw: [usize; 2],
    /// Top and left pads.
    top_left: [usize; 2],
}

impl<'a> Plan<'a> {
    /// The plan of `conv` over a padded input of `hw` rows and columns before padding.
    fn new(
        conv: &'a BinaryConv,
        padded: Cow<'a, [u64]>,
        [h, w]: [usize; 2],
        [oh, ow]: [usize; 2],
    ) -> Self {
        let [top, _, left, right] = conv.geometry.pads;
        let words = words_for(conv.in_channels);
        let [kh, kw] = conv.kernel;
        let seg = kw * words;
        let plan = Plan {
            variant: conv.variant,
            padded,
            row_stride: (w + left + right) * words,
            words,
            kh,
            kw,
            sy: conv.geometry.stride[0],
            sx: conv.geometry.stride[1],
            ow,
            oc: conv.out_channels,
            seg,
            len: kh * seg,
            total: (kh * kw * conv.in_channels) as i32,
            weights: &conv.weights,
            wsum: &conv.wsum,
            hw: [h, w],
            top_left: [top, left],
        };
        // The SIMD kernels read without bounds checks: the last patch must end in the input.
        if oh > 0 && ow > 0 {
            let end = plan.patch_offset(oh - 1, ow - 1) + (kh - 1) * plan.row_stride + seg;
            assert!(
                end <= plan.padded.len(),
                "binary_conv: a patch leaves the input"
            );
        }
        plan
    }

    /// The dots of output row `oy` into `dots` (`ow * oc`), split into `groups` channel ranges
    /// computed in parallel where the rows alone are too few to share among the threads.
    fn row(&self, oy: usize, dots: &mut [i32], groups: usize) {
        debug_assert_eq!(dots.len(), self.ow * self.oc);
        let oc = self.oc;
        // Group ranges start at multiples of GROUP_CHANNELS, a multiple of every lane count.
        let range = |g: usize| {
            let start = |g: usize| g * (oc / GROUP_CHANNELS) / groups * GROUP_CHANNELS;
            start(g)..if g + 1 == groups { oc } else { start(g + 1) }
        };
        if groups <= 1 {
            self.channels(oy, dots, 0..oc);
        } else {
            let (_, parts) = rayon::join(
                || self.channels(oy, dots, range(0)),
                || {
                    (1..groups)
                        .into_par_iter()
                        .map(|g| {
                            let mut part = vec![0; self.ow * oc];
                            self.channels(oy, &mut part, range(g));
                            part
                        })
                        .collect::<Vec<_>>()
                },
            );
            for (g, part) in (1..groups).zip(parts) {
                let r = range(g);
                for (d, p) in dots.chunks_exact_mut(oc).zip(part.chunks_exact(oc)) {
                    d[r.clone()].copy_from_slice(&p[r.clone()]);
                }
            }
        }
        self.correct(oy, dots);
    }

    /// The dots of output row `oy` and the output `channels` into `dots` (`ow * oc`), before the
    /// padding correction.
    fn channels(&self, oy: usize, dots: &mut [i32], channels: Range<usize>) {
        match self.variant {
            Variant::Portable => portable_row(self, oy, dots, channels),
            // SAFETY: the plan's variant is available (checked by `conv_with`'s callers).
            #[cfg(target_arch = "x86_64")]
            Variant::Avx2 => unsafe { super::x86::avx2_row(self, oy, dots, channels) },
            #[cfg(target_arch = "x86_64")]
            Variant::Avx512 => unsafe { super::x86::avx512_row(self, oy, dots, channels) },
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("x86 kernels on another architecture"),
        }
    }

    /// Removes what the padded taps of the row's border pixels added, for zero padding.
    fn correct(&self, oy: usize, dots: &mut [i32]) {
        if self.wsum.is_empty() || self.oc == 0 {
            return;
        }
        let outside =
            |start: usize, k: usize, pad: usize, n: usize| start + k < pad || start + k >= pad + n;
        let (y0, [h, w], [top, left]) = (oy * self.sy, self.hw, self.top_left);
        let bad_rows: Vec<bool> = (0..self.kh).map(|ky| outside(y0, ky, top, h)).collect();
        let any_bad_row = bad_rows.iter().any(|&b| b);
        for (ox, px) in dots.chunks_exact_mut(self.oc).enumerate() {
            let x0 = ox * self.sx;
            let bad_col = |kx: usize| outside(x0, kx, left, w);
            if !any_bad_row && x0 >= left && x0 + self.kw <= left + w {
                continue;
            }
            for (ky, &bad_row) in bad_rows.iter().enumerate() {
                for kx in 0..self.kw {
                    if bad_row || bad_col(kx) {
                        let ws = &self.wsum[(ky * self.kw + kx) * self.oc..][..self.oc];
                        for (d, s) in px.iter_mut().zip(ws) {
                            *d -= s;
                        }
                    }
                }
            }
        }
    }

    /// Calls `tile(ox, pixels, block, blocks)` for every tile of a row and the output
    /// `channels` (whose start is a multiple of `lanes`): channel tiles of up to `max_blocks`
    /// blocks of `lanes` filters outside, pixel tiles of up to `max_pixels` inside.
    #[inline(always)]
    pub(super) fn for_each_tile(
        &self,
        channels: Range<usize>,
        lanes: usize,
        max_pixels: usize,
        max_blocks: usize,
        mut tile: impl FnMut(usize, usize, usize, usize),
    ) {
        debug_assert!(channels.start.is_multiple_of(lanes) && channels.end <= self.oc);
        let blocks = channels.end.div_ceil(lanes);
        let mut b = channels.start / lanes;
        while b < blocks {
            let nb = max_blocks.min(blocks - b);
            let mut ox = 0;
            while ox < self.ow {
                let np = max_pixels.min(self.ow - ox);
                tile(ox, np, b, nb);
                ox += np;
            }
            b += nb;
        }
    }

    /// Offset in [`Plan::padded`] of the first word of the patch of output pixel `(oy, ox)`.
    #[inline(always)]
    pub(super) fn patch_offset(&self, oy: usize, ox: usize) -> usize {
        oy * self.sy * self.row_stride + ox * self.sx * self.words
    }
}

impl Variant {
    /// Filters per vector.
    fn lanes(self) -> usize {
        match self {
            Variant::Portable => 1,
            Variant::Avx2 => 4,
            Variant::Avx512 => 8,
        }
    }
}

/// The filters `w` (`[oc][len]`) as `[block][len][lanes]`, the missing filters of the last
/// block zero.
fn transpose(w: &[u64], oc: usize, len: usize, lanes: usize) -> Vec<u64> {
    match lanes {
        4 => transpose_lanes::<4>(w, oc, len),
        8 => transpose_lanes::<8>(w, oc, len),
        _ => unreachable!("no kernel has {lanes} lanes"),
    }
}

/// [`transpose`] for `L` lanes, a block of `L` filters per parallel task.
fn transpose_lanes<const L: usize>(w: &[u64], oc: usize, len: usize) -> Vec<u64> {
    let blocks = oc.div_ceil(L);
    let mut out: Vec<u64> = Vec::with_capacity(blocks * len * L);
    // Every word is written below before the length is set.
    let spare = &mut out.spare_capacity_mut()[..blocks * len * L];
    if len > 0 {
        spare
            .par_chunks_mut(len * L)
            .enumerate()
            .for_each(|(b, block)| {
                let filter = |lane: usize| {
                    let o = b * L + lane;
                    (o < oc).then(|| &w[o * len..][..len])
                };
                let filters: [Option<&[u64]>; L] = std::array::from_fn(filter);
                for (l, dst) in block.chunks_exact_mut(L).enumerate() {
                    for (d, f) in dst.iter_mut().zip(&filters) {
                        d.write(f.map_or(0, |f| f[l]));
                    }
                }
            });
    }
    // SAFETY: the loop above initialised all `blocks * len * L` words.
    unsafe { out.set_len(blocks * len * L) };
    out
}

/// Output pixels per tile of the portable kernel.
const PORTABLE_PIXELS: usize = 4;
/// Output channels per tile of the portable kernel.
const PORTABLE_FILTERS: usize = 4;

/// The portable row kernel.
fn portable_row(plan: &Plan, oy: usize, dots: &mut [i32], channels: Range<usize>) {
    plan.for_each_tile(
        channels,
        1,
        PORTABLE_PIXELS,
        PORTABLE_FILTERS,
        |ox, np, o, no| {
            macro_rules! tile {
            ($($p:literal, $o:literal);*) => {
                match (np, no) {
                    $(($p, $o) => portable_tile::<$p, $o>(plan, oy, ox, o, dots),)*
                    _ => unreachable!(),
                }
            };
        }
            tile!(1, 1; 1, 2; 1, 3; 1, 4; 2, 1; 2, 2; 2, 3; 2, 4;
              3, 1; 3, 2; 3, 3; 3, 4; 4, 1; 4, 2; 4, 3; 4, 4)
        },
    );
}

/// `P` output pixels from `ox` times `O` output channels from `o`, in plain Rust.
#[inline(always)]
fn portable_tile<const P: usize, const O: usize>(
    plan: &Plan,
    oy: usize,
    ox: usize,
    o: usize,
    dots: &mut [i32],
) {
    let seg = plan.seg;
    let base = plan.patch_offset(oy, ox);
    let pstride = plan.sx * plan.words;
    let mut acc = [[0u32; O]; P];
    for ky in 0..plan.kh {
        let xs: [&[u64]; P] = std::array::from_fn(|p| {
            &plan.padded[base + ky * plan.row_stride + p * pstride..][..seg]
        });
        let ws: [&[u64]; O] =
            std::array::from_fn(|f| &plan.weights[(o + f) * plan.len + ky * seg..][..seg]);
        for j in 0..seg {
            for p in 0..P {
                for f in 0..O {
                    acc[p][f] += (xs[p][j] ^ ws[f][j]).count_ones();
                }
            }
        }
    }
    for (p, acc) in acc.iter().enumerate() {
        let row = &mut dots[(ox + p) * plan.oc + o..][..O];
        for (d, &a) in row.iter_mut().zip(acc) {
            *d = plan.total - 2 * a as i32;
        }
    }
}

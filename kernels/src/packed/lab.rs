//! LAB's fused binarizer: a 3x3 depthwise float comparison, thresholded and packed.

use super::{PackedMap, Variant};
use rayon::prelude::*;

/// The weights of LAB's binarizer for `channels` channels.
///
/// Output channel `c` of pixel `p` scores
/// `d[c] = sum_{taps t} (pos[t][c] * x[p + t][pos_source[c]] - neg[t][c] * x[p + t][neg_source[c]]) + bias[c]`
/// over the 3x3 taps `t` (SAME zero padding, stride 1) and is `-1` (bit 1) unless `d > 0`
/// strictly (ties and NaN give `-1`).
///
/// The arithmetic is `f32` in a fixed order, so that a reference can reproduce it bit for bit:
/// `acc` starts at `bias[c]`; the taps run in row-major order (`ky` then `kx`, tap
/// `t = 3 ky + kx`), taps outside the image add nothing (skipped, or with the AVX-512 kernels a
/// product with zero, which for finite kernels is the same); each tap does
/// `acc = k.mul_add(x, acc)` (fused: one rounding) for the [`LabKernel::folded`] kernel, or
/// `acc = pos.mul_add(xp, acc)` then `acc = (-neg).mul_add(xn, acc)` for
/// [`LabKernel::paired`]; `d` is the final `acc`.
#[derive(Clone, Debug, PartialEq)]
pub struct LabKernel {
    channels: usize,
    pub(super) form: Form,
}

/// The two ways of giving LAB's weights.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Form {
    Folded {
        kernel: Vec<f32>,
        bias: Vec<f32>,
    },
    Paired {
        pos: Vec<f32>,
        pos_source: Vec<usize>,
        neg: Vec<f32>,
        neg_source: Vec<usize>,
        bias: Vec<f32>,
    },
}

impl LabKernel {
    /// `d[c] = sum_t kernel[t][c] * x[p + t][c] + bias[c]`: one kernel per channel, reading its
    /// own channel (the two LAB kernels of a channel folded into their difference).
    /// `kernel` is `[9][channels]` (tap-major, tap `t = 3 ky + kx`), `bias` is `[channels]`.
    ///
    /// # Panics
    /// If a length does not match `channels`.
    pub fn folded(channels: usize, kernel: Vec<f32>, bias: Vec<f32>) -> Self {
        assert_eq!(
            kernel.len(),
            9 * channels,
            "LabKernel: kernel must be [9][{channels}]"
        );
        assert_eq!(bias.len(), channels, "LabKernel: bias must be [{channels}]");
        LabKernel {
            channels,
            form: Form::Folded { kernel, bias },
        }
    }

    /// The general form: `d[c] = sum_t (pos[t][c] * x[p + t][pos_source[c]] - neg[t][c] *
    /// x[p + t][neg_source[c]]) + bias[c]`. `pos` and `neg` are `[9][channels]`, the sources
    /// and `bias` `[channels]`; sources are input channel indices (`< channels`).
    ///
    /// # Panics
    /// If a length does not match `channels` or a source is out of range.
    pub fn paired(
        channels: usize,
        pos: Vec<f32>,
        pos_source: Vec<usize>,
        neg: Vec<f32>,
        neg_source: Vec<usize>,
        bias: Vec<f32>,
    ) -> Self {
        assert_eq!(
            pos.len(),
            9 * channels,
            "LabKernel: pos must be [9][{channels}]"
        );
        assert_eq!(
            neg.len(),
            9 * channels,
            "LabKernel: neg must be [9][{channels}]"
        );
        assert_eq!(bias.len(), channels, "LabKernel: bias must be [{channels}]");
        for source in [&pos_source, &neg_source] {
            assert_eq!(
                source.len(),
                channels,
                "LabKernel: sources must be [{channels}]"
            );
            assert!(
                source.iter().all(|&s| s < channels),
                "LabKernel: a source channel is not below {channels}"
            );
        }
        LabKernel {
            channels,
            form: Form::Paired {
                pos,
                pos_source,
                neg,
                neg_source,
                bias,
            },
        }
    }

    /// The number of channels, of the input and of the output.
    pub fn channels(&self) -> usize {
        self.channels
    }
}

/// Binarizes an NHWC float image (`height * width * lab.channels()` values) with LAB: SAME
/// zero-padded 3x3 stride-1 depthwise comparison, thresholded and packed (see [`LabKernel`]
/// for the exact arithmetic). Rows run in parallel on the current rayon pool.
///
/// The paired form first gathers its two source planes (`x[p][pos_source[c]]` and
/// `x[p][neg_source[c]]`) into scratch buffers kept for later calls.
///
/// # Panics
/// If `x` does not hold `height * width * lab.channels()` values.
pub fn lab_pack(x: &[f32], height: usize, width: usize, lab: &LabKernel) -> PackedMap {
    lab_pack_with(Variant::selected(), x, height, width, lab)
}

/// [`lab_pack`] with the kernels of `variant`, which must be available: the portable code, or
/// AVX2 or AVX-512 vectors (the same arithmetic: the results are identical for finite kernels).
pub(super) fn lab_pack_with(
    variant: Variant,
    x: &[f32],
    height: usize,
    width: usize,
    lab: &LabKernel,
) -> PackedMap {
    let c = lab.channels;
    assert_eq!(
        x.len(),
        height * width * c,
        "lab_pack: expected {height}x{width}x{c} values"
    );
    let mut map = PackedMap::zeros(height, width, c);
    let row_words = width * map.words;
    if row_words == 0 {
        return map;
    }
    LabScorer::new(variant, x, height, width, lab).score(&mut map.data, row_words, 0);
    map
}

/// LAB ready to score the rows of one image: the paired form's two source planes gathered
/// (into scratch buffers returned when it is dropped).
pub(super) struct LabScorer<'a> {
    variant: Variant,
    lab: &'a LabKernel,
    x: &'a [f32],
    /// The paired form's gathered planes, `x[p][pos_source[c]]` and `x[p][neg_source[c]]`.
    planes: Option<[Vec<f32>; 2]>,
    dims: [usize; 3],
}

impl<'a> LabScorer<'a> {
    /// Prepares `lab` for the `height x width` NHWC image `x`, whose size the caller checked.
    pub(super) fn new(
        variant: Variant,
        x: &'a [f32],
        height: usize,
        width: usize,
        lab: &'a LabKernel,
    ) -> Self {
        let c = lab.channels;
        debug_assert_eq!(x.len(), height * width * c);
        let planes = match &lab.form {
            Form::Folded { .. } => None,
            Form::Paired {
                pos_source,
                neg_source,
                ..
            } => Some([
                gather(variant, x, c, pos_source),
                gather(variant, x, c, neg_source),
            ]),
        };
        LabScorer {
            variant,
            lab,
            x,
            planes,
            dims: [height, width, c],
        }
    }

    /// Scores every row and ORs its bits into `rows` (zero), where row `y` takes the
    /// `width * words` words from `y * stride + offset`. Rows run in parallel, in pairs where
    /// the AVX-512 folded kernel scores two rows at once and there are at least 4 pairs per
    /// thread.
    pub(super) fn score(&self, rows: &mut [u64], stride: usize, offset: usize) {
        let [h, w, c] = self.dims;
        let row = w * super::words_for(c);
        if h * row == 0 {
            return;
        }
        let pairs = self.variant == Variant::Avx512
            && matches!(self.lab.form, Form::Folded { .. })
            && h >= 8 * rayon::current_num_threads();
        let per_task = if pairs { 2 } else { 1 };
        let last = (h - 1) * stride + offset + row;
        rows[..last]
            .par_chunks_mut(per_task * stride)
            .enumerate()
            .for_each(|(i, chunk)| {
                let y = i * per_task;
                let (first, rest) = chunk[offset..].split_at_mut(row);
                match rest.get_mut(stride - row..) {
                    Some(second) if per_task == 2 && y + 1 < h => {
                        self.row_pair(y, [first, &mut second[..row]])
                    }
                    _ => self.row(y, first),
                }
            });
    }

    /// Scores rows `y` and `y + 1` of the folded form with the AVX-512 kernel, into `outs`.
    fn row_pair(&self, y: usize, outs: [&mut [u64]; 2]) {
        match &self.lab.form {
            #[cfg(target_arch = "x86_64")]
            Form::Folded { kernel, bias } if self.variant == Variant::Avx512 => {
                let terms = [(kernel.as_slice(), self.x)];
                // SAFETY: the variant is available; the caller checked the sizes.
                unsafe { super::x86::lab_row_pair_avx512(&terms, bias, self.dims, y, outs) }
            }
            _ => unreachable!("rows are scored in pairs by the AVX-512 folded kernel only"),
        }
    }

    /// Scores row `y` and ORs its bits into `out` (`width * words`, zero).
    fn row(&self, y: usize, out: &mut [u64]) {
        match (&self.lab.form, &self.planes) {
            (Form::Folded { kernel, bias }, _) => {
                score_row(self.variant, &[(kernel, self.x)], bias, self.dims, y, out)
            }
            (Form::Paired { pos, neg, bias, .. }, Some([xp, xn])) => score_row(
                self.variant,
                &[(pos, xp), (neg, xn)],
                bias,
                self.dims,
                y,
                out,
            ),
            (Form::Paired { .. }, None) => unreachable!("the paired form gathers its planes"),
        }
    }
}

impl Drop for LabScorer<'_> {
    fn drop(&mut self) {
        if let Some(planes) = self.planes.take() {
            let mut scratch = SCRATCH.lock().unwrap();
            if scratch.len() < SCRATCH_BUFFERS {
                scratch.extend(planes);
            }
        }
    }
}

/// Buffers for the gathered planes of [`lab_pack`], kept to spare page faults on large images.
static SCRATCH: std::sync::Mutex<Vec<Vec<f32>>> = std::sync::Mutex::new(Vec::new());

/// The most buffers [`SCRATCH`] keeps (two per concurrent call).
const SCRATCH_BUFFERS: usize = 8;

/// `x` with channel `c` of every pixel replaced by channel `source[c]`, in a scratch buffer.
fn gather(variant: Variant, x: &[f32], c: usize, source: &[usize]) -> Vec<f32> {
    let mut plane = SCRATCH.lock().unwrap().pop().unwrap_or_default();
    plane.clear();
    plane.reserve(x.len());
    let spare = &mut plane.spare_capacity_mut()[..x.len()];
    let chunk = c * 256;
    spare
        .par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(dst, src)| {
            #[cfg(target_arch = "x86_64")]
            if variant == Variant::Avx512 {
                // SAFETY: the variant is available.
                return unsafe { super::x86::gather_avx512(src, c, source, dst) };
            }
            for (d, s) in dst.chunks_exact_mut(c).zip(src.chunks_exact(c)) {
                for (d, &i) in d.iter_mut().zip(source) {
                    d.write(s[i]);
                }
            }
        });
    // SAFETY: every element was written above.
    unsafe { plane.set_len(x.len()) };
    plane
}

/// One product term of every tap: the kernel (`[9][c]`) and the plane it multiplies (NHWC).
/// The first term of [`score_row`] is added, the second subtracted.
type Term<'a> = (&'a [f32], &'a [f32]);

/// Scores row `y` from `T` terms (1: folded, 2: paired) and ORs its bits into `out` (zero),
/// with the kernels of `variant`.
fn score_row<const T: usize>(
    variant: Variant,
    terms: &[Term; T],
    bias: &[f32],
    dims: [usize; 3],
    y: usize,
    out: &mut [u64],
) {
    match variant {
        Variant::Portable => score_row_portable::<8, T>(terms, bias, dims, y, out),
        // SAFETY: the variant is available; `LabScorer::new`'s caller checked the sizes.
        #[cfg(target_arch = "x86_64")]
        Variant::Avx2 => unsafe { super::x86::lab_row_avx2(terms, bias, dims, y, out) },
        #[cfg(target_arch = "x86_64")]
        Variant::Avx512 => unsafe { super::x86::lab_row_avx512(terms, bias, dims, y, out) },
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("x86 kernels on another architecture"),
    }
}

/// `N` floats from `src`, zeros past `src.len()`.
#[inline(always)]
fn lanes<const N: usize>(src: &[f32]) -> [f32; N] {
    match src.get(..N) {
        Some(v) => v.try_into().unwrap(),
        None => std::array::from_fn(|i| src.get(i).copied().unwrap_or(0.0)),
    }
}

/// Scores row `y` and ORs its bits into `out` (the row's words, zero), `N` channels at a time
/// (`N` divides 64) with the kernel of those channels held in registers, pixel by pixel, in
/// the order [`LabKernel`] documents: from the bias, taps in row-major order, skipping those
/// outside the image.
#[inline(always)]
fn score_row_portable<const N: usize, const T: usize>(
    terms: &[Term; T],
    bias: &[f32],
    [h, w, c]: [usize; 3],
    y: usize,
    out: &mut [u64],
) {
    let words = super::words_for(c);
    let rows: [Option<usize>; 3] =
        std::array::from_fn(|ky| (y + ky).checked_sub(1).filter(|&iy| iy < h));
    for c0 in (0..c).step_by(N) {
        let n = N.min(c - c0);
        let k: [[[f32; N]; 9]; T] =
            std::array::from_fn(|i| std::array::from_fn(|t| lanes(&terms[i].0[t * c + c0..])));
        let b: [f32; N] = lanes(&bias[c0..]);
        let lane_mask = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
        let pixel = |x: usize| -> u64 {
            let mut acc = b;
            for (ky, iy) in rows.iter().enumerate() {
                let Some(iy) = *iy else { continue };
                for kx in 0..3 {
                    let Some(ix) = (x + kx).checked_sub(1).filter(|&ix| ix < w) else {
                        continue;
                    };
                    let at = (iy * w + ix) * c + c0;
                    for (i, (_, plane)) in terms.iter().enumerate() {
                        let v: [f32; N] = lanes(&plane[at..]);
                        let k = &k[i][3 * ky + kx];
                        if i == 0 {
                            for l in 0..N {
                                acc[l] = k[l].mul_add(v[l], acc[l]);
                            }
                        } else {
                            for l in 0..N {
                                acc[l] = (-k[l]).mul_add(v[l], acc[l]);
                            }
                        }
                    }
                }
            }
            let mut bits = 0u64;
            for (l, d) in acc.iter().enumerate() {
                // Not `d <= 0`: ties and NaN give -1.
                let positive = *d > 0.0;
                bits |= u64::from(!positive) << l;
            }
            bits & lane_mask
        };
        let (word, shift) = (c0 / 64, c0 % 64);
        for x in 0..w {
            out[x * words + word] |= pixel(x) << shift;
        }
    }
}

//! Bit-packed XNOR-popcount kernels for CPU inference, independent of candle.
//!
//! A ±1 value is one bit: **bit 1 means -1, bit 0 means +1**. Binarization follows Larq's
//! `sign`: `+1` where `x >= 0` (so `+0.0`, `-0.0` and NaN give `+1`), `-1` where `x < 0`.
//!
//! Feature maps ([`PackedMap`]) hold one image in NHWC order; the `channels` of a pixel are
//! packed into `words = ceil(channels / 64)` `u64` words, channel `c` in word `c / 64`, bit
//! `c % 64`. The unused high bits of the last word are always 0, in maps and in weights
//! ([`PackedConvWeights`]), so that their XOR is 0 and they never count.
//!
//! The kernels:
//! - [`binary_conv`]: the exact integer ±1 convolution with zero or one padding, handing each
//!   output row to a caller's epilogue; [`BinaryConv`] prepares the weights once for many
//!   calls and binarizes a float input (sign or LAB) on the fly into the padded input;
//! - [`lab_pack`]: LAB's 3x3 depthwise float comparison, thresholded and packed;
//! - [`max_pool`]: max pooling of a ±1 map (a bit AND);
//! - [`floor::xnor_popcount`]: a fixed XNOR-popcount loop, the arithmetic floor of the
//!   binary convolutions and a reference for timing the machine.
//!
//! The same bits on an NVIDIA GPU: [`gpu`] lays maps and filters out for the CUDA kernels
//! (`kernels/cuda/packed.cu`: packing, LAB, the convolution on binary tensor cores, max
//! pooling) and checks the tensor cores' arithmetic on the CPU; `cuda` (feature `cuda`) runs
//! them.
//!
//! Parallel work runs on the current rayon pool (install a pool to choose the thread count),
//! split over output rows. The convolution has a portable path and, on x86-64, AVX2 and
//! AVX-512 (VPOPCNTDQ) paths chosen at run time; [`kernel_name`] says which one runs and the
//! environment variable `ZOO_PACKED_KERNEL=portable|avx2|avx512` forces one (an unavailable
//! choice falls back to the best available variant).

mod conv;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod floor;
pub mod gpu;
mod lab;
mod pool;
#[cfg(test)]
mod tests;
mod window;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use conv::{binary_conv, BinaryConv, ConvInput};
#[cfg(test)]
use lab::lab_pack_with;
pub use lab::{lab_pack, LabKernel};
pub use pool::max_pool;
pub use window::Window;

use rayon::prelude::*;
use std::sync::OnceLock;

/// Number of `u64` words that hold `channels` bits.
fn words_for(channels: usize) -> usize {
    channels.div_ceil(64)
}

/// The mask of the bits used in word `k` of a pixel of `channels` channels.
fn word_mask(channels: usize, k: usize) -> u64 {
    let used = channels.saturating_sub(64 * k).min(64);
    if used == 64 {
        u64::MAX
    } else {
        (1u64 << used) - 1
    }
}

/// Packs Larq's sign of each value: bit `i` of word `k` of `out` is 1 where `x[64 k + i] < 0`.
///
/// `x` holds the channels of consecutive pixels (`x.len() == pixels * channels`), `out` their
/// words (`pixels * words`); unused high bits are written as 0.
fn pack_scalar(x: &[f32], channels: usize, out: &mut [u64]) {
    let words = words_for(channels);
    if channels == 0 {
        return;
    }
    for (px, ws) in x.chunks_exact(channels).zip(out.chunks_exact_mut(words)) {
        for (chunk, w) in px.chunks(64).zip(ws.iter_mut()) {
            let mut word = 0u64;
            for (i, &v) in chunk.iter().enumerate() {
                word |= u64::from(v < 0.0) << i;
            }
            *w = word;
        }
    }
}

/// [`pack_scalar`] with the vectors of `variant`.
fn pack_signs(variant: Variant, x: &[f32], channels: usize, out: &mut [u64]) {
    match variant {
        Variant::Portable => pack_scalar(x, channels, out),
        // SAFETY: both x86 variants have AVX2.
        #[cfg(target_arch = "x86_64")]
        Variant::Avx2 | Variant::Avx512 => unsafe { x86::pack_avx2(x, channels, out) },
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("x86 kernels on another architecture"),
    }
}

/// A bit-packed ±1 feature map of one image (NHWC).
#[derive(Clone, Debug, PartialEq)]
pub struct PackedMap {
    /// Rows of the image.
    pub height: usize,
    /// Columns of the image.
    pub width: usize,
    /// Channels of every pixel.
    pub channels: usize,
    /// Words per pixel, `ceil(channels / 64)`.
    pub words: usize,
    /// The bits, `[height][width][words]`; bit 1 means -1, unused high bits are 0.
    pub data: Vec<u64>,
}

impl PackedMap {
    /// A map of `+1` everywhere (all bits 0).
    pub fn zeros(height: usize, width: usize, channels: usize) -> Self {
        let words = words_for(channels);
        PackedMap {
            height,
            width,
            channels,
            words,
            data: vec![0; height * width * words],
        }
    }

    /// Binarizes an NHWC float image (`height * width * channels` values) with Larq's sign:
    /// bit 1 (-1) where `x < 0`, bit 0 (+1) elsewhere (`±0.0` and NaN included). Rows are
    /// packed in parallel on the current rayon pool.
    ///
    /// # Panics
    /// If `x` does not hold `height * width * channels` values.
    pub fn from_signs(x: &[f32], height: usize, width: usize, channels: usize) -> Self {
        assert_eq!(
            x.len(),
            height * width * channels,
            "PackedMap::from_signs: expected {height}x{width}x{channels} values"
        );
        let mut map = Self::zeros(height, width, channels);
        let row_words = width * map.words;
        if row_words == 0 {
            return map;
        }
        let variant = Variant::selected();
        map.data
            .par_chunks_mut(row_words)
            .zip(x.par_chunks(width * channels))
            .for_each(|(out, x)| pack_signs(variant, x, channels, out));
        map
    }

    /// Binarizes one CHW float image (`channels * height * width` values, candle's NCHW layout
    /// without the batch) into an NHWC map, with the sign of [`PackedMap::from_signs`].
    ///
    /// # Panics
    /// If `x` does not hold `channels * height * width` values.
    pub fn from_nchw_signs(x: &[f32], channels: usize, height: usize, width: usize) -> Self {
        assert_eq!(
            x.len(),
            height * width * channels,
            "PackedMap::from_nchw_signs: expected {channels}x{height}x{width} values"
        );
        let mut map = Self::zeros(height, width, channels);
        let plane = height * width;
        for c in 0..channels {
            let (k, bit) = (c / 64, c % 64);
            for (p, &v) in x[c * plane..(c + 1) * plane].iter().enumerate() {
                map.data[p * map.words + k] |= ((v < 0.0) as u64) << bit;
            }
        }
        map
    }

    /// The map as NHWC floats, `+1.0` for bit 0 and `-1.0` for bit 1.
    pub fn to_signs(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.height * self.width * self.channels);
        if self.words == 0 {
            return out;
        }
        for px in self.data.chunks_exact(self.words) {
            out.extend((0..self.channels).map(|c| {
                if px[c / 64] >> (c % 64) & 1 == 1 {
                    -1.0
                } else {
                    1.0
                }
            }));
        }
        out
    }

    /// The `words` words of pixel `(y, x)`.
    pub fn pixel(&self, y: usize, x: usize) -> &[u64] {
        let start = (y * self.width + x) * self.words;
        &self.data[start..start + self.words]
    }

    /// The `words` words of pixel `(y, x)`, mutable; keep the unused high bits 0.
    pub fn pixel_mut(&mut self, y: usize, x: usize) -> &mut [u64] {
        let start = (y * self.width + x) * self.words;
        &mut self.data[start..start + self.words]
    }
}

/// Packed weights of a binary convolution.
#[derive(Clone, Debug, PartialEq)]
pub struct PackedConvWeights {
    /// Output channels (filters).
    pub out_channels: usize,
    /// Input channels.
    pub in_channels: usize,
    /// Kernel height and width.
    pub kernel: [usize; 2],
    /// Words per tap, `ceil(in_channels / 64)`.
    pub words: usize,
    /// The bits, `[out][ky][kx][words]`; bit 1 means -1, unused high bits are 0.
    pub data: Vec<u64>,
}

impl PackedConvWeights {
    /// Packs float weights in candle's OIHW layout (`out x in x kh x kw`): bit 1 (-1) where
    /// `w < 0`, as [`PackedMap::from_signs`].
    ///
    /// # Panics
    /// If `w` does not hold `out_channels * in_channels * kh * kw` values.
    pub fn from_signs(
        w: &[f32],
        out_channels: usize,
        in_channels: usize,
        kernel: [usize; 2],
    ) -> Self {
        let [kh, kw] = kernel;
        assert_eq!(
            w.len(),
            out_channels * in_channels * kh * kw,
            "PackedConvWeights::from_signs: expected {out_channels}x{in_channels}x{kh}x{kw} values"
        );
        let (words, taps) = (words_for(in_channels), kh * kw);
        let mut data = vec![0u64; out_channels * taps * words];
        if words * taps > 0 {
            // One filter per task: word `k` of tap `t` gathers input channels 64k.. of the tap.
            // The filter is laid out tap-major (`kh x kw x C`) first, so that each tap's
            // channels pack as a pixel's do.
            let variant = Variant::selected();
            data.par_chunks_mut(taps * words)
                .zip(w.par_chunks(in_channels * taps))
                .for_each_init(Vec::new, |by_tap, (filter, w)| {
                    let w = if taps == 1 {
                        w
                    } else {
                        by_tap.resize(w.len(), 0.0);
                        for (i, channel) in w.chunks_exact(taps).enumerate() {
                            for (t, &v) in channel.iter().enumerate() {
                                by_tap[t * in_channels + i] = v;
                            }
                        }
                        &by_tap[..]
                    };
                    pack_signs(variant, w, in_channels, filter);
                });
        }
        PackedConvWeights {
            out_channels,
            in_channels,
            kernel,
            words,
            data,
        }
    }

    /// Wraps already packed words (`[out][ky][kx][words]`, e.g. read from a file), checking
    /// their count and that the unused high bits are 0.
    pub fn from_words(
        out_channels: usize,
        in_channels: usize,
        kernel: [usize; 2],
        data: Vec<u64>,
    ) -> Result<Self, String> {
        let words = words_for(in_channels);
        let expected = out_channels * kernel[0] * kernel[1] * words;
        if data.len() != expected {
            return Err(format!(
                "packed conv weights: expected {expected} words for {out_channels}x{in_channels}x{}x{}, found {}",
                kernel[0],
                kernel[1],
                data.len()
            ));
        }
        if words > 0 {
            let mask = !word_mask(in_channels, words - 1);
            if let Some(i) = data
                .chunks_exact(words)
                .position(|tap| tap[words - 1] & mask != 0)
            {
                return Err(format!(
                    "packed conv weights: tap {i} sets bits beyond its {in_channels} channels"
                ));
            }
        }
        Ok(PackedConvWeights {
            out_channels,
            in_channels,
            kernel,
            words,
            data,
        })
    }

    /// The weights as OIHW floats, `+1.0` for bit 0 and `-1.0` for bit 1.
    pub fn to_signs(&self) -> Vec<f32> {
        let [kh, kw] = self.kernel;
        let mut out = vec![0f32; self.out_channels * self.in_channels * kh * kw];
        for o in 0..self.out_channels {
            for i in 0..self.in_channels {
                for t in 0..kh * kw {
                    let word = self.data[(o * kh * kw + t) * self.words + i / 64];
                    out[(o * self.in_channels + i) * kh * kw + t] =
                        if word >> (i % 64) & 1 == 1 { -1.0 } else { 1.0 };
                }
            }
        }
        out
    }
}

/// What SAME padding inserts around the binarized input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PadValue {
    /// Exact zeros: padded taps contribute nothing to the dot product.
    Zero,
    /// `+1` (Larq's `pad_values=1`).
    One,
}

/// Stride and padding of a binary convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    /// Vertical and horizontal stride (both at least 1).
    pub stride: [usize; 2],
    /// Rows added at the top and bottom, columns added at the left and right.
    pub pads: [usize; 4],
    /// The value of the padded positions.
    pub pad_value: PadValue,
}

impl ConvGeometry {
    /// The output height and width for an input of `height x width` and a `kernel`
    /// ([`Window::output`]).
    pub fn output_size(&self, height: usize, width: usize, kernel: [usize; 2]) -> (usize, usize) {
        let window = Window {
            kernel,
            stride: self.stride,
            pads: self.pads,
        };
        window.output(height, width)
    }
}

/// An implementation of the convolution kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    /// Plain Rust with `u64::count_ones`.
    Portable,
    /// AVX2 (with FMA, for LAB), 4 output channels per vector with a nibble-table popcount.
    Avx2,
    /// AVX-512 with VPOPCNTDQ, 8 output channels per vector.
    Avx512,
}

impl Variant {
    /// Every variant, best first.
    const ALL: [Variant; 3] = [Variant::Avx512, Variant::Avx2, Variant::Portable];

    /// The name [`kernel_name`] reports.
    fn name(self) -> &'static str {
        match self {
            Variant::Portable => "portable",
            Variant::Avx2 => "avx2",
            Variant::Avx512 => "avx512",
        }
    }

    /// Whether this CPU runs the variant.
    fn available(self) -> bool {
        match self {
            Variant::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Variant::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            Variant::Avx512 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512vpopcntdq")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The best variant this CPU runs.
    fn best() -> Variant {
        Self::ALL
            .into_iter()
            .find(|v| v.available())
            .unwrap_or(Variant::Portable)
    }

    /// The variant in use: `ZOO_PACKED_KERNEL` if set to an available variant, else the best.
    fn selected() -> Variant {
        static SELECTED: OnceLock<Variant> = OnceLock::new();
        *SELECTED.get_or_init(|| {
            let forced = std::env::var("ZOO_PACKED_KERNEL").ok();
            Self::ALL
                .into_iter()
                .find(|v| forced.as_deref().map(str::trim) == Some(v.name()) && v.available())
                .unwrap_or_else(Self::best)
        })
    }
}

/// The convolution kernel in use: `"avx512"`, `"avx2"` or `"portable"`.
///
/// The best variant the CPU supports, unless the environment variable `ZOO_PACKED_KERNEL`
/// (read once) names another available one.
pub fn kernel_name() -> &'static str {
    Variant::selected().name()
}

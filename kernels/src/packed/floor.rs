//! The arithmetic floor of binary convolutions: a fixed XNOR-popcount loop.
//!
//! [`xnor_popcount`] repeats one binary GEMM tile, 16 rows against 16 columns of 4,608 bits
//! (72 words, the reduction depth of a 3x3x512 convolution), register-blocked, all operands in
//! L1, with the instructions of the selected kernel variant: AVX-512 `vpopcntq`, AVX2's nibble
//! table, or `u64::count_ones`. It has no layout, padding, input packing or epilogue, so its
//! rate bounds what [`super::BinaryConv`] can reach with the same instructions, and its time
//! for a network's binary MACs is that network's floor. Being fixed work, the spread of its
//! time from one process to the next is the machine's own (`zoo bench --floor`).

use rayon::prelude::*;

use super::Variant;

/// Rows of the tile, and columns.
const ROWS: usize = 16;
/// Words of each row and column.
const WORDS: usize = 72;

/// Binary multiply-accumulates (bit pairs) of one tile.
pub const TILE_MACS: u64 = (ROWS * ROWS * WORDS * 64) as u64;

/// The two operands of the tile: 16 rows and 16 columns of `WORDS` words.
#[repr(C, align(64))]
struct Operands {
    rows: [u64; ROWS * WORDS],
    cols: [u64; ROWS * WORDS],
}

impl Operands {
    /// Pseudo-random bits (xorshift), the same on every thread.
    fn new() -> Box<Operands> {
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let rows = std::array::from_fn(|_| next());
        let cols = std::array::from_fn(|_| next());
        Box::new(Operands { rows, cols })
    }
}

/// Runs `tiles` tiles of the selected variant, split evenly over the current rayon pool's
/// threads, and returns the sum of their popcounts (which keeps the work from being skipped).
pub fn xnor_popcount(tiles: u64) -> u64 {
    xnor_popcount_with(Variant::selected(), tiles)
}

/// [`xnor_popcount`] with the given variant (an available one).
pub(super) fn xnor_popcount_with(variant: Variant, tiles: u64) -> u64 {
    thread_local! {
        static OPERANDS: Box<Operands> = Operands::new();
    }
    let threads = rayon::current_num_threads() as u64;
    (0..threads)
        .into_par_iter()
        .map(|t| {
            let n = tiles / threads + u64::from(t < tiles % threads);
            OPERANDS.with(|ops| {
                let mut sum = 0;
                for _ in 0..n {
                    // Opaque to the optimiser: every tile is computed again.
                    let ops = std::hint::black_box(&**ops);
                    sum += tile(variant, &ops.rows, &ops.cols);
                }
                sum
            })
        })
        .sum()
}

/// The popcount of every row XOR every column, summed.
fn tile(variant: Variant, rows: &[u64; ROWS * WORDS], cols: &[u64; ROWS * WORDS]) -> u64 {
    match variant {
        Variant::Portable => tile_portable(rows, cols),
        // SAFETY: the variant is available, so the CPU has its features.
        #[cfg(target_arch = "x86_64")]
        Variant::Avx2 => unsafe { x86::tile_avx2(rows, cols) },
        #[cfg(target_arch = "x86_64")]
        Variant::Avx512 => unsafe { x86::tile_avx512(rows, cols) },
        #[cfg(not(target_arch = "x86_64"))]
        _ => tile_portable(rows, cols),
    }
}

/// [`tile`] with `u64::count_ones`, 4x4 row-column pairs at a time.
fn tile_portable(rows: &[u64; ROWS * WORDS], cols: &[u64; ROWS * WORDS]) -> u64 {
    let mut sum = 0;
    for i in (0..ROWS).step_by(4) {
        for j in (0..ROWS).step_by(4) {
            let mut acc = [[0u32; 4]; 4];
            for k in 0..WORDS {
                for (p, acc) in acc.iter_mut().enumerate() {
                    for (q, acc) in acc.iter_mut().enumerate() {
                        *acc +=
                            (rows[(i + p) * WORDS + k] ^ cols[(j + q) * WORDS + k]).count_ones();
                    }
                }
            }
            sum += acc.iter().flatten().map(|&c| u64::from(c)).sum::<u64>();
        }
    }
    sum
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{ROWS, WORDS};
    use std::arch::x86_64::*;

    /// [`super::tile`] with AVX-512 VPOPCNTDQ, 4x4 row-column pairs of 8 words at a time.
    ///
    /// # Safety
    /// AVX-512 F and VPOPCNTDQ.
    #[target_feature(enable = "avx512f,avx512vpopcntdq")]
    pub(super) unsafe fn tile_avx512(
        rows: &[u64; ROWS * WORDS],
        cols: &[u64; ROWS * WORDS],
    ) -> u64 {
        let load = |m: &[u64; ROWS * WORDS], at: usize| {
            let words: &[u64; 8] = m[at..at + 8].try_into().expect("8 words");
            // SAFETY: 8 words are 64 bytes; unaligned loads are allowed.
            unsafe { _mm512_loadu_si512(words.as_ptr().cast()) }
        };
        let mut sum = 0;
        for i in (0..ROWS).step_by(4) {
            for j in (0..ROWS).step_by(4) {
                let mut acc = [[_mm512_setzero_si512(); 4]; 4];
                for k in (0..WORDS).step_by(8) {
                    let r: [__m512i; 4] = std::array::from_fn(|p| load(rows, (i + p) * WORDS + k));
                    let c: [__m512i; 4] = std::array::from_fn(|q| load(cols, (j + q) * WORDS + k));
                    for (acc, &r) in acc.iter_mut().zip(&r) {
                        for (acc, &c) in acc.iter_mut().zip(&c) {
                            *acc =
                                _mm512_add_epi64(*acc, _mm512_popcnt_epi64(_mm512_xor_si512(r, c)));
                        }
                    }
                }
                let total = acc
                    .iter()
                    .flatten()
                    .fold(_mm512_setzero_si512(), |s, &a| _mm512_add_epi64(s, a));
                sum += _mm512_reduce_add_epi64(total) as u64;
            }
        }
        sum
    }

    /// [`super::tile`] with AVX2, 2x4 row-column pairs of 4 words at a time, counting bytes
    /// with the nibble table (72 words add at most 144 per byte) and widening them once.
    ///
    /// # Safety
    /// AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn tile_avx2(rows: &[u64; ROWS * WORDS], cols: &[u64; ROWS * WORDS]) -> u64 {
        let load = |m: &[u64; ROWS * WORDS], at: usize| {
            let words: &[u64; 4] = m[at..at + 4].try_into().expect("4 words");
            // SAFETY: 4 words are 32 bytes; unaligned loads are allowed.
            unsafe { _mm256_loadu_si256(words.as_ptr().cast()) }
        };
        let lut = _mm256_setr_epi8(
            0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2,
            3, 3, 4,
        );
        let low = _mm256_set1_epi8(0x0f);
        let zero = _mm256_setzero_si256();
        let mut wide = zero;
        for i in (0..ROWS).step_by(2) {
            for j in (0..ROWS).step_by(4) {
                let mut bytes = [[zero; 4]; 2];
                for k in (0..WORDS).step_by(4) {
                    let r: [__m256i; 2] = std::array::from_fn(|p| load(rows, (i + p) * WORDS + k));
                    let c: [__m256i; 4] = std::array::from_fn(|q| load(cols, (j + q) * WORDS + k));
                    for (bytes, &r) in bytes.iter_mut().zip(&r) {
                        for (b, &c) in bytes.iter_mut().zip(&c) {
                            let v = _mm256_xor_si256(r, c);
                            let lo = _mm256_and_si256(v, low);
                            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
                            let n = _mm256_add_epi8(
                                _mm256_shuffle_epi8(lut, lo),
                                _mm256_shuffle_epi8(lut, hi),
                            );
                            *b = _mm256_add_epi8(*b, n);
                        }
                    }
                }
                for &b in bytes.iter().flatten() {
                    wide = _mm256_add_epi64(wide, _mm256_sad_epu8(b, zero));
                }
            }
        }
        let mut lanes = [0u64; 4];
        // SAFETY: 4 words are 32 bytes.
        unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), wide) };
        lanes.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every available variant counts the same bits as a plain loop over the whole tile.
    #[test]
    fn every_variant_counts_the_tile_exactly() {
        let ops = Operands::new();
        let mut want = 0u64;
        for i in 0..ROWS {
            for j in 0..ROWS {
                for k in 0..WORDS {
                    want +=
                        u64::from((ops.rows[i * WORDS + k] ^ ops.cols[j * WORDS + k]).count_ones());
                }
            }
        }
        // Random bits: about half of the tile's bit pairs differ.
        assert!(
            (want as f64 / TILE_MACS as f64 - 0.5).abs() < 0.01,
            "{want}"
        );
        for variant in Variant::ALL.into_iter().filter(|v| v.available()) {
            assert_eq!(
                tile(variant, &ops.rows, &ops.cols),
                want,
                "{}",
                variant.name()
            );
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(3)
                .build()
                .unwrap();
            let total = pool.install(|| xnor_popcount_with(variant, 7));
            assert_eq!(total, 7 * want, "{} over 3 threads", variant.name());
        }
    }
}

//! The float matrix product of the engine's 1x1 and im2col convolutions and its dense layers,
//! against weights laid out once when the model loads.
//!
//! [`PackedWeights`] stores a `k x n` weight matrix as panels of [`PANEL`] columns, each panel
//! its `k` rows of 32 contiguous values (zeros past column `n`), so that the inner loop reads one
//! cache line pair per input value. [`PackedWeights::matmul`] computes `out = lhs * weights` a
//! tile of rows by one panel at a time with the tile's sums in registers: 8 rows x 32 columns
//! in 16 AVX-512 registers, 6 x 16 in 12 AVX2 registers (twice per panel), or a portable loop.
//! The variant follows the packed convolutions' ([`zoo_kernels::packed::kernel_name`], which
//! `ZOO_PACKED_KERNEL` forces; the direct convolution follows it too), so that a run forced to
//! AVX2 times what an AVX2 CPU runs. Work
//! is split over the current rayon pool by blocks of rows, and by groups of panels where the
//! rows are few (the last stages' 7x7 maps, the dense head's single row).

use std::ops::Range;

use rayon::prelude::*;

/// Columns per panel: two AVX-512 registers.
pub const PANEL: usize = 32;

/// A `k x n` weight matrix laid out in panels of [`PANEL`] columns.
#[derive(Clone, Debug, PartialEq)]
pub struct PackedWeights {
    k: usize,
    n: usize,
    /// Panel `p` is `data[p * k * PANEL..][..k * PANEL]`: row `i` of it holds columns
    /// `p * PANEL..(p + 1) * PANEL` of row `i`, zero past `n`.
    data: Vec<f32>,
}

impl PackedWeights {
    /// Lays out the row-major `k x n` matrix `weight`.
    pub fn new(weight: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(weight.len(), k * n, "a {k} x {n} weight matrix");
        let panels = n.div_ceil(PANEL);
        let mut data = vec![0.0; panels * k * PANEL];
        for (p, panel) in data.chunks_exact_mut((k * PANEL).max(1)).enumerate() {
            let cols = p * PANEL..n.min((p + 1) * PANEL);
            for (i, row) in panel.chunks_exact_mut(PANEL).enumerate() {
                row[..cols.len()].copy_from_slice(&weight[i * n..][cols.clone()]);
            }
        }
        PackedWeights { k, n, data }
    }

    /// The row-major `k x n` matrix laid out (the inverse of [`PackedWeights::new`]).
    pub fn to_matrix(&self) -> Vec<f32> {
        let mut matrix = vec![0.0; self.k * self.n];
        for (i, row) in matrix.chunks_exact_mut(self.n.max(1)).enumerate() {
            for (o, v) in row.iter_mut().enumerate() {
                *v = self.data[o / PANEL * self.k * PANEL + i * PANEL + o % PANEL];
            }
        }
        matrix
    }

    /// Rows (inputs per output).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Columns (outputs).
    pub fn n(&self) -> usize {
        self.n
    }

    /// The panel holding column `o0`, from that column on: row `i`'s columns `o0..` start at
    /// `i * PANEL` (up to the panel's end).
    #[inline(always)]
    pub fn columns_from(&self, o0: usize) -> &[f32] {
        &self.data[o0 / PANEL * self.k * PANEL + o0 % PANEL..][..self.k * PANEL - o0 % PANEL]
    }

    /// `out (m x n) = lhs (m x k) * self`, row-major, on the current rayon pool, then
    /// `finish(r0, rows)` once on every row (`rows` holds whole rows from row `r0`) while the rows
    /// are in cache: a tile at a time where the work is split by rows, else a block at a time.
    pub fn matmul(
        &self,
        lhs: &[f32],
        m: usize,
        out: &mut [f32],
        finish: impl Fn(usize, &mut [f32]) + Sync,
    ) {
        let (k, n) = (self.k, self.n);
        assert!(lhs.len() >= m * k, "{m} rows of {k} inputs");
        assert!(out.len() >= m * n, "{m} rows of {n} outputs");
        if m == 0 || n == 0 {
            return;
        }
        let out = &mut out[..m * n];
        if k == 0 {
            out.fill(0.0);
            return finish(0, out);
        }
        let variant = Variant::selected();
        let panels = n.div_ceil(PANEL);
        let (row_block, group) = split(m, panels, k, rayon::current_num_threads(), variant);
        if group == panels {
            let rows = |(b, rows): (usize, &mut [f32])| {
                let r0 = b * row_block;
                self.block(lhs, r0, 0..panels, rows, n, variant, |t, tile| {
                    finish(r0 + t, tile)
                });
            };
            if row_block >= m {
                rows((0, out));
            } else {
                out.par_chunks_mut(row_block * n).enumerate().for_each(rows);
            }
            return;
        }
        // Few rows: blocks of rows x groups of panels, each computed into a buffer of its own,
        // copied into place and finished a block of rows at a time.
        let groups = panels.div_ceil(group);
        let width = group * PANEL;
        let parts: Vec<Vec<f32>> = (0..m.div_ceil(row_block) * groups)
            .into_par_iter()
            .map(|item| {
                let r0 = item / groups * row_block;
                let rows = row_block.min(m - r0);
                let panels = item % groups * group..panels.min((item % groups + 1) * group);
                let mut part = vec![0.0; rows * width];
                self.block(lhs, r0, panels, &mut part, width, variant, |_, _| {});
                part
            })
            .collect();
        out.par_chunks_mut(row_block * n)
            .zip(parts.par_chunks(groups))
            .enumerate()
            .for_each(|(b, (rows, parts))| {
                for (g, part) in parts.iter().enumerate() {
                    let cols = g * width..n.min((g + 1) * width);
                    for (row, part) in rows.chunks_exact_mut(n).zip(part.chunks_exact(width)) {
                        row[cols.clone()].copy_from_slice(&part[..cols.len()]);
                    }
                }
                finish(b * row_block, rows);
            });
    }

    /// The product's rows from `r0` (as many as `dst` holds, `stride` values apart) by the
    /// columns of `panels` (from `dst`'s first column), a tile of rows at a time, each tile then
    /// given to `finish` (its first row's index in `dst`, its rows).
    #[allow(clippy::too_many_arguments)]
    fn block(
        &self,
        lhs: &[f32],
        r0: usize,
        panels: Range<usize>,
        dst: &mut [f32],
        stride: usize,
        variant: Variant,
        finish: impl Fn(usize, &mut [f32]),
    ) {
        let (k, n) = (self.k, self.n);
        let first = panels.start;
        for (t, tile) in dst.chunks_mut(variant.tile_rows() * stride).enumerate() {
            let rows = tile.len() / stride;
            let r = r0 + t * variant.tile_rows();
            let a = &lhs[r * k..(r + rows) * k];
            for p in panels.clone() {
                let panel = &self.data[p * k * PANEL..][..k * PANEL];
                let cols = PANEL.min(n - p * PANEL);
                variant.tile(a, k, panel, &mut tile[(p - first) * PANEL..], stride, cols);
            }
            finish(t * variant.tile_rows(), tile);
        }
    }
}

/// The rows of the largest tile of any variant.
const MAX_TILE_ROWS: usize = 8;

/// Rows per block and panels per group of a product's parallel work: one block on one thread
/// or for small products; else about four blocks per thread, by rows where there are enough,
/// else by rows of whole tiles and groups of panels.
fn split(m: usize, panels: usize, k: usize, threads: usize, variant: Variant) -> (usize, usize) {
    const MIN_PARALLEL_MACS: usize = 1 << 16;
    let tile = variant.tile_rows();
    let items = 4 * threads;
    if threads <= 1 || m * panels * PANEL * k < MIN_PARALLEL_MACS {
        return (m, panels);
    }
    if m >= items * tile {
        return (m.div_ceil(items).next_multiple_of(tile), panels);
    }
    let row_blocks = m.div_ceil(tile);
    (tile, panels.div_ceil(items.div_ceil(row_blocks)))
}

/// Calls `$tile::<R>` for the `$rows` (1 to 8) rows of a tile, so each row count gets a loop with
/// its sums in registers.
macro_rules! dispatch_rows {
    ($rows:expr, $tile:ident, $($arg:expr),*) => {
        match $rows {
            1 => $tile::<1>($($arg),*),
            2 => $tile::<2>($($arg),*),
            3 => $tile::<3>($($arg),*),
            4 => $tile::<4>($($arg),*),
            5 => $tile::<5>($($arg),*),
            6 => $tile::<6>($($arg),*),
            7 => $tile::<7>($($arg),*),
            _ => $tile::<8>($($arg),*),
        }
    };
}

/// The instruction set of the float kernels: the tiles here and the direct convolution's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Variant {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Variant {
    /// The packed convolutions' variant (forced by `ZOO_PACKED_KERNEL`).
    pub(super) fn selected() -> Variant {
        match zoo_kernels::packed::kernel_name() {
            #[cfg(target_arch = "x86_64")]
            "avx512" if std::arch::is_x86_feature_detected!("avx512f") => Variant::Avx512,
            #[cfg(target_arch = "x86_64")]
            "avx512" | "avx2" => Variant::Avx2,
            _ => Variant::Portable,
        }
    }

    /// Rows per tile.
    fn tile_rows(self) -> usize {
        match self {
            Variant::Portable => 4,
            #[cfg(target_arch = "x86_64")]
            Variant::Avx2 => 6,
            #[cfg(target_arch = "x86_64")]
            Variant::Avx512 => MAX_TILE_ROWS,
        }
    }

    /// `out[r * stride + j] = sum_i a[r * k + i] * panel[i * PANEL + j]` for the `cols` first
    /// columns `j` of the panel and the rows of `a` (at most [`Variant::tile_rows`]).
    fn tile(self, a: &[f32], k: usize, panel: &[f32], out: &mut [f32], stride: usize, cols: usize) {
        let rows = a.len() / k;
        assert!(rows <= self.tile_rows() && a.len() == rows * k && panel.len() == k * PANEL);
        assert!(cols <= PANEL && out.len() >= (rows - 1) * stride + cols);
        let out = Rows { out, stride, cols };
        match self {
            Variant::Portable => dispatch_rows!(rows, tile_portable, a, k, panel, out),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX2 and FMA are available (`Variant::selected`); the shapes are checked.
            Variant::Avx2 => unsafe { dispatch_rows!(rows, tile_avx2, a, k, panel, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX-512 is available (`Variant::selected`); the shapes are checked.
            Variant::Avx512 => unsafe { dispatch_rows!(rows, tile_avx512, a, k, panel, out) },
        }
    }
}

/// Where a tile's rows go: `cols` values of row `r` at `out[r * stride..]`.
struct Rows<'a> {
    out: &'a mut [f32],
    stride: usize,
    cols: usize,
}

impl Rows<'_> {
    /// Stores row `r`, written by `write` into a whole panel's width: in place for a whole
    /// panel, else through a copy.
    #[inline(always)]
    fn store(&mut self, r: usize, write: impl FnOnce(&mut [f32; PANEL])) {
        let row = &mut self.out[r * self.stride..];
        if self.cols == PANEL {
            write((&mut row[..PANEL]).try_into().expect("a panel's width"));
        } else {
            let mut values = [0f32; PANEL];
            write(&mut values);
            row[..self.cols].copy_from_slice(&values[..self.cols]);
        }
    }
}

/// [`Variant::tile`] in plain Rust, `R` rows.
fn tile_portable<const R: usize>(a: &[f32], k: usize, panel: &[f32], mut out: Rows) {
    let mut acc = [[0f32; PANEL]; R];
    for (i, w) in panel.chunks_exact(PANEL).enumerate() {
        for (r, acc) in acc.iter_mut().enumerate() {
            let v = a[r * k + i];
            acc.iter_mut().zip(w).for_each(|(s, w)| *s += v * w);
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        out.store(r, |row| *row = *acc);
    }
}

/// [`Variant::tile`] with AVX2 and FMA. Up to 2 rows: each row four 8-lane registers over the
/// whole panel (four independent sums per row). More: the panel as two halves of 16 columns,
/// each `R` rows of two registers (12 sums, two weights and a broadcast fill the 16 registers at
/// 6 rows).
///
/// # Safety
/// AVX2 and FMA; `a` holds `R` rows of `k`, `panel` `k` rows of [`PANEL`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const R: usize>(a: &[f32], k: usize, panel: &[f32], mut out: Rows) {
    use std::arch::x86_64::*;
    /// `acc[r][j] += a[r][i] * panel[i][first + 8 j..]` over every `i`.
    #[inline(always)]
    unsafe fn run<const R: usize, const J: usize>(
        a: *const f32,
        k: usize,
        w: *const f32,
        first: usize,
    ) -> [[__m256; J]; R] {
        let mut acc = [[_mm256_setzero_ps(); J]; R];
        for i in 0..k {
            // SAFETY: row `i` of the panel holds 32 values, `first + 8 * J` at most 32.
            let w: [__m256; J] = std::array::from_fn(|j| unsafe {
                _mm256_loadu_ps(w.add(i * PANEL + first + 8 * j))
            });
            for (r, acc) in acc.iter_mut().enumerate() {
                // SAFETY: row `r` of `a` holds `k` values.
                let v = unsafe { _mm256_broadcast_ss(&*a.add(r * k + i)) };
                for (s, w) in acc.iter_mut().zip(w) {
                    *s = _mm256_fmadd_ps(v, w, *s);
                }
            }
        }
        acc
    }
    let (a, w) = (a.as_ptr(), panel.as_ptr());
    let mut sums = [[_mm256_setzero_ps(); 4]; R];
    if R <= 2 {
        // SAFETY: as the caller guarantees.
        sums = unsafe { run::<R, 4>(a, k, w, 0) };
    } else {
        for half in 0..2 {
            // SAFETY: as the caller guarantees.
            let acc = unsafe { run::<R, 2>(a, k, w, 16 * half) };
            for (sums, acc) in sums.iter_mut().zip(&acc) {
                sums[2 * half..2 * half + 2].copy_from_slice(acc);
            }
        }
    }
    for (r, sums) in sums.iter().enumerate() {
        out.store(r, |row| {
            for (j, s) in sums.iter().enumerate() {
                // SAFETY: `row` holds 32 values.
                unsafe { _mm256_storeu_ps(row.as_mut_ptr().add(8 * j), *s) };
            }
        });
    }
}

/// [`Variant::tile`] with AVX-512: `R` rows of two 16-lane registers.
///
/// # Safety
/// AVX-512F; `a` holds `R` rows of `k`, `panel` `k` rows of [`PANEL`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512<const R: usize>(a: &[f32], k: usize, panel: &[f32], mut out: Rows) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    let (a, w) = (a.as_ptr(), panel.as_ptr());
    for i in 0..k {
        // SAFETY: row `i` of the panel holds 32 values.
        let w = unsafe {
            [
                _mm512_loadu_ps(w.add(i * PANEL)),
                _mm512_loadu_ps(w.add(i * PANEL + 16)),
            ]
        };
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: row `r` of `a` holds `k` values.
            let v = _mm512_set1_ps(unsafe { *a.add(r * k + i) });
            acc[0] = _mm512_fmadd_ps(v, w[0], acc[0]);
            acc[1] = _mm512_fmadd_ps(v, w[1], acc[1]);
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        out.store(r, |row| {
            // SAFETY: `row` holds 32 values.
            unsafe {
                _mm512_storeu_ps(row.as_mut_ptr(), acc[0]);
                _mm512_storeu_ps(row.as_mut_ptr().add(16), acc[1]);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_matrix_comes_back_out_of_the_panels() {
        for (k, n) in [(1, 1), (3, 31), (5, 33), (7, 64), (2, 70)] {
            let matrix: Vec<f32> = (0..k * n).map(|i| i as f32).collect();
            assert_eq!(
                PackedWeights::new(&matrix, k, n).to_matrix(),
                matrix,
                "{k} x {n}"
            );
        }
    }

    /// A seeded value in [-1, 1).
    fn value(seed: usize) -> f32 {
        let x = (seed as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// The product in f64.
    fn reference(lhs: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for r in 0..m {
            for i in 0..k {
                for j in 0..n {
                    out[r * n + j] += lhs[r * k + i] as f64 * w[i * n + j] as f64;
                }
            }
        }
        out
    }

    #[test]
    fn every_variant_matches_f64_on_odd_shapes() {
        let variants = [
            Some(Variant::Portable),
            #[cfg(target_arch = "x86_64")]
            (std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma"))
            .then_some(Variant::Avx2),
            #[cfg(target_arch = "x86_64")]
            std::arch::is_x86_feature_detected!("avx512f").then_some(Variant::Avx512),
        ];
        for variant in variants.into_iter().flatten() {
            for (m, k, n) in [
                (1, 1, 1),
                (1, 512, 1000),
                (49, 256, 512),
                (13, 27, 16),
                (9, 5, 33),
                (17, 64, 64),
            ] {
                let lhs: Vec<f32> = (0..m * k).map(value).collect();
                let w: Vec<f32> = (0..k * n).map(|i| value(i + 7777)).collect();
                let packed = PackedWeights::new(&w, k, n);
                let want = reference(&lhs, &w, m, k, n);
                let mut out = vec![f32::NAN; m * n];
                for r0 in (0..m).step_by(variant.tile_rows()) {
                    let rows = variant.tile_rows().min(m - r0);
                    for p in 0..n.div_ceil(PANEL) {
                        let panel = &packed.data[p * k * PANEL..][..k * PANEL];
                        let a = &lhs[r0 * k..(r0 + rows) * k];
                        let cols = PANEL.min(n - p * PANEL);
                        variant.tile(a, k, panel, &mut out[r0 * n + p * PANEL..], n, cols);
                    }
                }
                for (i, (got, want)) in out.iter().zip(&want).enumerate() {
                    let tolerance = 1e-5 * (k as f64).sqrt().max(1.0);
                    assert!(
                        (*got as f64 - want).abs() <= tolerance,
                        "{variant:?} {m}x{k}x{n}: value {i} is {got}, f64 gives {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn parallel_blocks_cover_the_product_and_finish_each_row_once() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        for (m, k, n) in [
            (1, 512, 1000),
            (49, 256, 512),
            (784, 64, 128),
            (100, 3, 70),
            (5, 0, 3),
        ] {
            let lhs: Vec<f32> = (0..m * k).map(value).collect();
            let w: Vec<f32> = (0..k * n).map(|i| value(i + 99)).collect();
            let packed = PackedWeights::new(&w, k, n);
            let want = reference(&lhs, &w, m, k, n);
            let mut serial = vec![f32::NAN; m * n];
            packed.matmul(&lhs, m, &mut serial, |_, _| {});
            for (got, want) in serial.iter().zip(&want) {
                assert!(
                    (*got as f64 - want).abs() <= 1e-5 * (k as f64).sqrt(),
                    "{m}x{k}x{n}"
                );
            }
            // Finishing adds each row's index to it, once.
            let finished: Vec<AtomicUsize> = (0..m).map(|_| AtomicUsize::new(0)).collect();
            let mut parallel = vec![f32::NAN; m * n];
            pool.install(|| {
                packed.matmul(&lhs, m, &mut parallel, |r0, rows| {
                    for (r, row) in rows.chunks_exact_mut(n).enumerate() {
                        finished[r0 + r].fetch_add(1, Ordering::Relaxed);
                        row.iter_mut().for_each(|v| *v += (r0 + r) as f32);
                    }
                })
            });
            assert!(
                finished.iter().all(|f| f.load(Ordering::Relaxed) == 1),
                "{m}x{k}x{n}"
            );
            for (i, (p, s)) in parallel.iter().zip(&serial).enumerate() {
                assert_eq!(*p, s + (i / n) as f32, "{m}x{k}x{n}: value {i}");
            }
        }
    }

    #[test]
    fn split_keeps_every_thread_busy() {
        let v = Variant::Avx512;
        assert_eq!(split(784, 4, 64, 1, v), (784, 4), "one thread: one block");
        assert_eq!(
            split(784, 4, 64, 2, v),
            (104, 4),
            "many rows: blocks of rows"
        );
        assert_eq!(
            split(49, 16, 256, 2, v),
            (8, 8),
            "few rows: tiles by groups of panels"
        );
        assert_eq!(split(1, 32, 512, 2, v), (8, 4), "one row: groups of panels");
        assert_eq!(split(4, 1, 4, 2, v), (4, 1), "small: serial");
    }
}

//! Tests of the packed kernels against straightforward float references, and a benchmark.

use super::conv::conv_with;
use super::*;

/// A small deterministic generator (SplitMix64), shared by the packed module's tests.
pub(super) struct Rng(pub(super) u64);

impl Rng {
    pub(super) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Uniform in `[-1, 1)`.
    fn float(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// `n` values of `±1`.
    pub(super) fn signs(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| if self.next() & 1 == 1 { -1.0 } else { 1.0 })
            .collect()
    }
}

/// The variants this CPU runs.
/// A rayon pool of `threads` threads.
fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
}

fn variants() -> Vec<Variant> {
    Variant::ALL.into_iter().filter(|v| v.available()).collect()
}

#[test]
fn signs_round_trip_with_larq_sign() {
    let x = [
        1.5,
        -2.0,
        0.0,
        -0.0,
        f32::NAN,
        -f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        -1e-30,
    ];
    let expected = [1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 1.0, -1.0, -1.0];
    let map = PackedMap::from_signs(&x, 1, 1, x.len());
    assert_eq!(map.to_signs(), expected);
    assert_eq!(map.data, vec![0b1_1000_0010]);
    let weights = PackedConvWeights::from_signs(&x, x.len(), 1, [1, 1]);
    assert_eq!(weights.to_signs(), expected);

    let mut rng = Rng(1);
    for (h, w, c) in [
        (1, 1, 1),
        (3, 2, 63),
        (2, 3, 64),
        (4, 1, 65),
        (2, 2, 130),
        (3, 3, 200),
    ] {
        let mut x: Vec<f32> = (0..h * w * c).map(|_| rng.float()).collect();
        for v in x.iter_mut().step_by(7) {
            *v = -0.0;
        }
        let signs: Vec<f32> = x
            .iter()
            .map(|&v| if v < 0.0 { -1.0 } else { 1.0 })
            .collect();
        let map = PackedMap::from_signs(&x, h, w, c);
        assert_eq!(map.words, c.div_ceil(64));
        assert_eq!(map.to_signs(), signs);
        assert_eq!(PackedMap::from_signs(&signs, h, w, c), map);
        for px in map.data.chunks(map.words) {
            assert_eq!(px[map.words - 1] & !word_mask(c, map.words - 1), 0);
        }
        // The scalar packer agrees with the dispatched one.
        for variant in variants() {
            let mut packed = vec![0; map.data.len()];
            pack_signs(variant, &x, c, &mut packed);
            assert_eq!(packed, map.data, "{variant:?}");
        }
        // CHW input.
        let chw: Vec<f32> = (0..c * h * w)
            .map(|i| {
                let (ch, p) = (i / (h * w), i % (h * w));
                x[p * c + ch]
            })
            .collect();
        assert_eq!(PackedMap::from_nchw_signs(&chw, c, h, w), map);
        assert_eq!(
            map.pixel(h - 1, w - 1),
            &map.data[map.data.len() - map.words..]
        );
        let mut copy = map.clone();
        copy.pixel_mut(0, 0)[0] ^= 1;
        assert_eq!(copy.to_signs()[0], -signs[0]);

        let oc = 3;
        let wf: Vec<f32> = (0..oc * c * 6).map(|_| rng.float()).collect();
        let packed = PackedConvWeights::from_signs(&wf, oc, c, [3, 2]);
        let wsigns: Vec<f32> = wf
            .iter()
            .map(|&v| if v < 0.0 { -1.0 } else { 1.0 })
            .collect();
        assert_eq!(packed.to_signs(), wsigns);
        let again = PackedConvWeights::from_words(oc, c, [3, 2], packed.data.clone());
        assert_eq!(again.as_ref(), Ok(&packed));
        assert!(PackedConvWeights::from_words(oc, c, [3, 2], vec![0; 5]).is_err());
        if c % 64 != 0 {
            let mut bad = packed.data.clone();
            bad[packed.words - 1] |= 1 << 63;
            assert!(PackedConvWeights::from_words(oc, c, [3, 2], bad).is_err());
        }
    }
}

#[test]
fn output_size_follows_the_padded_input() {
    let g = ConvGeometry {
        stride: [2, 1],
        pads: [1, 1, 0, 2],
        pad_value: PadValue::One,
    };
    assert_eq!(g.output_size(7, 5, [3, 3]), (4, 5));
    assert_eq!(g.output_size(1, 1, [3, 3]), (1, 1));
    assert_eq!(g.output_size(1, 0, [3, 3]), (1, 0));
    assert_eq!(g.output_size(0, 0, [3, 4]), (0, 0));
}

/// The dots of the convolution of ±1 floats `x` (NHWC) and `w` (OIHW), in f64.
#[allow(clippy::too_many_arguments)]
fn reference_conv(
    x: &[f32],
    [h, w, c]: [usize; 3],
    wts: &[f32],
    oc: usize,
    [kh, kw]: [usize; 2],
    g: &ConvGeometry,
) -> Vec<i32> {
    let (oh, ow) = g.output_size(h, w, [kh, kw]);
    let [top, _, left, _] = g.pads;
    let mut out = Vec::with_capacity(oh * ow * oc);
    for oy in 0..oh {
        for ox in 0..ow {
            for o in 0..oc {
                let mut dot = 0f64;
                for ky in 0..kh {
                    for kx in 0..kw {
                        let iy = (oy * g.stride[0] + ky) as isize - top as isize;
                        let ix = (ox * g.stride[1] + kx) as isize - left as isize;
                        let inside = iy >= 0 && ix >= 0 && iy < h as isize && ix < w as isize;
                        for i in 0..c {
                            let xv = if inside {
                                x[(iy as usize * w + ix as usize) * c + i] as f64
                            } else if g.pad_value == PadValue::One {
                                1.0
                            } else {
                                0.0
                            };
                            dot += xv * wts[((o * c + i) * kh + ky) * kw + kx] as f64;
                        }
                    }
                }
                out.push(dot as i32);
            }
        }
    }
    out
}

/// TensorFlow's SAME padding of one dimension: (before, after).
fn same_pads(n: usize, k: usize, s: usize) -> (usize, usize) {
    let total = ((n.div_ceil(s) - 1) * s + k).saturating_sub(n);
    (total / 2, total - total / 2)
}

/// Runs every variant on one case and compares with the reference.
#[allow(clippy::too_many_arguments)]
fn check_conv(
    rng: &mut Rng,
    [h, w, c]: [usize; 3],
    oc: usize,
    kernel: [usize; 2],
    g: &ConvGeometry,
) {
    let x = rng.signs(h * w * c);
    let wts = rng.signs(oc * c * kernel[0] * kernel[1]);
    let expected = reference_conv(&x, [h, w, c], &wts, oc, kernel, g);
    let input = PackedMap::from_signs(&x, h, w, c);
    let weights = PackedConvWeights::from_signs(&wts, oc, c, kernel);
    let (oh, ow) = g.output_size(h, w, kernel);
    for variant in variants() {
        let mut out = vec![i32::MIN; oh * ow * oc];
        conv_with(variant, &input, &weights, g, &mut out, |oy, dots, row| {
            assert!(oy < oh);
            assert_eq!(dots.len(), row.len());
            row.copy_from_slice(dots);
        });
        assert_eq!(
            out, expected,
            "{variant:?}: {h}x{w}x{c} -> {oc}, kernel {kernel:?}, {g:?}"
        );
    }
}

#[test]
fn conv_matches_reference() {
    let mut rng = Rng(7);
    let sizes = [(7, 5), (1, 1), (4, 9), (3, 3), (6, 2), (9, 8)];
    let mut case = 0;
    for c in [1, 3, 63, 64, 65, 130, 200] {
        for kernel in [[1, 1], [3, 3], [5, 3]] {
            for stride in [[1, 1], [2, 2], [1, 2]] {
                for same in [false, true] {
                    for pad_value in [PadValue::Zero, PadValue::One] {
                        case += 1;
                        let (h, w) = sizes[case % sizes.len()];
                        let pads = if same {
                            let (t, b) = same_pads(h, kernel[0], stride[0]);
                            let (l, r) = same_pads(w, kernel[1], stride[1]);
                            [t, b, l, r]
                        } else {
                            [0; 4]
                        };
                        let g = ConvGeometry {
                            stride,
                            pads,
                            pad_value,
                        };
                        let oc = [1, 5, 8, 13, 33, 40][case % 6];
                        check_conv(&mut rng, [h, w, c], oc, kernel, &g);
                    }
                }
            }
        }
    }
}

#[test]
fn conv_matches_reference_on_random_shapes() {
    let mut rng = Rng(11);
    for _ in 0..200 {
        let c = [1, 3, 63, 64, 65, 130, 200, 700][rng.below(8)];
        let kernel = [1 + rng.below(5), 1 + rng.below(5)];
        let stride = [1 + rng.below(3), 1 + rng.below(3)];
        let pads = [rng.below(3), rng.below(3), rng.below(3), rng.below(3)];
        let h = 1 + rng.below(10);
        let w = 1 + rng.below(10);
        let oc = 1 + rng.below(if c > 200 { 12 } else { 70 });
        let pad_value = if rng.next() & 1 == 0 {
            PadValue::Zero
        } else {
            PadValue::One
        };
        let g = ConvGeometry {
            stride,
            pads,
            pad_value,
        };
        check_conv(&mut rng, [h, w, c], oc, kernel, &g);
    }
    // Full tiles of every kernel, on a map wider than the tiles.
    for pad_value in [PadValue::Zero, PadValue::One] {
        let g = ConvGeometry {
            stride: [1, 1],
            pads: [1, 1, 1, 1],
            pad_value,
        };
        check_conv(&mut rng, [12, 13, 64], 64, [3, 3], &g);
        check_conv(&mut rng, [5, 6, 256], 40, [3, 3], &g);
        // Few rows and many channels: rows split into channel groups on several threads.
        for threads in [2, 3, 8] {
            let pool = pool(threads);
            pool.install(|| {
                check_conv(&mut rng, [3, 5, 70], 200, [3, 3], &g);
                check_conv(&mut rng, [1, 2, 64], 96, [3, 3], &g);
            });
        }
    }
}

#[test]
fn conv_epilogue_gets_its_rows() {
    let (h, w, c, oc) = (5, 4, 70, 6);
    let mut rng = Rng(3);
    let input = PackedMap::from_signs(&rng.signs(h * w * c), h, w, c);
    let weights = PackedConvWeights::from_signs(&rng.signs(oc * c * 9), oc, c, [3, 3]);
    let g = ConvGeometry {
        stride: [2, 2],
        pads: [1, 1, 1, 1],
        pad_value: PadValue::Zero,
    };
    let (oh, ow) = g.output_size(h, w, [3, 3]);
    // Another element type and row length: one sum per output row.
    let mut sums = vec![(0usize, 0i64); oh];
    binary_conv(&input, &weights, &g, &mut sums, |oy, dots, row| {
        assert_eq!(dots.len(), ow * oc);
        row[0] = (oy, dots.iter().map(|&d| d as i64).sum());
    });
    let mut full = vec![0i32; oh * ow * oc];
    binary_conv(&input, &weights, &g, &mut full, |_, dots, row| {
        row.copy_from_slice(dots)
    });
    for (oy, &(y, sum)) in sums.iter().enumerate() {
        assert_eq!(y, oy);
        let expected: i64 = full[oy * ow * oc..][..ow * oc]
            .iter()
            .map(|&d| d as i64)
            .sum();
        assert_eq!(sum, expected);
    }
    // No output at all: the epilogue still sees every row.
    let seen = std::sync::atomic::AtomicUsize::new(0);
    binary_conv(&input, &weights, &g, &mut [] as &mut [u8], |_, _, row| {
        assert!(row.is_empty());
        seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    });
    assert_eq!(seen.into_inner(), oh);
    assert!(["avx512", "avx2", "portable"].contains(&kernel_name()));
}

/// LAB's scores by the documented order, one pixel and channel at a time.
fn reference_lab(x: &[f32], [h, w, c]: [usize; 3], lab: &LabKernel) -> PackedMap {
    let mut signs = Vec::with_capacity(h * w * c);
    for y in 0..h {
        for xx in 0..w {
            for ch in 0..c {
                let mut acc = match &lab.form {
                    lab::Form::Folded { bias, .. } | lab::Form::Paired { bias, .. } => bias[ch],
                };
                for ky in 0..3 {
                    for kx in 0..3 {
                        let (iy, ix) = (y + ky, xx + kx);
                        if iy < 1 || ix < 1 || iy > h || ix > w {
                            continue;
                        }
                        let px = &x[((iy - 1) * w + ix - 1) * c..][..c];
                        let t = 3 * ky + kx;
                        match &lab.form {
                            lab::Form::Folded { kernel, .. } => {
                                acc = kernel[t * c + ch].mul_add(px[ch], acc);
                            }
                            lab::Form::Paired {
                                pos,
                                pos_source,
                                neg,
                                neg_source,
                                ..
                            } => {
                                acc = pos[t * c + ch].mul_add(px[pos_source[ch]], acc);
                                acc = (-neg[t * c + ch]).mul_add(px[neg_source[ch]], acc);
                            }
                        }
                    }
                }
                signs.push(if acc > 0.0 { 1.0 } else { -1.0 });
            }
        }
    }
    PackedMap::from_signs(&signs, h, w, c)
}

#[test]
fn lab_pack_matches_reference_bit_for_bit() {
    let mut rng = Rng(5);
    for (h, w, c) in [
        (1, 1, 1),
        (2, 3, 5),
        (5, 7, 64),
        (4, 4, 70),
        (3, 6, 130),
        (1, 9, 16),
        // Tall enough for the two-row kernel on one thread (even and odd heights).
        (8, 6, 16),
        (9, 7, 70),
    ] {
        // Coarse values make exact ties (d == 0) likely.
        let coarse = |rng: &mut Rng, n: usize| -> Vec<f32> {
            (0..n).map(|_| (rng.below(5) as f32 - 2.0) * 0.5).collect()
        };
        for round in 0..3 {
            let values = |rng: &mut Rng, n: usize| -> Vec<f32> {
                if round == 0 {
                    coarse(rng, n)
                } else {
                    (0..n).map(|_| rng.float() * 3.0).collect()
                }
            };
            let x = values(&mut rng, h * w * c);
            let folded = LabKernel::folded(c, values(&mut rng, 9 * c), values(&mut rng, c));
            let sources = |rng: &mut Rng| (0..c).map(|_| rng.below(c)).collect::<Vec<_>>();
            let paired = LabKernel::paired(
                c,
                values(&mut rng, 9 * c),
                sources(&mut rng),
                values(&mut rng, 9 * c),
                sources(&mut rng),
                values(&mut rng, c),
            );
            // The official pairing's sources (neighbouring channels: loads and permutations).
            let official = LabKernel::paired(
                c,
                values(&mut rng, 9 * c),
                (0..c).map(|k| (c + k) / 2).collect(),
                values(&mut rng, 9 * c),
                (0..c).map(|k| k / 2).collect(),
                values(&mut rng, c),
            );
            for lab in [folded, paired, official] {
                assert_eq!(lab.channels(), c);
                let expected = reference_lab(&x, [h, w, c], &lab);
                assert_eq!(lab_pack(&x, h, w, &lab), expected);
                for (variant, threads) in variants().into_iter().flat_map(|v| [(v, 1), (v, 2)]) {
                    let ours = pool(threads).install(|| lab_pack_with(variant, &x, h, w, &lab));
                    let what = format!("{variant:?} on {threads} thread(s) {h}x{w}x{c} {lab:?}");
                    assert_eq!(ours, expected, "{what}");
                }
            }
        }
    }
    // All-zero scores are ties: -1 everywhere, with clean padding bits.
    let lab = LabKernel::folded(3, vec![0.0; 27], vec![0.0; 3]);
    let map = lab_pack(&[1.0; 12], 2, 2, &lab);
    assert_eq!(map.data, vec![0b111; 4]);
}

/// Float inputs binarized on the fly convolve as their packed maps, for every variant,
/// padding and stride, in both the row-parallel and the small-map (channel-group) schedules.
#[test]
fn conv_binarizes_float_inputs_as_their_packed_maps() {
    let mut rng = Rng(11);
    for (case, &(h, w, c, oc)) in [
        (7, 5, 3, 5),
        (1, 1, 1, 1),
        (9, 8, 65, 40),
        (6, 11, 130, 64),
        (2, 3, 64, 33),
    ]
    .iter()
    .enumerate()
    {
        let x: Vec<f32> = (0..h * w * c).map(|_| rng.float()).collect();
        let values = |rng: &mut Rng, n: usize| (0..n).map(|_| rng.float()).collect::<Vec<_>>();
        let lab = if case % 2 == 0 {
            LabKernel::folded(c, values(&mut rng, 9 * c), values(&mut rng, c))
        } else {
            LabKernel::paired(
                c,
                values(&mut rng, 9 * c),
                (0..c).map(|k| (c + k) / 2).collect(),
                values(&mut rng, 9 * c),
                (0..c).map(|k| k / 2).collect(),
                values(&mut rng, c),
            )
        };
        let weights = PackedConvWeights::from_signs(&rng.signs(oc * c * 9), oc, c, [3, 3]);
        for (stride, pad_value) in [([1, 1], PadValue::One), ([2, 2], PadValue::Zero)] {
            let (t, b) = same_pads(h, 3, stride[0]);
            let (l, r) = same_pads(w, 3, stride[1]);
            let g = ConvGeometry {
                stride,
                pads: [t, b, l, r],
                pad_value,
            };
            let (oh, ow) = g.output_size(h, w, [3, 3]);
            for variant in variants() {
                let conv = BinaryConv::with_variant(variant, &weights, g);
                assert_eq!(conv.output_size(h, w), (oh, ow));
                let run = |input: ConvInput| {
                    let mut out = vec![i32::MIN; oh * ow * oc];
                    conv.run(input, &mut out, |_, dots, row| row.copy_from_slice(dots));
                    out
                };
                let signs = PackedMap::from_signs(&x, h, w, c);
                let labs = lab_pack_with(variant, &x, h, w, &lab);
                let what = format!("{variant:?} {h}x{w}x{c} -> {oc}, {g:?}");
                for threads in [1, 2, 3] {
                    let pool = pool(threads);
                    pool.install(|| {
                        let height = h;
                        let width = w;
                        assert_eq!(
                            run(ConvInput::Signs {
                                x: &x,
                                height,
                                width
                            }),
                            run(ConvInput::Packed(&signs)),
                            "sign, {what}"
                        );
                        let input = ConvInput::Lab {
                            x: &x,
                            height,
                            width,
                            lab: &lab,
                        };
                        assert_eq!(run(input), run(ConvInput::Packed(&labs)), "LAB, {what}");
                    });
                }
            }
        }
    }
}

/// A convolution over its own float input finds every input value in its rows (the whole
/// input is binarized first) and computes the dots of the input's packed signs or LAB.
#[test]
fn conv_in_place_reads_its_input_before_writing() {
    let mut rng = Rng(12);
    for &(h, w, c) in &[(7, 5, 3), (1, 1, 1), (9, 8, 65), (3, 12, 128)] {
        let x: Vec<f32> = (0..h * w * c).map(|_| rng.float()).collect();
        let values = |rng: &mut Rng, n: usize| (0..n).map(|_| rng.float()).collect::<Vec<_>>();
        let lab = LabKernel::folded(c, values(&mut rng, 9 * c), values(&mut rng, c));
        let weights = PackedConvWeights::from_signs(&rng.signs(c * c * 9), c, c, [3, 3]);
        for pad_value in [PadValue::One, PadValue::Zero] {
            let g = ConvGeometry {
                stride: [1, 1],
                pads: [1, 1, 1, 1],
                pad_value,
            };
            for variant in variants() {
                let conv = BinaryConv::with_variant(variant, &weights, g);
                let expected = |packed: &PackedMap| {
                    let mut dots = vec![0; h * w * c];
                    conv.run(ConvInput::Packed(packed), &mut dots, |_, d, row| {
                        row.copy_from_slice(d)
                    });
                    dots.iter()
                        .zip(&x)
                        .map(|(&d, &x)| d as f32 + x)
                        .collect::<Vec<_>>()
                };
                let what = format!("{variant:?} {h}x{w}x{c}, {pad_value:?}");
                for threads in [1, 2, 3] {
                    pool(threads).install(|| {
                        for (lab, packed) in [
                            (None, PackedMap::from_signs(&x, h, w, c)),
                            (Some(&lab), lab_pack_with(variant, &x, h, w, &lab)),
                        ] {
                            let mut out = x.clone();
                            conv.run_in_place(&mut out, h, w, lab, |_, dots, row| {
                                for (v, &d) in row.iter_mut().zip(dots) {
                                    *v += d as f32;
                                }
                            });
                            assert_eq!(out, expected(&packed), "LAB {}, {what}", lab.is_some());
                        }
                    });
                }
            }
        }
    }
}

#[test]
fn max_pool_matches_reference() {
    let mut rng = Rng(9);
    for _ in 0..40 {
        let c = [1, 3, 64, 65, 130][rng.below(5)];
        let (h, w) = (1 + rng.below(9), 1 + rng.below(9));
        let size = [1 + rng.below(3), 1 + rng.below(3)];
        let stride = [1 + rng.below(2), 1 + rng.below(2)];
        let pads = [rng.below(2), rng.below(2), rng.below(2), rng.below(2)];
        let x = rng.signs(h * w * c);
        let window = Window {
            kernel: size,
            stride,
            pads,
        };
        let ours = max_pool(&PackedMap::from_signs(&x, h, w, c), window);
        let out = |n: usize, k: usize, s: usize| if n < k { 0 } else { (n - k) / s + 1 };
        let oh = out(h + pads[0] + pads[1], size[0], stride[0]);
        let ow = out(w + pads[2] + pads[3], size[1], stride[1]);
        let mut expected = Vec::new();
        for oy in 0..oh {
            for ox in 0..ow {
                for ch in 0..c {
                    let mut m = -1f32;
                    for ky in 0..size[0] {
                        for kx in 0..size[1] {
                            let iy = (oy * stride[0] + ky) as isize - pads[0] as isize;
                            let ix = (ox * stride[1] + kx) as isize - pads[2] as isize;
                            if iy >= 0 && ix >= 0 && iy < h as isize && ix < w as isize {
                                m = m.max(x[(iy as usize * w + ix as usize) * c + ch]);
                            }
                        }
                    }
                    expected.push(m);
                }
            }
        }
        assert_eq!(ours, PackedMap::from_signs(&expected, oh, ow, c));
    }
}

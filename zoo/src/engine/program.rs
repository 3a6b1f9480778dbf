//! The engine's compiled steps as one flat program of launches between numbered buffers, for
//! devices that run a model as a sequence of kernels over batches (the GPU, `gpu`): each
//! launch reads buffers written by earlier ones and writes a buffer of its own, so every
//! buffer can be laid out once per batch size and the whole sequence replayed.
//!
//! The program is built from the same [`Step`]s [`super::Engine`] runs, with the same
//! semantics (a residual added in the last step's output transform where it can be, else after
//! it; LAB reading packed maps as ±1; a binary convolution emitting packed signs for a next
//! layer that reads only signs), and borrows their weights. Its CPU interpretation in this
//! module's tests gives the engine's logits for every shipped spec, which checks the wiring
//! apart from any device.

use std::borrow::Cow;

use zoo_kernels::packed::{ConvGeometry, LabKernel, PackedConvWeights};

use super::float::{Epilogue, PackedWeights, Window};
use super::{OpInfo, Signs, Step};

/// A buffer: floats or packed signs, of `shape` (`[height, width, channels]`) per image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Value {
    pub buf: usize,
    pub bits: bool,
    pub shape: [usize; 3],
}

/// The launches of one run.
pub(super) struct Program<'s> {
    /// Every buffer, in the order launches first write them.
    pub buffers: Vec<Value>,
    pub launches: Vec<Launch<'s>>,
    /// The input, NHWC floats, written by the first launch from the NCHW images.
    pub input: Value,
    /// The logits.
    pub output: Value,
    /// The most dots per image a binary convolution computes.
    pub dots: usize,
    /// The engine's ops and, last, the input's transpose: what each launch is profiled under.
    pub ops: Vec<OpInfo>,
    /// The memory each buffer lives in: buffers whose lives do not overlap share a slot (of
    /// their kind, floats or packed signs).
    pub slots: Slots,
}

/// Where a program's buffers live: `slot[buffer]`, and each slot's kind (`true` for packed
/// signs) and size per image (floats or `u32` words).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Slots {
    pub slot: Vec<usize>,
    pub bits: Vec<bool>,
    pub size: Vec<usize>,
}

impl Value {
    /// Floats, or `u32` words, per image.
    pub fn size(&self) -> usize {
        let [h, w, c] = self.shape;
        match self.bits {
            true => h * w * 2 * c.div_ceil(64),
            false => h * w * c,
        }
    }
}

impl Slots {
    /// Slots for `buffers`: a launch's output takes a free slot of its kind (the smallest
    /// that fits, else the largest, grown) when first written; a buffer's slot is free again
    /// after the last launch that reads it, except `keep`'s.
    fn assign(buffers: &[Value], launches: &[Launch], keep: usize) -> Slots {
        let mut last = vec![0; buffers.len()];
        for (i, launch) in launches.iter().enumerate() {
            for b in launch
                .kind
                .inputs()
                .into_iter()
                .chain([launch.kind.output()])
            {
                last[b] = i;
            }
        }
        last[keep] = usize::MAX;
        let mut slots = Slots {
            slot: vec![usize::MAX; buffers.len()],
            bits: Vec::new(),
            size: Vec::new(),
        };
        let mut free: Vec<usize> = Vec::new();
        for (i, launch) in launches.iter().enumerate() {
            let out = launch.kind.output();
            if slots.slot[out] == usize::MAX {
                let (bits, size) = (buffers[out].bits, buffers[out].size());
                let fits = |&&s: &&usize| slots.bits[s] == bits && slots.size[s] >= size;
                let of_kind = |&&s: &&usize| slots.bits[s] == bits;
                let pick = free
                    .iter()
                    .filter(fits)
                    .min_by_key(|&&s| slots.size[s])
                    .or_else(|| free.iter().filter(of_kind).max_by_key(|&&s| slots.size[s]))
                    .copied();
                let s = match pick {
                    Some(s) => {
                        free.retain(|&f| f != s);
                        slots.size[s] = slots.size[s].max(size);
                        s
                    }
                    None => {
                        slots.bits.push(bits);
                        slots.size.push(size);
                        slots.bits.len() - 1
                    }
                };
                slots.slot[out] = s;
            }
            for (b, _) in last.iter().enumerate().filter(|&(_, &l)| l == i) {
                free.push(slots.slot[b]);
            }
        }
        slots
    }
}

/// One launch: what it computes and the op it belongs to.
pub(super) struct Launch<'s> {
    pub op: usize,
    pub kind: Kind<'s>,
}

/// What a pooling launch computes over the taps inside the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum PoolMode {
    Max,
    /// The max pool of the map's ReLU (a ReLU joined to the pool).
    MaxOfRelu,
    Average,
}

/// A launch's computation. `x`, `residual` and `out` are buffers; `out` is written.
pub(super) enum Kind<'s> {
    /// The NCHW images into `out`.
    Transpose {
        out: usize,
    },
    /// Larq's sign, packed.
    PackSigns {
        x: usize,
        out: usize,
    },
    /// LAB's binarization, packed.
    Lab {
        lab: &'s LabKernel,
        x: usize,
        out: usize,
    },
    /// Packed signs as ±1 floats.
    Unpack {
        x: usize,
        out: usize,
    },
    /// A binary convolution of packed `x` with its output transform and residual; `out`
    /// floats, or packed signs.
    BinaryConv {
        weights: &'s PackedConvWeights,
        geometry: ConvGeometry,
        epilogue: &'s Epilogue,
        x: usize,
        residual: Option<usize>,
        out: usize,
    },
    FloatConv {
        weight: &'s PackedWeights,
        window: Window,
        pad_value: f32,
        epilogue: &'s Epilogue,
        x: usize,
        residual: Option<usize>,
        out: usize,
    },
    /// A depthwise convolution (the blur's weights made here).
    Depthwise {
        weight: Cow<'s, [f32]>,
        multiplier: usize,
        window: Window,
        epilogue: Cow<'s, Epilogue>,
        x: usize,
        residual: Option<usize>,
        out: usize,
    },
    /// The output transform alone, and a residual.
    Transform {
        epilogue: Cow<'s, Epilogue>,
        x: usize,
        residual: Option<usize>,
        out: usize,
    },
    MaxPoolBits {
        window: Window,
        x: usize,
        out: usize,
    },
    Pool {
        window: Window,
        mode: PoolMode,
        x: usize,
        out: usize,
    },
    GlobalAvgPool {
        x: usize,
        out: usize,
    },
    /// The same values, flattened to `1 x 1 x (h w c)`.
    Copy {
        x: usize,
        out: usize,
    },
    /// `x` into channels `offset..` of `out`.
    Concat {
        x: usize,
        out: usize,
        offset: usize,
    },
    Dense {
        weight: &'s PackedWeights,
        epilogue: &'s Epilogue,
        x: usize,
        out: usize,
    },
}

impl Kind<'_> {
    /// The buffers the launch reads.
    pub fn inputs(&self) -> Vec<usize> {
        match *self {
            Kind::Transpose { .. } => vec![],
            Kind::PackSigns { x, .. }
            | Kind::Lab { x, .. }
            | Kind::Unpack { x, .. }
            | Kind::MaxPoolBits { x, .. }
            | Kind::Pool { x, .. }
            | Kind::GlobalAvgPool { x, .. }
            | Kind::Copy { x, .. }
            | Kind::Concat { x, .. }
            | Kind::Dense { x, .. } => vec![x],
            Kind::BinaryConv { x, residual, .. }
            | Kind::FloatConv { x, residual, .. }
            | Kind::Depthwise { x, residual, .. }
            | Kind::Transform { x, residual, .. } => {
                [Some(x), residual].into_iter().flatten().collect()
            }
        }
    }

    /// The buffer the launch writes.
    pub fn output(&self) -> usize {
        match *self {
            Kind::Transpose { out }
            | Kind::PackSigns { out, .. }
            | Kind::Lab { out, .. }
            | Kind::Unpack { out, .. }
            | Kind::BinaryConv { out, .. }
            | Kind::FloatConv { out, .. }
            | Kind::Depthwise { out, .. }
            | Kind::Transform { out, .. }
            | Kind::MaxPoolBits { out, .. }
            | Kind::Pool { out, .. }
            | Kind::GlobalAvgPool { out, .. }
            | Kind::Copy { out, .. }
            | Kind::Concat { out, .. }
            | Kind::Dense { out, .. } => out,
        }
    }
}

impl<'s> Program<'s> {
    /// The program of `steps` (with `ops`, the engine's) on images of `input`.
    pub fn new(steps: &'s [Step], ops: &[OpInfo], input: [usize; 3]) -> Program<'s> {
        let mut ops = ops.to_vec();
        ops.push(OpInfo {
            name: "input".into(),
            kind: "nchw_to_nhwc",
            output: format!("{}x{}x{}", input[0], input[1], input[2]),
        });
        let mut builder = Builder {
            buffers: Vec::new(),
            launches: Vec::new(),
            dots: 0,
        };
        let transpose = ops.len() - 1;
        let x = builder.buffer(false, input);
        builder.push(transpose, Kind::Transpose { out: x.buf });
        let out = builder.sequence(steps, x, None);
        let output = builder.floats_of(steps.last().map_or(transpose, op_of), out);
        let slots = Slots::assign(&builder.buffers, &builder.launches, output.buf);
        Program {
            buffers: builder.buffers,
            launches: builder.launches,
            input: x,
            output,
            dots: builder.dots,
            ops,
            slots,
        }
    }
}

/// Walks steps into launches.
struct Builder<'s> {
    buffers: Vec<Value>,
    launches: Vec<Launch<'s>>,
    dots: usize,
}

impl<'s> Builder<'s> {
    fn buffer(&mut self, bits: bool, shape: [usize; 3]) -> Value {
        let value = Value {
            buf: self.buffers.len(),
            bits,
            shape,
        };
        self.buffers.push(value);
        value
    }

    fn push(&mut self, op: usize, kind: Kind<'s>) {
        self.launches.push(Launch { op, kind });
    }

    /// A float buffer of `shape`, written by `launch(out)`.
    fn floats(
        &mut self,
        op: usize,
        shape: [usize; 3],
        launch: impl FnOnce(usize) -> Kind<'s>,
    ) -> Value {
        let out = self.buffer(false, shape);
        self.push(op, launch(out.buf));
        out
    }

    /// `x` as floats (packed signs as ±1).
    fn floats_of(&mut self, op: usize, x: Value) -> Value {
        match x.bits {
            false => x,
            true => self.floats(op, x.shape, |out| Kind::Unpack { x: x.buf, out }),
        }
    }

    /// `x`'s signs, packed: by sign or by LAB.
    fn signs(&mut self, op: usize, signs: &'s Signs, x: Value) -> Value {
        match signs {
            Signs::Sign if x.bits => x,
            Signs::Sign => {
                let out = self.buffer(true, x.shape);
                self.push(
                    op,
                    Kind::PackSigns {
                        x: x.buf,
                        out: out.buf,
                    },
                );
                out
            }
            Signs::Lab(lab) => {
                let x = self.floats_of(op, x);
                let out = self.buffer(true, x.shape);
                self.push(
                    op,
                    Kind::Lab {
                        lab,
                        x: x.buf,
                        out: out.buf,
                    },
                );
                out
            }
        }
    }

    /// Steps on `x`, adding `residual` to the output inside the last step's output transform
    /// where it can, else after it (as `Run::sequence`).
    fn sequence(&mut self, steps: &'s [Step], x: Value, mut residual: Option<Value>) -> Value {
        let mut current = x;
        for (i, step) in steps.iter().enumerate() {
            let fused = match i + 1 == steps.len() && step.fuses_residual() {
                true => residual.take(),
                false => None,
            };
            current = self.step(step, current, fused);
        }
        let Some(r) = residual else {
            return current;
        };
        let op = steps.last().map_or(0, op_of);
        let x = self.floats_of(op, current);
        self.floats(op, x.shape, |out| Kind::Transform {
            epilogue: Cow::Owned(Epilogue::default()),
            x: x.buf,
            residual: Some(r.buf),
            out,
        })
    }

    fn step(&mut self, step: &'s Step, x: Value, residual: Option<Value>) -> Value {
        let [h, w, c] = x.shape;
        let residual = residual.map(|r| r.buf);
        match step {
            Step::FloatConv {
                op,
                weight,
                window,
                pad_value,
                epilogue,
            } => {
                let x = self.floats_of(*op, x);
                let (oh, ow) = window.output(h, w);
                self.floats(*op, [oh, ow, weight.n()], |out| Kind::FloatConv {
                    weight,
                    window: *window,
                    pad_value: *pad_value,
                    epilogue,
                    x: x.buf,
                    residual,
                    out,
                })
            }
            Step::BinaryConv { .. } => self.binary_conv(step, x, residual),
            Step::Depthwise {
                op,
                weight,
                multiplier,
                window,
                epilogue,
            } => {
                let x = self.floats_of(*op, x);
                let (oh, ow) = window.output(h, w);
                self.floats(*op, [oh, ow, c * multiplier], |out| Kind::Depthwise {
                    weight: Cow::Borrowed(weight),
                    multiplier: *multiplier,
                    window: *window,
                    epilogue: Cow::Borrowed(epilogue),
                    x: x.buf,
                    residual,
                    out,
                })
            }
            Step::Channel { op, epilogue } => {
                let x = self.floats_of(*op, x);
                self.floats(*op, x.shape, |out| Kind::Transform {
                    epilogue: Cow::Borrowed(epilogue),
                    x: x.buf,
                    residual,
                    out,
                })
            }
            Step::Binarize { op, signs } => self.signs(*op, signs, x),
            Step::MaxPool { op, window, relu } => self.max_pool(*op, window, *relu, x),
            Step::AvgPool { op, window } => {
                let x = self.floats_of(*op, x);
                let (oh, ow) = window.output(h, w);
                self.floats(*op, [oh, ow, c], |out| Kind::Pool {
                    window: *window,
                    mode: PoolMode::Average,
                    x: x.buf,
                    out,
                })
            }
            Step::Blur { op, stride } => {
                let x = self.floats_of(*op, x);
                let (weight, window) = super::float::blur_kernel(h, w, c, *stride);
                let (oh, ow) = window.output(h, w);
                self.floats(*op, [oh, ow, c], |out| Kind::Depthwise {
                    weight: Cow::Owned(weight),
                    multiplier: 1,
                    window,
                    epilogue: Cow::Owned(Epilogue::default()),
                    x: x.buf,
                    residual: None,
                    out,
                })
            }
            Step::GlobalAvgPool { op } => {
                let x = self.floats_of(*op, x);
                self.floats(*op, [1, 1, c], |out| Kind::GlobalAvgPool { x: x.buf, out })
            }
            Step::Flatten { op } => {
                let x = self.floats_of(*op, x);
                self.floats(*op, [1, 1, h * w * c], |out| Kind::Copy { x: x.buf, out })
            }
            Step::Dense {
                op,
                weight,
                epilogue,
            } => {
                let x = self.floats_of(*op, x);
                self.floats(*op, [1, 1, weight.n()], |out| Kind::Dense {
                    weight,
                    epilogue,
                    x: x.buf,
                    out,
                })
            }
            Step::Duplicate { op } => {
                let x = self.floats_of(*op, x);
                self.concat(*op, &[x, x])
            }
            Step::Residual { body, shortcut } => {
                let short = match shortcut.is_empty() {
                    true => x,
                    false => self.sequence(shortcut, x, None),
                };
                let op = body.first().or(shortcut.first()).map_or(0, op_of);
                let short = self.floats_of(op, short);
                self.sequence(body, x, Some(short))
            }
            Step::Concat { branches } => {
                let mut outs = Vec::with_capacity(branches.len());
                for branch in branches {
                    let out = self.sequence(branch, x, None);
                    outs.push(self.floats_of(branch.last().map_or(0, op_of), out));
                }
                let op = branches.iter().flatten().last().map_or(0, op_of);
                self.concat(op, &outs)
            }
        }
    }

    /// A binary convolution (`step`) of `x`'s signs, its output packed where the next layer
    /// reads only signs.
    fn binary_conv(&mut self, step: &'s Step, x: Value, residual: Option<usize>) -> Value {
        let Step::BinaryConv {
            op,
            signs,
            conv,
            source,
            epilogue,
            pack_output,
        } = step
        else {
            unreachable!("binary_conv is called with binary convolutions only")
        };
        let [h, w, _] = x.shape;
        let input = self.signs(*op, signs, x);
        let (oh, ow) = conv.output_size(h, w);
        let co = conv.out_channels();
        self.dots = self.dots.max(oh * ow * co);
        let out = self.buffer(*pack_output, [oh, ow, co]);
        let (weights, geometry) = &**source;
        self.push(
            *op,
            Kind::BinaryConv {
                weights,
                geometry: *geometry,
                epilogue,
                x: input.buf,
                residual,
                out: out.buf,
            },
        );
        out
    }

    /// Max pooling of `x`: on its bits where it is packed, else on floats (after a ReLU where
    /// `relu`).
    fn max_pool(&mut self, op: usize, window: &Window, relu: bool, x: Value) -> Value {
        let [h, w, c] = x.shape;
        let (oh, ow) = window.output(h, w);
        let out = self.buffer(x.bits, [oh, ow, c]);
        let kind = match x.bits {
            true => Kind::MaxPoolBits {
                window: *window,
                x: x.buf,
                out: out.buf,
            },
            false => Kind::Pool {
                window: *window,
                mode: match relu {
                    true => PoolMode::MaxOfRelu,
                    false => PoolMode::Max,
                },
                x: x.buf,
                out: out.buf,
            },
        };
        self.push(op, kind);
        out
    }

    /// The float maps `parts` (of one height and width) concatenated along channels.
    fn concat(&mut self, op: usize, parts: &[Value]) -> Value {
        let [h, w, _] = parts[0].shape;
        let channels = parts.iter().map(|p| p.shape[2]).sum();
        let out = self.buffer(false, [h, w, channels]);
        let mut offset = 0;
        for part in parts {
            self.push(
                op,
                Kind::Concat {
                    x: part.buf,
                    out: out.buf,
                    offset,
                },
            );
            offset += part.shape[2];
        }
        out
    }
}

/// The op a step's launches are profiled under (the last of a nested group).
fn op_of(step: &Step) -> usize {
    match step {
        Step::FloatConv { op, .. }
        | Step::BinaryConv { op, .. }
        | Step::Depthwise { op, .. }
        | Step::Channel { op, .. }
        | Step::Binarize { op, .. }
        | Step::MaxPool { op, .. }
        | Step::AvgPool { op, .. }
        | Step::Blur { op, .. }
        | Step::GlobalAvgPool { op }
        | Step::Flatten { op }
        | Step::Dense { op, .. }
        | Step::Duplicate { op } => *op,
        Step::Residual { body, shortcut } => body.last().or(shortcut.last()).map_or(0, op_of),
        Step::Concat { branches } => branches.iter().flatten().last().map_or(0, op_of),
    }
}

#[cfg(test)]
mod tests {
    use zoo_kernels::packed::{self, ConvInput, PackedMap};

    use super::super::float::{self, FloatMap};
    use super::super::{binary_conv, Engine};
    use super::*;
    use crate::spec::{InputShape, ModelConfig};

    /// A buffer on the CPU: one map per image.
    #[derive(Clone)]
    enum Maps {
        Floats(Vec<FloatMap>),
        Bits(Vec<PackedMap>),
    }

    impl Maps {
        fn floats(&self) -> &[FloatMap] {
            match self {
                Maps::Floats(f) => f,
                Maps::Bits(_) => panic!("a launch reads floats from a packed buffer"),
            }
        }

        fn bits(&self) -> &[PackedMap] {
            match self {
                Maps::Bits(b) => b,
                Maps::Floats(_) => panic!("a launch reads signs from a float buffer"),
            }
        }

        /// Whether every map has the kind and shape of the buffer `declared`.
        fn fits(&self, declared: Value) -> bool {
            let shape_ok = |h, w, c| [h, w, c] == declared.shape;
            match self {
                Maps::Floats(f) => {
                    !declared.bits && f.iter().all(|m| shape_ok(m.height, m.width, m.channels))
                }
                Maps::Bits(b) => {
                    declared.bits && b.iter().all(|m| shape_ok(m.height, m.width, m.channels))
                }
            }
        }
    }

    /// The first `batch` NCHW images as `shape` (HWC) float maps: the program's first launch.
    fn transpose(images: &[f32], batch: usize, [h, w, c]: [usize; 3]) -> Maps {
        let maps = images.chunks(h * w * c).take(batch).map(|image| {
            let mut data = vec![0.0; h * w * c];
            for ch in 0..c {
                for p in 0..h * w {
                    data[p * c + ch] = image[ch * h * w + p];
                }
            }
            FloatMap {
                height: h,
                width: w,
                channels: c,
                data,
            }
        });
        Maps::Floats(maps.collect())
    }

    /// The program's slots on the CPU as it runs: the buffer each holds now, and its maps.
    struct Memory<'p> {
        slots: &'p Slots,
        held: Vec<Option<(usize, Maps)>>,
        batch: usize,
    }

    impl Memory<'_> {
        /// Buffer `i`, which must be the one its slot holds.
        fn read(&self, i: usize) -> Maps {
            match &self.held[self.slots.slot[i]] {
                Some((held, maps)) if *held == i => maps.clone(),
                Some((held, _)) => panic!("buffer {i} was overwritten by buffer {held}"),
                None => panic!("buffer {i} is read before it is written"),
            }
        }

        fn floats(&self, i: usize) -> Vec<FloatMap> {
            self.read(i).floats().to_vec()
        }

        /// The float maps of buffer `i` where its slot holds it already (a concatenation
        /// written part by part).
        fn held(&self, i: usize) -> Option<Vec<FloatMap>> {
            match &self.held[self.slots.slot[i]] {
                Some((held, maps)) if *held == i => Some(maps.floats().to_vec()),
                _ => None,
            }
        }

        /// Each image's residual values (none without a residual).
        fn residuals(&self, r: Option<usize>) -> Vec<Option<Vec<f32>>> {
            match r {
                Some(r) => self.floats(r).into_iter().map(|m| Some(m.data)).collect(),
                None => vec![None; self.batch],
            }
        }

        /// `f` on each image of the float buffer `x` with its residual.
        fn each(
            &self,
            x: usize,
            r: Option<usize>,
            f: &dyn Fn(&FloatMap, Option<&[f32]>) -> FloatMap,
        ) -> Maps {
            let rs = self.residuals(r);
            let out = self
                .floats(x)
                .iter()
                .zip(&rs)
                .map(|(m, r)| f(m, r.as_deref()))
                .collect();
            Maps::Floats(out)
        }

        /// Stores `result` as buffer `out` (`declared`) of launch `op`, checking that it has
        /// the buffer's kind and shape and fits its slot.
        fn write(&mut self, out: usize, declared: Value, result: Maps, op: usize) {
            assert!(
                result.fits(declared),
                "launch {op:?} writes its buffer's shape"
            );
            let slot = self.slots.slot[out];
            assert!(
                self.slots.bits[slot] == declared.bits && self.slots.size[slot] >= declared.size(),
                "buffer {out} fits its slot"
            );
            self.held[slot] = Some((out, result));
        }
    }

    /// The program run launch by launch with the CPU engine's kernels, image by image, in its
    /// slots, checking that every launch reads buffers written before it and not overwritten
    /// since (by a buffer sharing the slot), and writes its declared buffer into a slot of its
    /// kind and size.
    fn interpret(program: &Program, images: &[f32], batch: usize) -> Vec<f32> {
        let slots = &program.slots;
        let mut memory = Memory {
            slots,
            held: vec![None; slots.bits.len()],
            batch,
        };
        for launch in &program.launches {
            let out = launch.kind.output();
            // The GPU lends a launch its output slot while it reads the others.
            assert!(
                launch
                    .kind
                    .inputs()
                    .iter()
                    .all(|&b| slots.slot[b] != slots.slot[out]),
                "launch {} writes a slot it reads",
                launch.op
            );
            let declared = program.buffers[out];
            let result = execute(&launch.kind, &memory, images, declared, out);
            memory.write(out, declared, result, launch.op);
        }
        memory
            .floats(program.output.buf)
            .iter()
            .flat_map(|m| m.data.clone())
            .collect()
    }

    /// One launch on the CPU: the maps of its output buffer `out` (`declared`).
    fn execute(kind: &Kind, memory: &Memory, images: &[f32], declared: Value, out: usize) -> Maps {
        match kind {
            Kind::Transpose { .. } => transpose(images, memory.batch, declared.shape),
            Kind::PackSigns { x, .. } => Maps::Bits(
                memory
                    .floats(*x)
                    .iter()
                    .map(|m| PackedMap::from_signs(&m.data, m.height, m.width, m.channels))
                    .collect(),
            ),
            Kind::Lab { lab, x, .. } => Maps::Bits(
                memory
                    .floats(*x)
                    .iter()
                    .map(|m| packed::lab_pack(&m.data, m.height, m.width, lab))
                    .collect(),
            ),
            Kind::Unpack { x, .. } => Maps::Floats(
                memory
                    .read(*x)
                    .bits()
                    .iter()
                    .map(|p| FloatMap {
                        height: p.height,
                        width: p.width,
                        channels: p.channels,
                        data: p.to_signs(),
                    })
                    .collect(),
            ),
            Kind::BinaryConv {
                weights,
                geometry,
                epilogue,
                x,
                residual: r,
                ..
            } => {
                let conv = packed::BinaryConv::new(weights, *geometry);
                let outs: Vec<_> = memory
                    .read(*x)
                    .bits()
                    .iter()
                    .zip(memory.residuals(*r))
                    .map(|(map, r)| {
                        let input = ConvInput::Packed(map);
                        binary_conv(input, &conv, epilogue, declared.bits, r.as_deref())
                    })
                    .collect();
                match declared.bits {
                    true => Maps::Bits(outs.into_iter().map(packed_of).collect()),
                    false => Maps::Floats(outs.into_iter().map(floats_of).collect()),
                }
            }
            Kind::FloatConv {
                weight,
                window,
                pad_value,
                epilogue,
                x,
                residual: r,
                ..
            } => memory.each(*x, *r, &|m, r| {
                float::conv(m, weight, *window, *pad_value, epilogue, r)
            }),
            Kind::Depthwise {
                weight,
                multiplier,
                window,
                epilogue,
                x,
                residual: r,
                ..
            } => memory.each(*x, *r, &|m, r| {
                float::depthwise(m, weight, *multiplier, *window, epilogue, r)
            }),
            Kind::Transform {
                epilogue,
                x,
                residual: r,
                ..
            } => memory.each(*x, *r, &|m, r| {
                let mut m = m.clone();
                epilogue.apply_map(&mut m.data, m.channels, r);
                m
            }),
            Kind::MaxPoolBits { window, x, .. } => Maps::Bits(
                memory
                    .read(*x)
                    .bits()
                    .iter()
                    .map(|p| packed::max_pool(p, *window))
                    .collect(),
            ),
            Kind::Pool {
                window, mode, x, ..
            } => memory.each(*x, None, &|m, _| match mode {
                PoolMode::Average => float::avg_pool(m, *window),
                _ => float::max_pool(m, *window, *mode == PoolMode::MaxOfRelu),
            }),
            Kind::GlobalAvgPool { x, .. } => {
                memory.each(*x, None, &|m, _| float::global_avg_pool(m))
            }
            Kind::Copy { x, .. } => Maps::Floats(
                memory
                    .floats(*x)
                    .into_iter()
                    .map(|m| FloatMap {
                        height: 1,
                        width: 1,
                        channels: m.data.len(),
                        data: m.data,
                    })
                    .collect(),
            ),
            Kind::Concat { x, offset, .. } => {
                let [h, w, c] = declared.shape;
                let mut outs = memory
                    .held(out)
                    .unwrap_or_else(|| vec![FloatMap::zeros(h, w, c); memory.batch]);
                for (o, part) in outs.iter_mut().zip(memory.floats(*x)) {
                    for p in 0..h * w {
                        let from = &part.data[p * part.channels..][..part.channels];
                        o.data[p * c + offset..][..part.channels].copy_from_slice(from);
                    }
                }
                Maps::Floats(outs)
            }
            Kind::Dense {
                weight,
                epilogue,
                x,
                ..
            } => memory.each(*x, None, &|m, _| float::dense(m, weight, epilogue)),
        }
    }

    fn packed_of(value: super::super::Value) -> PackedMap {
        match value {
            super::super::Value::Packed(p) => p,
            super::super::Value::Float(_) => panic!("a binary convolution packs its output"),
        }
    }

    fn floats_of(value: super::super::Value) -> FloatMap {
        match value {
            super::super::Value::Float(m) => m,
            super::super::Value::Packed(_) => panic!("a binary convolution writes floats"),
        }
    }

    /// Every shipped spec's program, interpreted on the CPU, gives the engine's logits bit for
    /// bit: the launches, their buffers and the residuals are wired as the engine runs its steps.
    #[test]
    fn every_shipped_spec_runs_as_its_program() {
        for (i, entry) in crate::list().iter().enumerate() {
            let side = if entry.name.starts_with("xnornet") {
                224
            } else {
                32
            };
            let config = ModelConfig {
                input: InputShape {
                    height: side,
                    width: side,
                    channels: 3,
                },
                classes: 10,
            };
            let model = super::super::bench::random_model(entry.name, &config, i as u64).unwrap();
            let engine = Engine::new(&model, 1).unwrap();
            let images = super::super::bench::random_images(&engine, 2, 7);
            let expected = engine.run(&images, 2).unwrap();
            let program = Program::new(&engine.steps, &engine.ops, [side, side, 3]);
            assert_eq!(
                program.launches.first().map(|l| l.op),
                Some(engine.ops.len())
            );
            let got = interpret(&program, &images, 2);
            assert_eq!(got, expected, "{}", entry.name);
            // Sharing slots saves memory: at most half the buffers' floats and words.
            let all: usize = program.buffers.iter().map(Value::size).sum();
            let kept: usize = program.slots.size.iter().sum();
            assert!(2 * kept <= all, "{}: slots of {kept} for {all}", entry.name);
        }
    }
}

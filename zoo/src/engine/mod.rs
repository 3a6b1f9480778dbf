//! The inference engine: bit-packed XNOR-popcount execution of any spec, without candle.
//!
//! A model is first exported to a `.zoo` file ([`export`], `zoo export`): batch norm and kernel
//! scales folded into per-channel multipliers, binary kernels packed to bits, LAB folded into
//! one kernel and threshold per channel. The [`Engine`] walks the same spec IR as the candle
//! models and runs each node on one image at a time in NHWC layout:
//!
//! - a binarized convolution binarizes its float input (sign or LAB) straight into padded
//!   64-channel words, or takes the words the previous layer produced, and computes exact `±1`
//!   dot products with XOR and popcount ([`zoo_kernels::packed::BinaryConv`], weights laid out
//!   once; AVX-512, AVX2 or portable, chosen at run time), zero padding exact through a border
//!   correction, one padding as `+1` bits;
//! - the batch norm, scale, bias, ReLU, PReLU and residual addition that follow a layer run in
//!   its output transform ([`float::Epilogue`]) while the values are in registers; when the next
//!   layer only needs signs, the transform emits packed bits instead of floats;
//! - LAB runs as one fused depthwise-threshold-pack pass;
//! - full-precision layers (stem, transitions, head) run in f32: a matrix product against weights
//!   laid out once in panels ([`float::PackedWeights`]) for 1x1 convolutions, im2col and the
//!   dense head, or directly for short windows such as the stem's;
//! - a binary convolution whose residual is its own input, or a map the shortcut computed,
//!   writes its output over that map instead of a new one.
//!
//! Work inside each layer is split over the engine's own thread pool, whose threads spin
//! between layers while a call runs ([`awake`]).

mod awake;
pub mod bench;
mod export;
pub mod float;
mod format;
mod gemm;
#[cfg(feature = "cuda")]
pub mod gpu;
// The GPU's flat program of the steps; built in every build, so that its CPU interpretation is
// tested where there is no GPU.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
mod program;

use std::borrow::Cow;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use zoo_kernels::packed::{
    self, BinaryConv, ConvGeometry, ConvInput, LabKernel, PackedConvWeights, PackedMap, PadValue,
};

use crate::spec::{self, Activation, LabPairing, ModelConfig, Node, Op, Padding, Spec};
use crate::Error;

pub use export::export;
pub use float::FloatMap;
pub use format::{Stored, ZooModel, FORMAT};

use awake::with_threads_awake;
use float::{ChannelOp, Epilogue, PackedWeights, Window};

/// A model ready to run: its layers compiled from a [`ZooModel`] and a thread pool.
pub struct Engine {
    spec: Spec,
    config: ModelConfig,
    steps: Vec<Step>,
    ops: Vec<OpInfo>,
    pool: rayon::ThreadPool,
    threads: usize,
}

/// What a profiled layer is.
#[derive(Clone, Debug)]
struct OpInfo {
    name: String,
    kind: &'static str,
    output: String,
}

/// Time spent in one layer, from [`Engine::profile`].
#[derive(Clone, Debug, serde::Serialize)]
pub struct OpTime {
    /// The spec node (the first node of a fused group).
    pub name: String,
    /// What ran: `binary_conv`, `lab+binary_conv`, `conv`, `depthwise_conv`, ...
    pub kind: &'static str,
    /// Output shape `HxWxC`.
    pub output: String,
    /// Median milliseconds per image.
    pub ms: f64,
    /// Fraction of the summed medians.
    pub share: f64,
}

/// A feature map between layers: floats, or packed signs.
#[derive(Clone)]
enum Value {
    Float(FloatMap),
    Packed(PackedMap),
}

impl Value {
    /// The map as floats (`±1` for packed signs).
    fn to_float(&self) -> Cow<'_, FloatMap> {
        match self {
            Value::Float(m) => Cow::Borrowed(m),
            Value::Packed(p) => Cow::Owned(FloatMap {
                height: p.height,
                width: p.width,
                channels: p.channels,
                data: p.to_signs(),
            }),
        }
    }
}

/// How a binarized layer gets its input signs.
enum Signs {
    /// `sign(x)`, `+1` for `x >= 0`.
    Sign,
    /// LAB's fused depthwise comparison.
    Lab(LabKernel),
}

impl Signs {
    /// The signs of `x` as a convolution's input, binarized by the convolution itself.
    fn input<'a>(&'a self, x: &'a Value) -> ConvInput<'a> {
        match (self, x) {
            (Signs::Sign, Value::Packed(p)) => ConvInput::Packed(p),
            (Signs::Sign, Value::Float(m)) => ConvInput::Signs {
                x: &m.data,
                height: m.height,
                width: m.width,
            },
            (Signs::Lab(lab), Value::Float(m)) => ConvInput::Lab {
                x: &m.data,
                height: m.height,
                width: m.width,
                lab,
            },
            (Signs::Lab(_), Value::Packed(_)) => {
                unreachable!("the caller converts packed maps to floats for LAB")
            }
        }
    }

    fn apply<'a>(&self, x: &'a Value) -> Cow<'a, PackedMap> {
        match (self, x) {
            (Signs::Sign, Value::Packed(p)) => Cow::Borrowed(p),
            (Signs::Sign, Value::Float(m)) => Cow::Owned(PackedMap::from_signs(
                &m.data, m.height, m.width, m.channels,
            )),
            (Signs::Lab(lab), x) => {
                let m = x.to_float();
                Cow::Owned(packed::lab_pack(&m.data, m.height, m.width, lab))
            }
        }
    }
}

/// One compiled layer (or a fused group of a layer and its per-channel transforms).
enum Step {
    FloatConv {
        op: usize,
        weight: PackedWeights,
        window: Window,
        pad_value: f32,
        epilogue: Epilogue,
    },
    BinaryConv {
        op: usize,
        signs: Signs,
        conv: BinaryConv,
        /// The filters and geometry `conv` was laid out from (the GPU lays them out its way).
        source: Box<(PackedConvWeights, ConvGeometry)>,
        epilogue: Epilogue,
        /// Emit the signs of the transformed output, packed, for a binarized next layer.
        pack_output: bool,
    },
    Depthwise {
        op: usize,
        weight: Vec<f32>,
        multiplier: usize,
        window: Window,
        epilogue: Epilogue,
    },
    Channel {
        op: usize,
        epilogue: Epilogue,
    },
    Binarize {
        op: usize,
        signs: Signs,
    },
    MaxPool {
        op: usize,
        window: Window,
        /// Of the ReLU of the input (a ReLU before the pool, joined to it).
        relu: bool,
    },
    AvgPool {
        op: usize,
        window: Window,
    },
    Blur {
        op: usize,
        stride: usize,
    },
    GlobalAvgPool {
        op: usize,
    },
    Flatten {
        op: usize,
    },
    Dense {
        op: usize,
        weight: PackedWeights,
        epilogue: Epilogue,
    },
    Duplicate {
        op: usize,
    },
    Residual {
        body: Vec<Step>,
        shortcut: Vec<Step>,
    },
    Concat {
        branches: Vec<Vec<Step>>,
    },
}

impl Step {
    /// The output transform later per-channel layers can join, if any.
    fn epilogue_mut(&mut self) -> Option<&mut Epilogue> {
        match self {
            Step::FloatConv { epilogue, .. }
            | Step::Depthwise { epilogue, .. }
            | Step::Channel { epilogue, .. }
            | Step::Dense { epilogue, .. } => Some(epilogue),
            Step::BinaryConv {
                epilogue,
                pack_output: false,
                ..
            } => Some(epilogue),
            _ => None,
        }
    }

    /// True when the step, given `x` as input and as the residual to add, can write its output
    /// over `x` ([`Run::step_in_place`]).
    fn runs_in_place(&self, x: &FloatMap) -> bool {
        matches!(self, Step::BinaryConv { conv, pack_output: false, .. }
            if conv.output_size(x.height, x.width) == (x.height, x.width)
                && conv.out_channels() == x.channels)
    }

    /// True when the step adds a residual inside its output transform.
    fn fuses_residual(&self) -> bool {
        matches!(
            self,
            Step::FloatConv { .. }
                | Step::Depthwise { .. }
                | Step::Channel { .. }
                | Step::BinaryConv {
                    pack_output: false,
                    ..
                }
        )
    }
}

/// The steps of `model` with what each profiled layer is: the compiled program both engines run.
fn compile(model: &ZooModel) -> Result<(Vec<Step>, Vec<OpInfo>), Error> {
    let analysis = spec::analyze(&model.spec, &model.config)?;
    let mut compiler = Compiler {
        model,
        analysis: &analysis,
        ops: Vec::new(),
    };
    let steps = compiler.sequence(&model.spec.nodes)?;
    Ok((steps, compiler.ops))
}

impl Engine {
    /// Reads a `.zoo` file and compiles it for `threads` threads.
    pub fn load(path: &Path, threads: usize) -> Result<Engine, Error> {
        let model = ZooModel::load(path)?;
        Engine::new(&model, threads).map_err(|e| match e {
            Error::Run { message, .. } => Error::Run {
                path: path.display().to_string(),
                message,
            },
            e => e,
        })
    }

    /// Compiles `model` for `threads` threads (at least 1).
    pub fn new(model: &ZooModel, threads: usize) -> Result<Engine, Error> {
        let (steps, ops) = compile(model)?;
        let threads = threads.max(1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("zoo-engine-{i}"))
            .build()
            .map_err(|e| Error::Train(format!("cannot start {threads} threads: {e}")))?;
        Ok(Engine {
            spec: model.spec.clone(),
            config: model.config,
            ops,
            steps,
            pool,
            threads,
        })
    }

    /// The spec the model was exported from.
    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    /// The input shape and class count.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Threads used inside each layer.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The binary convolution kernel in use (`avx2`, `portable`, ...).
    pub fn kernel(&self) -> &'static str {
        packed::kernel_name()
    }

    /// Logits (`batch x classes`, row-major) for `batch` images in NCHW layout, as the candle
    /// models take them.
    pub fn run(&self, images: &[f32], batch: usize) -> Result<Vec<f32>, Error> {
        let per_image = self.image_len();
        if images.len() != batch * per_image {
            return Err(Error::Train(format!(
                "expected {batch} images of {} ({} values), found {} values",
                self.config.input,
                batch * per_image,
                images.len()
            )));
        }
        let logits = self.pool.install(|| {
            use rayon::prelude::*;
            with_threads_awake(|| {
                images
                    .par_chunks(per_image)
                    .map(|image| self.run_image(image, None))
                    .collect::<Vec<_>>()
            })
        });
        Ok(logits.concat())
    }

    /// Runs one image `runs` times (after one warm-up) and reports the median time per layer.
    pub fn profile(&self, image: &[f32], runs: usize) -> Result<Vec<OpTime>, Error> {
        if image.len() != self.image_len() {
            return Err(Error::Train(format!(
                "expected one {} image ({} values), found {} values",
                self.config.input,
                self.image_len(),
                image.len()
            )));
        }
        let times = Mutex::new(vec![Vec::new(); self.ops.len()]);
        self.pool.install(|| {
            with_threads_awake(|| {
                self.run_image(image, None);
                for _ in 0..runs.max(1) {
                    self.run_image(image, Some(&times));
                }
            })
        });
        let times = times.into_inner().expect("no panics while profiling");
        let ms = times
            .into_iter()
            .map(|t| t.iter().map(|d| d.as_secs_f64() * 1e3).collect())
            .collect();
        Ok(op_times(&self.ops, ms))
    }

    fn image_len(&self) -> usize {
        let i = self.config.input;
        i.height * i.width * i.channels
    }

    fn run_image(&self, image: &[f32], times: Option<&Mutex<Vec<Vec<Duration>>>>) -> Vec<f32> {
        let i = self.config.input;
        let (h, w, c) = (i.height, i.width, i.channels);
        let mut nhwc = vec![0.0; h * w * c];
        for ch in 0..c {
            for p in 0..h * w {
                nhwc[p * c + ch] = image[ch * h * w + p];
            }
        }
        let x = Value::Float(FloatMap {
            height: h,
            width: w,
            channels: c,
            data: nhwc,
        });
        let run = Run { times };
        match run.sequence(&self.steps, Cow::Owned(x), None) {
            Value::Float(m) => m.data,
            p => p.to_float().data.clone(),
        }
    }
}

/// The median of each op's times (milliseconds), and its share of their sum; ops never timed
/// are left out.
fn op_times(ops: &[OpInfo], times: Vec<Vec<f64>>) -> Vec<OpTime> {
    let medians: Vec<Option<f64>> = times
        .into_iter()
        .map(|mut t| {
            (!t.is_empty()).then(|| {
                t.sort_by(f64::total_cmp);
                t[t.len() / 2]
            })
        })
        .collect();
    let total: f64 = medians.iter().flatten().sum();
    ops.iter()
        .zip(medians)
        .filter_map(|(info, ms)| {
            ms.map(|ms| OpTime {
                name: info.name.clone(),
                kind: info.kind,
                output: info.output.clone(),
                ms,
                share: if total > 0.0 { ms / total } else { 0.0 },
            })
        })
        .collect()
}

/// A compiled model that runs: the engine on the CPU ([`Engine`]) or on a GPU
/// (`gpu::GpuEngine`, feature `cuda`).
pub trait Runner: Send + Sync {
    /// The spec the model was exported from.
    fn spec(&self) -> &Spec;
    /// The input shape and class count.
    fn config(&self) -> &ModelConfig;
    /// Logits (`batch x classes`, row-major) for `batch` images in NCHW layout.
    fn run(&self, images: &[f32], batch: usize) -> Result<Vec<f32>, Error>;
    /// The median time per layer of one image over `runs` runs.
    fn profile(&self, image: &[f32], runs: usize) -> Result<Vec<OpTime>, Error>;
    /// Threads of the CPU engine (1 on a GPU).
    fn threads(&self) -> usize;
    /// What runs the binary convolutions: the CPU kernel, or the GPU and its path.
    fn kernel(&self) -> String;
}

impl Runner for Engine {
    fn spec(&self) -> &Spec {
        Engine::spec(self)
    }
    fn config(&self) -> &ModelConfig {
        Engine::config(self)
    }
    fn run(&self, images: &[f32], batch: usize) -> Result<Vec<f32>, Error> {
        Engine::run(self, images, batch)
    }
    fn profile(&self, image: &[f32], runs: usize) -> Result<Vec<OpTime>, Error> {
        Engine::profile(self, image, runs)
    }
    fn threads(&self) -> usize {
        Engine::threads(self)
    }
    fn kernel(&self) -> String {
        Engine::kernel(self).to_string()
    }
}

/// `model` compiled for `device` (`cpu`, `cuda` or `cuda:N`, as [`crate::device::parse`]
/// reads them), with `threads` threads on the CPU.
pub fn runner(model: &ZooModel, device: &str, threads: usize) -> Result<Box<dyn Runner>, Error> {
    match crate::device::gpu_ordinal(device)? {
        None => Ok(Box::new(Engine::new(model, threads)?)),
        #[cfg(feature = "cuda")]
        Some(ordinal) => Ok(Box::new(gpu::GpuEngine::new(model, ordinal)?)),
        #[cfg(not(feature = "cuda"))]
        Some(_) => Err(crate::device::without_cuda(device)),
    }
}

/// A [`Runner`] as a [`crate::Model`] in inference mode (for [`crate::train::evaluate`]): the
/// images copied to the host, the logits back to their device.
pub struct Packed(pub Box<dyn Runner>);

impl crate::Model for Packed {
    fn forward(
        &self,
        xs: &candle_core::Tensor,
        train: bool,
    ) -> candle_core::Result<candle_core::Tensor> {
        if train {
            candle_core::bail!("a packed model runs in inference only");
        }
        let batch = xs.dim(0)?;
        let images = xs
            .to_device(&candle_core::Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let logits = self
            .0
            .run(&images, batch)
            .map_err(candle_core::Error::wrap)?;
        let classes = logits.len() / batch.max(1);
        candle_core::Tensor::from_vec(logits, (batch, classes), xs.device())
    }

    fn spec(&self) -> &Spec {
        self.0.spec()
    }

    fn config(&self) -> &ModelConfig {
        self.0.config()
    }
}

/// One execution, optionally timing each step.
struct Run<'a> {
    times: Option<&'a Mutex<Vec<Vec<Duration>>>>,
}

impl Run<'_> {
    /// Runs `steps` on `x`, adding `residual` to the output (inside the last step's output
    /// transform where it can; an owned residual's buffer may become the output).
    fn sequence(
        &self,
        steps: &[Step],
        x: Cow<Value>,
        mut residual: Option<Cow<FloatMap>>,
    ) -> Value {
        let mut current = x;
        for (i, step) in steps.iter().enumerate() {
            let fused = if i + 1 == steps.len() && step.fuses_residual() {
                residual.take()
            } else {
                None
            };
            current = Cow::Owned(self.step(step, current, fused));
        }
        let out = current.into_owned();
        match residual {
            None => out,
            Some(r) => {
                let mut m = out.to_float().into_owned();
                m.data.iter_mut().zip(&r.data).for_each(|(v, r)| *v += r);
                Value::Float(m)
            }
        }
    }

    /// `step` ([`Step::runs_in_place`]) on `x` with `x` as its residual, writing over `x`.
    fn step_in_place(&self, step: &Step, mut x: FloatMap) -> Value {
        let Step::BinaryConv {
            op,
            signs,
            conv,
            epilogue,
            ..
        } = step
        else {
            unreachable!("only binary convolutions run in place")
        };
        self.timed(*op, || {
            let lab = match signs {
                Signs::Lab(lab) => Some(lab),
                Signs::Sign => None,
            };
            let co = x.channels;
            conv.run_in_place(&mut x.data, x.height, x.width, lab, |_, dots, row| {
                epilogue.apply_dots_onto(dots, row, co)
            });
            Value::Float(x)
        })
    }

    fn timed(&self, op: usize, f: impl FnOnce() -> Value) -> Value {
        match self.times {
            None => f(),
            Some(times) => {
                let start = Instant::now();
                let out = f();
                times.lock().expect("no panics while profiling")[op].push(start.elapsed());
                out
            }
        }
    }

    fn step(&self, step: &Step, input: Cow<Value>, residual: Option<Cow<FloatMap>>) -> Value {
        let x: &Value = &input;
        let r = residual.as_ref().map(|r| r.data.as_slice());
        match step {
            Step::FloatConv {
                op,
                weight,
                window,
                pad_value,
                epilogue,
            } => self.timed(*op, || {
                let m = x.to_float();
                Value::Float(float::conv(&m, weight, *window, *pad_value, epilogue, r))
            }),
            Step::BinaryConv { .. } => self.binary_conv(step, x, residual),
            Step::Depthwise {
                op,
                weight,
                multiplier,
                window,
                epilogue,
            } => self.timed(*op, || {
                let m = x.to_float();
                Value::Float(float::depthwise(
                    &m,
                    weight,
                    *multiplier,
                    *window,
                    epilogue,
                    r,
                ))
            }),
            Step::Channel { op, epilogue } => self.timed(*op, || {
                let mut m = x.to_float().into_owned();
                epilogue.apply_map(&mut m.data, m.channels, r);
                Value::Float(m)
            }),
            Step::Binarize { op, signs } => {
                self.timed(*op, || Value::Packed(signs.apply(x).into_owned()))
            }
            Step::MaxPool { op, window, relu } => self.timed(*op, || match x {
                Value::Packed(p) => Value::Packed(packed::max_pool(p, *window)),
                Value::Float(m) => Value::Float(float::max_pool(m, *window, *relu)),
            }),
            Step::AvgPool { op, window } => self.timed(*op, || {
                Value::Float(float::avg_pool(&x.to_float(), *window))
            }),
            Step::Blur { op, stride } => {
                self.timed(*op, || Value::Float(float::blur(&x.to_float(), *stride)))
            }
            Step::GlobalAvgPool { op } => {
                self.timed(*op, || Value::Float(float::global_avg_pool(&x.to_float())))
            }
            Step::Flatten { op } => self.timed(*op, || {
                let m = x.to_float();
                Value::Float(FloatMap {
                    height: 1,
                    width: 1,
                    channels: m.data.len(),
                    data: m.data.clone(),
                })
            }),
            Step::Dense {
                op,
                weight,
                epilogue,
            } => self.timed(*op, || {
                Value::Float(float::dense(&x.to_float(), weight, epilogue))
            }),
            Step::Duplicate { op } => self.timed(*op, || {
                let m = x.to_float();
                Value::Float(float::concat(&[m.as_ref().clone(), m.into_owned()]))
            }),
            Step::Residual { body, shortcut } => self.residual(body, shortcut, input),
            Step::Concat { branches } => {
                let outs: Vec<FloatMap> = branches
                    .iter()
                    .map(|b| {
                        self.sequence(b, Cow::Borrowed(x), None)
                            .to_float()
                            .into_owned()
                    })
                    .collect();
                Value::Float(float::concat(&outs))
            }
        }
    }

    /// A binary convolution (`step`) of `x`: LAB reads a packed map (after a binary max-pool)
    /// as ±1 floats; a float output is written over an owned residual's buffer.
    fn binary_conv(&self, step: &Step, x: &Value, residual: Option<Cow<FloatMap>>) -> Value {
        let Step::BinaryConv {
            op,
            signs,
            conv,
            epilogue,
            pack_output,
            ..
        } = step
        else {
            unreachable!("binary_conv runs binary convolutions only")
        };
        self.timed(*op, || {
            let floats = match (signs, x) {
                (Signs::Lab(_), Value::Packed(_)) => Some(Value::Float(x.to_float().into_owned())),
                _ => None,
            };
            let input = signs.input(floats.as_ref().unwrap_or(x));
            match residual {
                Some(Cow::Owned(onto)) if !*pack_output => {
                    Value::Float(binary_conv_onto(input, conv, epilogue, onto))
                }
                r => {
                    let r = r.as_ref().map(|r| r.data.as_slice());
                    binary_conv(input, conv, epilogue, *pack_output, r)
                }
            }
        })
    }

    /// A residual block: `body` on `input` plus `shortcut` of it (the input itself when empty,
    /// read without a copy, or updated in place by a lone body step that can).
    fn residual(&self, body: &[Step], shortcut: &[Step], input: Cow<Value>) -> Value {
        if !shortcut.is_empty() {
            let short = match self.sequence(shortcut, Cow::Borrowed(&input), None) {
                Value::Float(m) => m,
                p => p.to_float().into_owned(),
            };
            return self.sequence(body, input, Some(Cow::Owned(short)));
        }
        match (input, body) {
            (Cow::Owned(Value::Float(m)), [only]) if only.runs_in_place(&m) => {
                self.step_in_place(only, m)
            }
            (input, _) => self.sequence(body, Cow::Borrowed(&input), Some(input.to_float())),
        }
    }
}

/// A binary convolution with its output transform, added to the residual `onto`, whose buffer
/// holds the output.
fn binary_conv_onto(
    input: ConvInput,
    conv: &BinaryConv,
    epilogue: &Epilogue,
    mut onto: FloatMap,
) -> FloatMap {
    let [height, width, _] = input.dims();
    assert_eq!(
        (conv.output_size(height, width), conv.out_channels()),
        ((onto.height, onto.width), onto.channels),
        "the residual has the output's shape"
    );
    let co = onto.channels;
    conv.run(input, &mut onto.data, |_, dots, row| {
        epilogue.apply_dots_onto(dots, row, co)
    });
    onto
}

/// A binary convolution with its output transform; floats (plus `residual`) or packed signs.
fn binary_conv(
    input: ConvInput,
    conv: &BinaryConv,
    epilogue: &Epilogue,
    pack_output: bool,
    residual: Option<&[f32]>,
) -> Value {
    let [height, width, _] = input.dims();
    let (oh, ow) = conv.output_size(height, width);
    let co = conv.out_channels();
    if pack_output {
        let words = co.div_ceil(64);
        let mut data = vec![0u64; oh * ow * words];
        conv.run(input, &mut data, |_, dots, row| {
            let mut values = vec![0.0f32; dots.len()];
            epilogue.apply_dots(dots, &mut values, co, None);
            for (px, out) in values.chunks_exact(co).zip(row.chunks_mut(words)) {
                out.fill(0);
                for (c, v) in px.iter().enumerate() {
                    out[c / 64] |= u64::from(*v < 0.0) << (c % 64);
                }
            }
        });
        return Value::Packed(PackedMap {
            height: oh,
            width: ow,
            channels: co,
            words,
            data,
        });
    }
    let mut data = vec![0.0f32; oh * ow * co];
    conv.run(input, &mut data, |oy, dots, row| {
        let at = oy * ow * co;
        epilogue.apply_dots(dots, row, co, residual.map(|r| &r[at..at + ow * co]));
    });
    Value::Float(FloatMap {
        height: oh,
        width: ow,
        channels: co,
        data,
    })
}

/// Builds steps from the spec's nodes and the model's tensors.
struct Compiler<'a> {
    model: &'a ZooModel,
    analysis: &'a spec::Analysis,
    ops: Vec<OpInfo>,
}

impl Compiler<'_> {
    fn missing(&self, message: String) -> Error {
        Error::Run {
            path: format!("model `{}`", self.model.spec.name),
            message,
        }
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> Result<&Stored, Error> {
        let t = self.model.tensors.get(name).ok_or_else(|| {
            self.missing(format!(
                "the tensor `{name}` is missing; re-export the model"
            ))
        })?;
        if t.shape() != shape {
            return Err(self.missing(format!(
                "`{name}` has shape {:?}; expected {shape:?}",
                t.shape()
            )));
        }
        Ok(t)
    }

    fn floats(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, Error> {
        match self.tensor(name, shape)? {
            Stored::F32(_, d) => Ok(d.clone()),
            _ => Err(self.missing(format!("`{name}` must be F32"))),
        }
    }

    fn indices(&self, name: &str, shape: &[usize]) -> Result<Vec<usize>, Error> {
        match self.tensor(name, shape)? {
            Stored::U32(_, d) => Ok(d.iter().map(|&i| i as usize).collect()),
            _ => Err(self.missing(format!("`{name}` must be U32"))),
        }
    }

    fn op(&mut self, node: &Node, kind: &'static str) -> usize {
        let output = self
            .analysis
            .layers
            .iter()
            .find(|l| l.name == node.name)
            .map(|l| l.output.to_string())
            .unwrap_or_default();
        self.ops.push(OpInfo {
            name: node.name.clone(),
            kind,
            output,
        });
        self.ops.len() - 1
    }

    fn window(
        &self,
        input: spec::FeatureShape,
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: Padding,
    ) -> Window {
        let pads = match padding {
            Padding::Valid => [0; 4],
            Padding::Same => {
                let (t, b) = spec::same_padding(input.height, kernel[0], stride[0]);
                let (l, r) = spec::same_padding(input.width, kernel[1], stride[1]);
                [t, b, l, r]
            }
        };
        Window {
            kernel,
            stride,
            pads,
        }
    }

    fn lab(&self, prefix: &str, pairing: LabPairing, c: usize) -> Result<LabKernel, Error> {
        let bias = self.floats(&format!("{prefix}.bias"), &[c])?;
        Ok(match pairing {
            LabPairing::Channel => LabKernel::folded(
                c,
                self.floats(&format!("{prefix}.kernel"), &[3, 3, c])?,
                bias,
            ),
            LabPairing::Official => LabKernel::paired(
                c,
                self.floats(&format!("{prefix}.pos"), &[3, 3, c])?,
                self.indices(&format!("{prefix}.pos_source"), &[c])?,
                self.floats(&format!("{prefix}.neg"), &[3, 3, c])?,
                self.indices(&format!("{prefix}.neg_source"), &[c])?,
                bias,
            ),
        })
    }

    /// How `activation` turns a map into signs (LAB's tensors under `prefix`); `None` for
    /// full precision.
    fn signs(
        &self,
        prefix: &str,
        activation: &Activation,
        c: usize,
    ) -> Result<Option<Signs>, Error> {
        Ok(match *activation {
            Activation::None => None,
            Activation::Lab(pairing) => Some(Signs::Lab(self.lab(prefix, pairing, c)?)),
            _ => Some(Signs::Sign),
        })
    }

    /// Compiles a node sequence, joining per-channel layers to the layer before them and
    /// letting a binary convolution emit packed signs when the next layer only reads signs.
    fn sequence(&mut self, nodes: &[Node]) -> Result<Vec<Step>, Error> {
        let mut steps: Vec<Step> = Vec::new();
        for node in nodes {
            let c = self.analysis.input_of(&node.name).channels;
            let channel_op = match &node.op {
                Op::Relu => Some(ChannelOp::Relu),
                Op::BatchNorm(_) => Some(ChannelOp::Affine {
                    mul: self.floats(&format!("{}.mul", node.name), &[c])?,
                    add: self.floats(&format!("{}.add", node.name), &[c])?,
                }),
                Op::Bias => Some(ChannelOp::Add(
                    self.floats(&format!("{}.add", node.name), &[c])?,
                )),
                Op::PRelu(_) => Some(ChannelOp::PRelu(
                    self.floats(&format!("{}.alpha", node.name), &[c])?,
                )),
                _ => None,
            };
            match channel_op {
                Some(op) => match steps.last_mut().and_then(Step::epilogue_mut) {
                    Some(epilogue) => epilogue.push(op),
                    None => {
                        let id = self.op(node, node.op.kind());
                        let mut epilogue = Epilogue::default();
                        epilogue.push(op);
                        steps.push(Step::Channel { op: id, epilogue });
                    }
                },
                None => self.node(node, &mut steps)?,
            }
        }
        // A binary convolution whose output only feeds sign(): emit packed signs.
        for i in 1..steps.len() {
            let next_reads_signs = matches!(
                &steps[i],
                Step::BinaryConv {
                    signs: Signs::Sign,
                    ..
                } | Step::Binarize {
                    signs: Signs::Sign,
                    ..
                }
            );
            if let (true, Step::BinaryConv { pack_output, .. }) =
                (next_reads_signs, &mut steps[i - 1])
            {
                *pack_output = true;
            }
        }
        Ok(steps)
    }

    fn node(&mut self, node: &Node, steps: &mut Vec<Step>) -> Result<(), Error> {
        let input = self.analysis.input_of(&node.name);
        let name = &node.name;
        let step = match &node.op {
            Op::Conv(conv) => self.conv(node, conv, input, steps)?,
            Op::DepthwiseConv(dw) => self.depthwise(node, dw, input)?,
            Op::Binarize(act) => match self.signs(name, act, input.channels)? {
                Some(signs) => {
                    let kind = match signs {
                        Signs::Lab(_) => "lab",
                        Signs::Sign => "sign",
                    };
                    Step::Binarize {
                        op: self.op(node, kind),
                        signs,
                    }
                }
                None => return Ok(()),
            },
            Op::MaxPool(p) => self.max_pool(node, p, input, steps),
            Op::AvgPool(p) => Step::AvgPool {
                op: self.op(node, "avg_pool"),
                window: self.window(input, p.size, p.stride, p.padding),
            },
            Op::BlurPool(b) => Step::Blur {
                op: self.op(node, "blur_pool"),
                stride: b.stride,
            },
            Op::GlobalAvgPool => Step::GlobalAvgPool {
                op: self.op(node, "global_avg_pool"),
            },
            Op::Flatten => Step::Flatten {
                op: self.op(node, "flatten"),
            },
            Op::Dense(d) => self.dense(node, d, input)?,
            Op::Duplicate => Step::Duplicate {
                op: self.op(node, "duplicate"),
            },
            Op::Residual(r) => Step::Residual {
                shortcut: self.sequence(&r.shortcut)?,
                body: self.sequence(&r.body)?,
            },
            Op::Concat(branches) => Step::Concat {
                branches: branches
                    .iter()
                    .map(|b| self.sequence(b))
                    .collect::<Result<_, _>>()?,
            },
            Op::Relu | Op::BatchNorm(_) | Op::Bias | Op::PRelu(_) => {
                unreachable!("per-channel layers are compiled by `sequence`")
            }
        };
        steps.push(step);
        Ok(())
    }

    /// Adds layer `name`'s bias (`len` values) to `epilogue` when the layer has one.
    fn add_bias(
        &self,
        epilogue: &mut Epilogue,
        name: &str,
        bias: bool,
        len: usize,
    ) -> Result<(), Error> {
        if bias {
            epilogue.push(ChannelOp::Add(
                self.floats(&format!("{name}.bias"), &[len])?,
            ));
        }
        Ok(())
    }

    /// A float depthwise convolution, its bias in the epilogue.
    fn depthwise(
        &mut self,
        node: &Node,
        dw: &spec::DepthwiseConv,
        input: spec::FeatureShape,
    ) -> Result<Step, Error> {
        let name = &node.name;
        let [kh, kw] = dw.kernel;
        let co = input.channels * dw.multiplier;
        let mut epilogue = Epilogue::default();
        self.add_bias(&mut epilogue, name, dw.bias, co)?;
        Ok(Step::Depthwise {
            op: self.op(node, "depthwise_conv"),
            weight: self.floats(&format!("{name}.weight"), &[kh, kw, co])?,
            multiplier: dw.multiplier,
            window: self.window(input, dw.kernel, dw.stride, dw.padding),
            epilogue,
        })
    }

    /// Max pooling: on bits for a binary input; on floats, with the ReLU step just before it
    /// (taken off `steps`) run inside it.
    fn max_pool(
        &mut self,
        node: &Node,
        p: &spec::Pool,
        input: spec::FeatureShape,
        steps: &mut Vec<Step>,
    ) -> Step {
        let relu = !input.binary
            && matches!(steps.last(), Some(Step::Channel { epilogue, .. })
                if epilogue.ops == [ChannelOp::Relu]);
        if relu {
            steps.pop();
        }
        let kind = match (input.binary, relu) {
            (true, _) => "max_pool (bits)",
            (false, true) => "relu+max_pool",
            (false, false) => "max_pool",
        };
        Step::MaxPool {
            op: self.op(node, kind),
            window: self.window(input, p.size, p.stride, p.padding),
            relu,
        }
    }

    /// A dense layer on the flattened input, its bias in the epilogue.
    fn dense(
        &mut self,
        node: &Node,
        d: &spec::Dense,
        input: spec::FeatureShape,
    ) -> Result<Step, Error> {
        let name = &node.name;
        let units = d.units.resolve(self.model.config.classes);
        let features = input.channels * input.height * input.width;
        let mut epilogue = Epilogue::default();
        self.add_bias(&mut epilogue, name, d.bias, units)?;
        Ok(Step::Dense {
            op: self.op(node, "dense"),
            weight: PackedWeights::new(
                &self.floats(&format!("{name}.weight"), &[features, units])?,
                features,
                units,
            ),
            epilogue,
        })
    }

    /// A convolution: on packed bits (its input binarized by sign or LAB inside the step) where
    /// both operands are binary, else a float convolution after an optional binarizer step.
    fn conv(
        &mut self,
        node: &Node,
        conv: &spec::Conv,
        input: spec::FeatureShape,
        steps: &mut Vec<Step>,
    ) -> Result<Step, Error> {
        let name = &node.name;
        let window = self.window(input, conv.kernel, conv.stride, conv.padding);
        let [kh, kw] = conv.kernel;
        let (o, c) = (conv.filters, input.channels);
        let mut epilogue = Epilogue::default();
        let signs = self.signs(&format!("{name}.lab"), &conv.input, c)?;
        if export::runs_binary(conv, input) {
            let signs = signs.unwrap_or(Signs::Sign);
            let words = c.div_ceil(64);
            let bits = match self.tensor(&format!("{name}.bits"), &[o, kh, kw, words])? {
                Stored::U64(_, d) => d.clone(),
                _ => return Err(self.missing(format!("`{name}.bits` must be U64"))),
            };
            let weights = PackedConvWeights::from_words(o, c, conv.kernel, bits)
                .map_err(|e| self.missing(format!("`{name}.bits`: {e}")))?;
            if matches!(
                conv.kernel_quantizer,
                spec::KernelQuantizer::MagnitudeAwareSign { .. }
                    | spec::KernelQuantizer::XnorWeightScale
            ) {
                epilogue.push(ChannelOp::Scale(
                    self.floats(&format!("{name}.scale"), &[o])?,
                ));
            }
            self.add_bias(&mut epilogue, name, conv.bias, o)?;
            let kind = match signs {
                Signs::Lab(_) => "lab+binary_conv",
                Signs::Sign => "binary_conv",
            };
            let geometry = ConvGeometry {
                stride: conv.stride,
                pads: window.pads,
                pad_value: if conv.pad_value == 0.0 {
                    PadValue::Zero
                } else {
                    PadValue::One
                },
            };
            Ok(Step::BinaryConv {
                op: self.op(node, kind),
                signs,
                conv: BinaryConv::new(&weights, geometry),
                source: Box::new((weights, geometry)),
                epilogue,
                pack_output: false,
            })
        } else {
            if let Some(signs) = signs {
                let id = self.op(node, "binarize");
                steps.push(Step::Binarize { op: id, signs });
            }
            self.add_bias(&mut epilogue, name, conv.bias, o)?;
            Ok(Step::FloatConv {
                op: self.op(node, "conv"),
                weight: PackedWeights::new(
                    &self.floats(&format!("{name}.weight"), &[kh, kw, c, o])?,
                    kh * kw * c,
                    o,
                ),
                window,
                pad_value: conv.pad_value as f32,
                epilogue,
            })
        }
    }
}

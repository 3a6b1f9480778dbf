//! The engine on an NVIDIA GPU (feature `cuda`): the same compiled steps as the CPU
//! [`Engine`](super::Engine), run on batches with the GPU kernels of `zoo_kernels::packed::cuda`.
//!
//! [`GpuEngine::new`] takes the flat program of the CPU engine's steps (`engine::program`:
//! launches between numbered buffers, with the shapes of one image, and the slots of memory the
//! buffers share where their lives do not overlap) and uploads each launch's weights for its
//! kernel: sign and LAB packing, the binary convolutions on binary tensor
//! cores with their output transform (batch norm, scale, bias, ReLU / PReLU, residual) fused and
//! emitting packed signs where the next layer reads only signs, binary max pooling on bits, and
//! the float stem, transitions and head. A run at a
//! batch size first lays out every slot for that batch ([`Plan`]), then launches the
//! program; from the second run on, the program replays as one CUDA graph, without a launch
//! per kernel (`ZOO_CUDA_GRAPH=0` launches kernel by kernel instead). Each binary convolution
//! runs on binary tensor cores (compute capability 8.0) or with XOR + popcount on CUDA cores,
//! whichever ran it faster when its batch size was laid out (`ZOO_GPU_CONV=tensor|popcount`
//! forces one).

use std::collections::hash_map::{Entry, HashMap};
use std::sync::Mutex;

use candle_core::cuda_backend::cudarc::driver::{CudaGraph, CudaSlice};
use candle_core::cuda_backend::WrapErr;
use zoo_kernels::packed::cuda::float::{GpuDense, GpuDepthwise, GpuFloatConv, PoolMode};
use zoo_kernels::packed::cuda::{
    ConvPath, EpilogueIo, Gpu, GpuBinaryConv, GpuEpilogue, GpuFloats, GpuLab, GpuMap,
};
use zoo_kernels::packed::gpu::EpilogueOp;

use super::float::{ChannelOp, Epilogue, Window};
use super::program::{self, Slots, Value};
use super::{OpInfo, OpTime, ZooModel};
use crate::spec::{ModelConfig, Spec};
use crate::Error;

/// A `.zoo` model compiled for a GPU.
pub struct GpuEngine {
    spec: Spec,
    config: ModelConfig,
    /// The buffers of each batch size run so far (dropped before the GPU's modules, which their
    /// graphs launch).
    plans: Mutex<HashMap<usize, Plan>>,
    program: Program,
    gpu: Gpu,
    /// The binary convolutions' path, where forced; else each layer's faster one on the GPU.
    path: Option<ConvPath>,
    ops: Vec<OpInfo>,
    graphs: bool,
}

/// The program's launches with their weights on the GPU, and its buffers' shapes.
struct Program {
    buffers: Vec<Value>,
    launches: Vec<Launch>,
    input: Value,
    output: Value,
    dots: usize,
    slots: Slots,
}

/// One launch of the program on the GPU: the op it belongs to (for profiles), the buffer it
/// writes, and what it computes from which buffers.
struct Launch {
    op: usize,
    /// The buffers it reads.
    inputs: Vec<usize>,
    out: usize,
    kind: Kind,
}

/// [`program::Kind`] with its weights uploaded.
enum Kind {
    /// The NCHW input.
    Transpose,
    PackSigns {
        x: usize,
    },
    Lab {
        lab: GpuLab,
        x: usize,
    },
    Unpack {
        x: usize,
    },
    BinaryConv {
        conv: GpuBinaryConv,
        epilogue: GpuEpilogue,
        x: usize,
        residual: Option<usize>,
    },
    FloatConv {
        conv: GpuFloatConv,
        epilogue: GpuEpilogue,
        x: usize,
        residual: Option<usize>,
    },
    Depthwise {
        conv: GpuDepthwise,
        epilogue: GpuEpilogue,
        x: usize,
        residual: Option<usize>,
    },
    Transform {
        epilogue: GpuEpilogue,
        x: usize,
        residual: Option<usize>,
    },
    MaxPoolBits {
        window: Window,
        x: usize,
    },
    Pool {
        window: Window,
        mode: PoolMode,
        x: usize,
    },
    GlobalAvgPool {
        x: usize,
    },
    Copy {
        x: usize,
    },
    Concat {
        x: usize,
        offset: usize,
    },
    Dense {
        dense: GpuDense,
        epilogue: GpuEpilogue,
        x: usize,
    },
}

/// A buffer of a [`Plan`].
enum Buffer {
    Floats(GpuFloats),
    Bits(GpuMap),
    /// Lent to the launch that writes it.
    Lent,
}

impl Buffer {
    /// Shapes the slot as `images` maps of `shape` (its memory holds at least as many).
    fn shape(&mut self, images: usize, [height, width, channels]: [usize; 3]) {
        match self {
            Buffer::Floats(f) => {
                (f.images, f.height, f.width, f.channels) = (images, height, width, channels);
            }
            Buffer::Bits(m) => {
                (m.images, m.height, m.width, m.channels) = (images, height, width, channels);
                m.words = 2 * channels.div_ceil(64);
            }
            Buffer::Lent => unreachable!("no launch holds a slot while another runs"),
        }
    }

    fn floats(&self) -> &GpuFloats {
        match self {
            Buffer::Floats(f) => f,
            _ => unreachable!("the program reads floats from a float buffer"),
        }
    }

    fn bits(&self) -> &GpuMap {
        match self {
            Buffer::Bits(b) => b,
            _ => unreachable!("the program reads signs from a packed buffer"),
        }
    }
}

/// The slots of a [`Program`]'s buffers laid out for one batch size, and the program captured
/// as a CUDA graph once it has run.
struct Plan {
    batch: usize,
    /// A buffer per slot.
    buffers: Vec<Buffer>,
    /// The NCHW images the run copies in.
    images: CudaSlice<f32>,
    dots: CudaSlice<i32>,
    /// Each launch's binary convolution path.
    paths: Vec<ConvPath>,
    graph: Option<Graph>,
    runs: usize,
}

/// A captured CUDA graph, used only under the engine's lock on its plans.
struct Graph(CudaGraph);

// SAFETY: cudarc leaves a graph `!Send` because CUDA graphs must not be used by two threads at
// once; a `Graph` is only reached through `GpuEngine::plans`' mutex, one thread at a time.
unsafe impl Send for Graph {}

/// A GPU error as the zoo's.
fn gpu_error(what: &str) -> impl Fn(candle_core::Error) -> Error + '_ {
    move |e| Error::Train(format!("{what} on the GPU: {e}"))
}

impl GpuEngine {
    /// Compiles `model` for GPU `ordinal`.
    pub fn new(model: &ZooModel, ordinal: usize) -> Result<GpuEngine, Error> {
        let gpu =
            Gpu::new(ordinal).map_err(|e| Error::Train(format!("device `cuda:{ordinal}`: {e}")))?;
        let (steps, ops) = super::compile(model)?;
        let path = match std::env::var("ZOO_GPU_CONV").as_deref() {
            Ok("popcount") => Some(ConvPath::Popcount),
            Ok("tensor") => Some(gpu.conv_path()),
            _ => None,
        };
        let input = model.config.input;
        let program =
            program::Program::new(&steps, &ops, [input.height, input.width, input.channels]);
        let ops = program.ops.clone();
        let program = upload(&gpu, program).map_err(gpu_error("uploading the model"))?;
        Ok(GpuEngine {
            spec: model.spec.clone(),
            config: model.config,
            gpu,
            path,
            program,
            ops,
            graphs: std::env::var("ZOO_CUDA_GRAPH").as_deref() != Ok("0"),
            plans: Mutex::new(HashMap::new()),
        })
    }

    /// The engine with its binary convolutions on `path` (the tensor cores need compute
    /// capability 8.0), or (`None`) on the faster of the two for each layer, as timed on the
    /// GPU when a batch size first runs.
    pub fn with_conv_path(mut self, path: Option<ConvPath>) -> Result<Self, Error> {
        if path == Some(ConvPath::TensorCores) && self.gpu.conv_path() != ConvPath::TensorCores {
            let (major, minor) = self.gpu.capability();
            return Err(Error::Train(format!(
                "binary tensor cores need compute capability 8.0; this GPU has {major}.{minor}"
            )));
        }
        self.path = path;
        self.plans
            .get_mut()
            .expect("no panics while running")
            .clear();
        Ok(self)
    }

    /// The engine replaying its launches as a CUDA graph from the second run on (`true`), or
    /// launching kernel by kernel.
    pub fn with_graphs(mut self, graphs: bool) -> Self {
        self.graphs = graphs;
        self.plans
            .get_mut()
            .expect("no panics while running")
            .clear();
        self
    }

    /// Bytes of GPU memory the buffers of a run at `batch` take (floats and words of 4 bytes).
    pub fn buffer_bytes(&self, batch: usize) -> usize {
        let per_image: usize = self.program.slots.size.iter().sum();
        4 * batch * (per_image + self.dots_per_image())
    }

    /// The scratch dots per image: the CUDA-core path's (the tensor cores' output transform
    /// runs on their accumulators).
    fn dots_per_image(&self) -> usize {
        match self.path {
            Some(ConvPath::TensorCores) => 0,
            _ => self.program.dots,
        }
    }

    /// The path of each launch's binary convolution for `plan`: the forced one, the only one
    /// the GPU has, or the faster of three timed calls of each on `plan`'s buffers.
    fn choose_paths(&self, plan: &mut Plan) -> candle_core::Result<()> {
        let only = self
            .path
            .or_else(|| (self.gpu.conv_path() == ConvPath::Popcount).then_some(ConvPath::Popcount));
        if let Some(path) = only {
            plan.paths.fill(path);
            return Ok(());
        }
        // One run first, so that every slot is written (a convolution's time does not depend on
        // what its slots hold).
        self.launch_all(plan, |_| Ok(()))?;
        for (i, launch) in self.program.launches.iter().enumerate() {
            if !matches!(launch.kind, Kind::BinaryConv { .. }) {
                continue;
            }
            let mut ms = [0.0f32; 2];
            for (ms, path) in ms
                .iter_mut()
                .zip([ConvPath::TensorCores, ConvPath::Popcount])
            {
                plan.paths[i] = path;
                self.launch_one(i, plan)?;
                let start = self.gpu.mark()?;
                for _ in 0..3 {
                    self.launch_one(i, plan)?;
                }
                *ms = start.elapsed_ms(&self.gpu.mark()?).w()?;
            }
            plan.paths[i] = match ms[1] < ms[0] {
                true => ConvPath::Popcount,
                false => ConvPath::TensorCores,
            };
        }
        Ok(())
    }

    /// Copies `images` in, runs `launch` on the plan of their batch size, and copies the logits
    /// out.
    fn with_plan(
        &self,
        images: &[f32],
        batch: usize,
        launch: impl FnOnce(&Self, &mut Plan) -> Result<(), Error>,
    ) -> Result<Vec<f32>, Error> {
        let [h, w, c] = self.program.input.shape;
        if images.len() != batch * h * w * c {
            return Err(Error::Train(format!(
                "expected {batch} images of {} ({} values), found {} values",
                self.config.input,
                batch * h * w * c,
                images.len()
            )));
        }
        let mut plans = self.plans.lock().expect("no panics while running");
        let plan = match plans.entry(batch) {
            Entry::Occupied(plan) => plan.into_mut(),
            Entry::Vacant(slot) => slot.insert(self.plan(batch).map_err(|e| {
                Error::Train(format!(
                    "laying out the buffers of batch {batch} ({} MB) on the GPU: {e}",
                    self.buffer_bytes(batch) >> 20
                ))
            })?),
        };
        let copy_in = self.gpu.stream().memcpy_htod(images, &mut plan.images);
        copy_in.map_err(|e| Error::Train(format!("copying the images to the GPU: {e:?}")))?;
        launch(self, plan)?;
        plan.runs += 1;
        let out = &self.program.output;
        let logits = match &plan.buffers[self.program.slots.slot[out.buf]] {
            Buffer::Floats(f) => self.gpu.download_floats(f),
            Buffer::Bits(b) => self
                .gpu
                .download_maps(b)
                .map(|maps| maps.iter().flat_map(|m| m.to_signs()).collect()),
            Buffer::Lent => unreachable!("no launch holds a buffer between runs"),
        };
        logits.map_err(gpu_error("copying the logits back"))
    }

    /// The program's slots for `batch` images, each shaped as a launch uses it.
    fn plan(&self, batch: usize) -> candle_core::Result<Plan> {
        let slots = &self.program.slots;
        let buffers = slots
            .bits
            .iter()
            .zip(&slots.size)
            .map(|(&bits, &size)| match bits {
                // `size` words an image: `size / 2` pixels of 64 channels, 2 words each.
                true => self.gpu.map(batch, [size / 2, 1, 64]).map(Buffer::Bits),
                false => self.gpu.floats(batch, [size, 1, 1]).map(Buffer::Floats),
            })
            .collect::<candle_core::Result<_>>()?;
        let [h, w, c] = self.program.input.shape;
        let mut plan = Plan {
            batch,
            buffers,
            images: self.gpu.floats(batch, [c, h, w])?.data,
            dots: self.gpu.zeros(batch * self.dots_per_image())?,
            paths: vec![ConvPath::TensorCores; self.program.launches.len()],
            graph: None,
            runs: 0,
        };
        self.choose_paths(&mut plan)?;
        Ok(plan)
    }

    /// Launches the program on `plan`'s buffers, calling `before(op)` before each launch.
    fn launch_all(
        &self,
        plan: &mut Plan,
        mut before: impl FnMut(usize) -> candle_core::Result<()>,
    ) -> candle_core::Result<()> {
        for (i, launch) in self.program.launches.iter().enumerate() {
            before(launch.op)?;
            self.launch_one(i, plan)?;
        }
        Ok(())
    }

    /// Launch `i` of the program on `plan`'s buffers, their slots shaped as it reads and
    /// writes them.
    fn launch_one(&self, i: usize, plan: &mut Plan) -> candle_core::Result<()> {
        let launch = &self.program.launches[i];
        let slots = &self.program.slots.slot;
        for &b in launch.inputs.iter().chain([&launch.out]) {
            plan.buffers[slots[b]].shape(plan.batch, self.program.buffers[b].shape);
        }
        let path = plan.paths[i];
        let out = slots[launch.out];
        let mut written = std::mem::replace(&mut plan.buffers[out], Buffer::Lent);
        let result = self.launch(&launch.kind, plan, path, &mut written);
        plan.buffers[out] = written;
        result
    }

    /// One launch, writing `out`; a binary convolution on `path`.
    fn launch(
        &self,
        kind: &Kind,
        plan: &mut Plan,
        path: ConvPath,
        out: &mut Buffer,
    ) -> candle_core::Result<()> {
        let gpu = &self.gpu;
        let slots = &self.program.slots.slot;
        let b = |i: usize| &plan.buffers[slots[i]];
        let floats = |i: usize| b(i).floats();
        let residual = |r: &Option<usize>| r.map(floats);
        match (kind, out) {
            (Kind::Transpose, Buffer::Floats(out)) => gpu.nchw_to_nhwc_into(&plan.images, out),
            (Kind::PackSigns { x }, Buffer::Bits(out)) => gpu.pack_signs_into(floats(*x), out),
            (Kind::Lab { lab, x }, Buffer::Bits(out)) => lab.pack_into(gpu, floats(*x), out),
            (Kind::Unpack { x }, Buffer::Floats(out)) => gpu.unpack_signs_into(b(*x).bits(), out),
            (
                Kind::BinaryConv {
                    conv,
                    epilogue,
                    x,
                    residual: r,
                },
                out,
            ) => {
                let (values, signs) = match out {
                    Buffer::Floats(f) => (Some(f), None),
                    Buffer::Bits(m) => (None, Some(m)),
                    Buffer::Lent => unreachable!("each launch writes its own buffer"),
                };
                let io = EpilogueIo {
                    residual: residual(r),
                    values,
                    signs,
                };
                conv.run_into(gpu, b(*x).bits(), path, epilogue, io, &mut plan.dots)
            }
            (
                Kind::FloatConv {
                    conv,
                    epilogue,
                    x,
                    residual: r,
                },
                Buffer::Floats(out),
            ) => conv.run_into(gpu, floats(*x), epilogue, residual(r), out),
            (
                Kind::Depthwise {
                    conv,
                    epilogue,
                    x,
                    residual: r,
                },
                Buffer::Floats(out),
            ) => conv.run_into(gpu, floats(*x), epilogue, residual(r), out),
            (
                Kind::Transform {
                    epilogue,
                    x,
                    residual: r,
                },
                Buffer::Floats(out),
            ) => epilogue.transform_into(gpu, floats(*x), residual(r), out),
            (Kind::MaxPoolBits { window, x }, Buffer::Bits(out)) => {
                gpu.max_pool_into(b(*x).bits(), *window, out)
            }
            (
                Kind::Pool {
                    window, mode, x, ..
                },
                Buffer::Floats(out),
            ) => gpu.pool_into(floats(*x), *window, *mode, out),
            (Kind::GlobalAvgPool { x }, Buffer::Floats(out)) => {
                gpu.global_avg_pool_into(floats(*x), out)
            }
            (Kind::Copy { x }, Buffer::Floats(out)) => gpu.copy_into(floats(*x), out),
            (Kind::Concat { x, offset }, Buffer::Floats(out)) => {
                gpu.copy_channels_into(floats(*x), out, *offset)
            }
            (
                Kind::Dense {
                    dense, epilogue, x, ..
                },
                Buffer::Floats(out),
            ) => dense.run_into(gpu, floats(*x), epilogue, out),
            _ => unreachable!("the program writes each launch's output kind"),
        }
    }
}

/// `program`'s launches with their weights uploaded to `gpu`.
fn upload(gpu: &Gpu, program: program::Program) -> candle_core::Result<Program> {
    let epilogue = |channels: usize, e: &Epilogue| -> candle_core::Result<GpuEpilogue> {
        let ops: Vec<EpilogueOp> = e
            .ops
            .iter()
            .map(|op| match op {
                ChannelOp::Affine { mul, add } => EpilogueOp::Affine { mul, add },
                ChannelOp::Scale(mul) => EpilogueOp::Scale(mul),
                ChannelOp::Add(add) => EpilogueOp::Add(add),
                ChannelOp::Relu => EpilogueOp::Relu,
                ChannelOp::PRelu(alpha) => EpilogueOp::PRelu(alpha),
            })
            .collect();
        GpuEpilogue::new(gpu, channels, &ops)
    };
    let channels = |buf: usize| program.buffers[buf].shape[2];
    let mut launches = Vec::with_capacity(program.launches.len());
    for launch in &program.launches {
        use program::Kind as P;
        let out = launch.kind.output();
        let kind = match &launch.kind {
            P::Transpose { .. } => Kind::Transpose,
            P::PackSigns { x, .. } => Kind::PackSigns { x: *x },
            P::Lab { lab, x, .. } => Kind::Lab {
                lab: GpuLab::new(gpu, lab)?,
                x: *x,
            },
            P::Unpack { x, .. } => Kind::Unpack { x: *x },
            P::BinaryConv {
                weights,
                geometry,
                epilogue: e,
                x,
                residual,
                ..
            } => Kind::BinaryConv {
                conv: GpuBinaryConv::new(gpu, weights, *geometry)?,
                epilogue: epilogue(weights.out_channels, e)?,
                x: *x,
                residual: *residual,
            },
            P::FloatConv {
                weight,
                window,
                pad_value,
                epilogue: e,
                x,
                residual,
                ..
            } => Kind::FloatConv {
                conv: GpuFloatConv::new(
                    gpu,
                    &weight.to_matrix(),
                    *window,
                    *pad_value,
                    [channels(*x), weight.n()],
                )?,
                epilogue: epilogue(weight.n(), e)?,
                x: *x,
                residual: *residual,
            },
            P::Depthwise {
                weight,
                multiplier,
                window,
                epilogue: e,
                x,
                residual,
                ..
            } => Kind::Depthwise {
                conv: GpuDepthwise::new(gpu, weight, *window, *multiplier, channels(out))?,
                epilogue: epilogue(channels(out), e)?,
                x: *x,
                residual: *residual,
            },
            P::Transform {
                epilogue: e,
                x,
                residual,
                ..
            } => Kind::Transform {
                epilogue: epilogue(channels(out), e)?,
                x: *x,
                residual: *residual,
            },
            P::MaxPoolBits { window, x, .. } => Kind::MaxPoolBits {
                window: *window,
                x: *x,
            },
            P::Pool {
                window, mode, x, ..
            } => Kind::Pool {
                window: *window,
                mode: match mode {
                    program::PoolMode::Max => PoolMode::Max,
                    program::PoolMode::MaxOfRelu => PoolMode::MaxOfRelu,
                    program::PoolMode::Average => PoolMode::Average,
                },
                x: *x,
            },
            P::GlobalAvgPool { x, .. } => Kind::GlobalAvgPool { x: *x },
            P::Copy { x, .. } => Kind::Copy { x: *x },
            P::Concat { x, offset, .. } => Kind::Concat {
                x: *x,
                offset: *offset,
            },
            P::Dense {
                weight,
                epilogue: e,
                x,
                ..
            } => Kind::Dense {
                dense: GpuDense::new(gpu, &weight.to_matrix(), weight.k(), weight.n())?,
                epilogue: epilogue(weight.n(), e)?,
                x: *x,
            },
        };
        launches.push(Launch {
            op: launch.op,
            inputs: launch.kind.inputs(),
            out,
            kind,
        });
    }
    Ok(Program {
        buffers: program.buffers,
        launches,
        input: program.input,
        output: program.output,
        dots: program.dots,
        slots: program.slots,
    })
}

impl super::Runner for GpuEngine {
    /// The spec the model was exported from.
    fn spec(&self) -> &Spec {
        &self.spec
    }

    /// The input shape and class count.
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// What runs the binary convolutions: the GPU's name and the path.
    fn kernel(&self) -> String {
        let name = self.gpu.name().unwrap_or_else(|_| "GPU".into());
        let path = match (self.path, self.gpu.conv_path()) {
            (Some(ConvPath::Popcount), _) | (None, ConvPath::Popcount) => "CUDA-core popcount",
            (Some(ConvPath::TensorCores), _) => "binary tensor cores",
            (None, ConvPath::TensorCores) => "binary tensor cores or CUDA cores per layer",
        };
        let graph = if self.graphs { ", CUDA graph" } else { "" };
        format!("{name}, {path}{graph}")
    }

    /// Logits (`batch x classes`, row-major) for `batch` images in NCHW layout, as
    /// [`Engine::run`](super::Engine::run).
    fn run(&self, images: &[f32], batch: usize) -> Result<Vec<f32>, Error> {
        self.with_plan(images, batch, |engine, plan| {
            if plan.graph.is_none() && engine.graphs && plan.runs > 0 {
                let graph = engine.gpu.capture(|| engine.launch_all(plan, |_| Ok(())));
                let graph = graph.map_err(gpu_error("capturing the model's graph"))?;
                plan.graph = Some(Graph(graph));
            }
            match &plan.graph {
                Some(Graph(graph)) => graph
                    .launch()
                    .map_err(|e| Error::Train(format!("replaying the model's graph: {e:?}"))),
                None => engine
                    .launch_all(plan, |_| Ok(()))
                    .map_err(gpu_error("running the model")),
            }
        })
    }

    /// Runs one image `runs` times (after one warm-up), kernel by kernel, and reports the
    /// median time per layer from CUDA events.
    fn profile(&self, image: &[f32], runs: usize) -> Result<Vec<OpTime>, Error> {
        let mut times = vec![Vec::new(); self.ops.len()];
        let mut marks = Vec::new();
        for run in 0..=runs.max(1) {
            marks.clear();
            let mut end = None;
            self.with_plan(image, 1, |engine, plan| {
                let mut launches = || {
                    engine.launch_all(plan, |op| {
                        marks.push((op, engine.gpu.mark()?));
                        Ok(())
                    })?;
                    end = Some(engine.gpu.mark()?);
                    Ok(())
                };
                launches().map_err(gpu_error("profiling the model"))
            })?;
            let end = end.expect("marked after the launches");
            if run == 0 {
                continue;
            }
            // An op's launches (a packing and its convolution, say) summed.
            let mut run_ms: Vec<Option<f64>> = vec![None; self.ops.len()];
            for (i, (op, start)) in marks.iter().enumerate() {
                let stop = marks.get(i + 1).map_or(&end, |(_, e)| e);
                let ms = start
                    .elapsed_ms(stop)
                    .map_err(|e| Error::Train(format!("profiling the model: {e:?}")))?;
                *run_ms[*op].get_or_insert(0.0) += ms as f64;
            }
            for (times, ms) in times.iter_mut().zip(run_ms) {
                times.extend(ms);
            }
        }
        // The binary convolutions the batch-1 plan runs on CUDA cores, said in their kind.
        let mut ops = self.ops.clone();
        let plans = self.plans.lock().expect("no panics while running");
        let paths = &plans.get(&1).expect("profiled at batch 1").paths;
        for (launch, path) in self.program.launches.iter().zip(paths) {
            let op = &mut ops[launch.op];
            if matches!(launch.kind, Kind::BinaryConv { .. }) && *path == ConvPath::Popcount {
                op.kind = match op.kind {
                    "lab+binary_conv" => "lab+binary_conv (CUDA cores)",
                    _ => "binary_conv (CUDA cores)",
                };
            }
        }
        Ok(super::op_times(&ops, times))
    }

    fn threads(&self) -> usize {
        1
    }
}

//! The packed kernels on an NVIDIA GPU (feature `cuda`): the CUDA sources of
//! `kernels/cuda/packed.cu` run on batches of maps in the CPU kernels' bits
//! ([`super::gpu`] lays them out), so that every result can be compared with the CPU's exactly.
//!
//! - [`Gpu::pack_signs`]: Larq's sign of float NHWC maps, packed;
//! - [`GpuLab::pack`]: LAB's depthwise score, thresholded and packed, bit for bit the CPU's;
//! - [`GpuBinaryConv::dots`]: the exact integer ±1 convolution on binary tensor cores
//!   (`mma.m16n8k256` with AND + popcount; compute capability 8.0 and later), or with XOR and
//!   popcount on CUDA cores ([`ConvPath`]); [`GpuBinaryConv::run_into`] with its output
//!   transform, fused into the tensor-core kernel;
//! - [`GpuEpilogue::apply`]: the per-channel transforms of the dots and a residual, written as
//!   floats and/or packed signs;
//! - [`Gpu::max_pool`]: max pooling of ±1 maps;
//! - [`float`]: the full-precision layers the inference engine runs between the binary ones.
//!
//! Every kernel has a form that writes into buffers the caller made (`*_into`), so that an
//! engine can lay out its buffers once and replay its launches as one CUDA graph, and a form
//! that allocates its output. Without a GPU, [`Gpu::new`] fails saying so.

pub mod float;

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::sys::{
    CUevent_flags, CUgraphInstantiate_flags, CUstreamCaptureMode,
};
use candle_core::cuda_backend::cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaGraph, CudaModule, CudaSlice, CudaStream, DeviceRepr,
    LaunchArgs, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, Result};

use super::gpu::{ConvLayout, EpilogueOp, EpilogueProgram, CHUNK_WORDS, FILTER_BLOCK};
use super::lab::Form;
use super::{ConvGeometry, LabKernel, PadValue, Window};
use crate::cuda::{elementwise, FLOAT_LAYERS, PACKED};
pub use float::GpuFloats;

/// The threads of a block of the tensor-core convolution (`MMA_WARPS` warps in `packed.cu`).
const MMA_THREADS: u32 = 128;
/// Output pixels of a block of the tensor-core convolution (16 per warp).
const MMA_PIXELS: usize = 64;

/// A GPU with the packed kernels loaded, and the stream they run on.
pub struct Gpu {
    stream: Arc<CudaStream>,
    packed: Arc<CudaModule>,
    float_layers: Arc<CudaModule>,
    capability: (i32, i32),
}

/// How a binary convolution computes its dots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvPath {
    /// Binary tensor cores, AND + popcount (compute capability 8.0 and later).
    TensorCores,
    /// CUDA cores, XOR + popcount (any GPU).
    Popcount,
}

/// A batch of packed ±1 maps of one shape on the GPU: `[images][height][width][words]` `u32`
/// words, channel `c` in bit `c % 32` of word `c / 32`, bit 1 for -1, unused bits 0.
pub struct GpuMap {
    /// Images.
    pub images: usize,
    /// Rows of each image.
    pub height: usize,
    /// Columns of each image.
    pub width: usize,
    /// Channels of each pixel.
    pub channels: usize,
    /// `u32` words per pixel: `2 * ceil(channels / 64)`, as the CPU's maps.
    pub words: usize,
    /// The words.
    pub data: CudaSlice<u32>,
}

impl Gpu {
    /// GPU `ordinal`, its kernels compiled by NVRTC for its compute capability, and a stream
    /// of its own (one that can be captured as a CUDA graph). Fails on a machine without a GPU
    /// or driver.
    pub fn new(ordinal: usize) -> Result<Self> {
        let context = CudaContext::new(ordinal).map_err(|e| {
            candle_core::Error::Cuda(
                format!("no CUDA GPU {ordinal} (no NVIDIA GPU, or no driver for it): {e:?}").into(),
            )
        })?;
        // SAFETY: every buffer of this context is used on the one stream made below, in order,
        // so cudarc's events between streams are not needed (and may not be recorded while the
        // stream is captured as a graph).
        unsafe { context.disable_event_tracking() };
        let capability = context.compute_capability().w()?;
        let load = |ptx: Arc<str>| context.load_module(Ptx::from_src(&*ptx)).w();
        Ok(Gpu {
            stream: context.new_stream().w()?,
            packed: load(PACKED.ptx(capability)?)?,
            float_layers: load(FLOAT_LAYERS.ptx(capability)?)?,
            capability,
        })
    }

    /// The GPU's compute capability, `(major, minor)`.
    pub fn capability(&self) -> (i32, i32) {
        self.capability
    }

    /// The GPU's name, as the driver gives it.
    pub fn name(&self) -> Result<String> {
        self.stream.context().name().w()
    }

    /// The work `launches` puts on this GPU's stream, captured as a CUDA graph instead of run:
    /// [`CudaGraph::launch`] replays it, on the buffers it used. The buffers must outlive the
    /// graph, and `launches` may only launch kernels and copy between GPU buffers.
    pub fn capture(&self, launches: impl FnOnce() -> Result<()>) -> Result<CudaGraph> {
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .w()?;
        let captured = launches();
        let graph = self.stream.end_capture(CUgraphInstantiate_flags(0)).w();
        captured?;
        match graph? {
            Some(graph) => Ok(graph),
            None => bail!("capturing a CUDA graph: the stream captured nothing"),
        }
    }

    /// An event recorded on the stream now, with timing, for [`CudaEvent::elapsed_ms`].
    pub fn mark(&self) -> Result<CudaEvent> {
        self.stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .w()
    }

    /// The convolution path this GPU runs by default: tensor cores where it has binary ones
    /// with AND (compute capability 8.0 and later), else CUDA cores.
    pub fn conv_path(&self) -> ConvPath {
        if self.capability.0 >= 8 {
            ConvPath::TensorCores
        } else {
            ConvPath::Popcount
        }
    }

    /// The stream every kernel of this GPU runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// A kernel of `packed.cu`.
    fn kernel(&self, name: &str) -> Result<CudaFunction> {
        self.packed.load_function(name).w()
    }

    /// A kernel of `float_layers.cu`.
    fn float_kernel(&self, name: &str) -> Result<CudaFunction> {
        self.float_layers.load_function(name).w()
    }

    /// `values` copied to the GPU (a buffer of one element where `values` is empty, which CUDA
    /// cannot allocate).
    pub fn upload<T: DeviceRepr + Default + Clone>(&self, values: &[T]) -> Result<CudaSlice<T>> {
        if values.is_empty() {
            return self.stream.clone_htod(&[T::default()][..]).w();
        }
        self.stream.clone_htod(values).w()
    }

    /// The first `len` elements of `buffer` (at most all), copied to the host.
    pub fn download<T: DeviceRepr>(&self, buffer: &CudaSlice<T>, len: usize) -> Result<Vec<T>> {
        let len = len.min(buffer.len());
        if len == 0 {
            return Ok(Vec::new());
        }
        self.stream.clone_dtoh(&buffer.slice(..len)).w()
    }

    /// A buffer of `len` zeros (at least one element, which CUDA needs).
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.stream.alloc_zeros::<T>(len.max(1)).w()
    }

    /// `images` maps of `height x width x channels` of +1 (all bits 0), for a kernel to write.
    pub fn map(&self, images: usize, [height, width, channels]: [usize; 3]) -> Result<GpuMap> {
        let words = 2 * channels.div_ceil(64);
        Ok(GpuMap {
            images,
            height,
            width,
            channels,
            words,
            data: self.zeros::<u32>(images * height * width * words)?,
        })
    }

    /// Fails, naming `op`, unless `map` is `images` maps of `shape` with their words.
    fn check_map(op: &str, map: &GpuMap, images: usize, shape: [usize; 3]) -> Result<()> {
        let has = [map.height, map.width, map.channels];
        if map.images != images || has != shape {
            bail!(
                "{op}: a map of {} images of {has:?}, expected {images} of {shape:?}",
                map.images
            );
        }
        let words = 2 * map.channels.div_ceil(64);
        if map.words != words || map.data.len() < images * map.height * map.width * words {
            bail!(
                "{op}: a map of {} words per pixel in {} words, expected {words} per pixel",
                map.words,
                map.data.len()
            );
        }
        Ok(())
    }

    /// [`Gpu::check_map`] of a map against its own shape.
    fn check_input(op: &str, map: &GpuMap) -> Result<()> {
        Self::check_map(op, map, map.images, [map.height, map.width, map.channels])
    }

    /// Larq's sign of `images` NHWC float maps (`x`: `[images][height][width][channels]`),
    /// packed: bit 1 where `x < 0`, bit 0 elsewhere (`±0.0` and NaN included).
    pub fn pack_signs(&self, x: &GpuFloats) -> Result<GpuMap> {
        let mut map = self.map(x.images, x.shape())?;
        self.pack_signs_into(x, &mut map)?;
        Ok(map)
    }

    /// [`Gpu::pack_signs`] into `out`, a map of `x`'s shape.
    pub fn pack_signs_into(&self, x: &GpuFloats, out: &mut GpuMap) -> Result<()> {
        float::check_input("pack_signs", x)?;
        Self::check_map("pack_signs", out, x.images, x.shape())?;
        let (pixels, words) = (x.pixels(), out.words);
        if pixels * words > 0 {
            let (pixels, c, w) = (pixels as i64, x.channels as i32, words as i32);
            let func = self.kernel("pack_signs")?;
            let mut launch = self.stream.launch_builder(&func);
            launch
                .arg(&x.data)
                .arg(&mut out.data)
                .arg(&pixels)
                .arg(&c)
                .arg(&w);
            // SAFETY: `pack_signs(const float* x, unsigned* bits, i64 pixels, int channels,
            // int words)`; `x` holds `pixels * channels` floats and the map `pixels * words`
            // words (both of one shape, checked above).
            unsafe { launch.launch(elementwise(32 * pixels as usize * words)) }.w()?;
        }
        Ok(())
    }

    /// The ±1 values of `map` as floats into `out`, of its shape.
    pub fn unpack_signs_into(&self, map: &GpuMap, out: &mut GpuFloats) -> Result<()> {
        Self::check_map("unpack_signs", map, out.images, out.shape())?;
        float::check_input("unpack_signs", out)?;
        let (pixels, values) = (out.pixels(), out.len());
        if values > 0 {
            let (pixels, c, w) = (pixels as i64, map.channels as i32, map.words as i32);
            let func = self.kernel("unpack_signs")?;
            let mut launch = self.stream.launch_builder(&func);
            launch
                .arg(&pixels)
                .arg(&c)
                .arg(&w)
                .arg(&map.data)
                .arg(&mut out.data);
            // SAFETY: `unpack_signs(i64 pixels, int channels, int words, const unsigned* bits,
            // float* out)`: the map holds `pixels * words` words, `out` `pixels * channels`
            // floats (one shape, checked above).
            unsafe { launch.launch(elementwise(values)) }.w()?;
        }
        Ok(())
    }

    /// `maps` (one shape) copied to the GPU as one batch.
    ///
    /// # Panics
    /// If the maps' shapes differ.
    pub fn upload_maps(&self, maps: &[super::PackedMap]) -> Result<GpuMap> {
        let first = maps.first();
        let (height, width, channels) =
            first.map_or((0, 0, 0), |m| (m.height, m.width, m.channels));
        Ok(GpuMap {
            images: maps.len(),
            height,
            width,
            channels,
            words: 2 * channels.div_ceil(64),
            data: self.upload(&super::gpu::batch_words(maps))?,
        })
    }

    /// The maps of `map`, copied to the host as the CPU's maps.
    pub fn download_maps(&self, map: &GpuMap) -> Result<Vec<super::PackedMap>> {
        let per_map = map.height * map.width * map.words;
        let words = self.download(&map.data, map.images * per_map)?;
        Ok((0..map.images)
            .map(|i| super::PackedMap {
                height: map.height,
                width: map.width,
                channels: map.channels,
                words: map.words / 2,
                data: super::gpu::words_from_gpu(&words[i * per_map..(i + 1) * per_map]),
            })
            .collect())
    }

    /// Max pooling of ±1 maps, as [`super::max_pool`]: the AND of each window's taps inside the
    /// image (`pads` only shape the output; a window with none gives -1).
    ///
    /// # Panics
    /// If a stride is 0.
    pub fn max_pool(&self, input: &GpuMap, window: Window) -> Result<GpuMap> {
        let (oh, ow) = window.output(input.height, input.width);
        let mut out = self.map(input.images, [oh, ow, input.channels])?;
        self.max_pool_into(input, window, &mut out)?;
        Ok(out)
    }

    /// [`Gpu::max_pool`] into `out`, a map of the output's shape.
    pub fn max_pool_into(&self, input: &GpuMap, window: Window, out: &mut GpuMap) -> Result<()> {
        let (oh, ow) = window.output(input.height, input.width);
        Self::check_input("max_pool", input)?;
        Self::check_map("max_pool", out, input.images, [oh, ow, input.channels])?;
        let total = input.images * oh * ow * input.words;
        if total > 0 {
            let shape = PoolShape {
                n: input.images as i64,
                h: input.height as i32,
                w: input.width as i32,
                channels: input.channels as i32,
                words: input.words as i32,
                kh: window.kernel[0] as i32,
                kw: window.kernel[1] as i32,
                sy: window.stride[0] as i32,
                sx: window.stride[1] as i32,
                top: window.pads[0] as i32,
                left: window.pads[2] as i32,
                oh: oh as i32,
                ow: ow as i32,
            };
            let func = self.kernel("max_pool_bits")?;
            let mut launch = self.stream.launch_builder(&func);
            launch.arg(&shape).arg(&input.data).arg(&mut out.data);
            // SAFETY: `max_pool_bits(PoolShape, const unsigned* in, unsigned* out)`; `in` holds
            // the input map and `out` `images * oh * ow * words` words (checked above).
            unsafe { launch.launch(elementwise(total)) }.w()?;
        }
        Ok(())
    }
}

/// `struct PoolShape` of `packed.cu`.
#[repr(C)]
struct PoolShape {
    n: i64,
    h: i32,
    w: i32,
    channels: i32,
    words: i32,
    kh: i32,
    kw: i32,
    sy: i32,
    sx: i32,
    top: i32,
    left: i32,
    oh: i32,
    ow: i32,
}

// SAFETY: plain data, laid out as the kernel's struct.
unsafe impl DeviceRepr for PoolShape {}

/// `struct BinaryConvShape` of `packed.cu`.
#[repr(C)]
struct BinaryConvShape {
    n: i64,
    h: i32,
    w: i32,
    words: i32,
    channels: i32,
    out_channels: i32,
    kh: i32,
    kw: i32,
    sy: i32,
    sx: i32,
    top: i32,
    left: i32,
    oh: i32,
    ow: i32,
    pad_one: i32,
    chunks: i32,
}

// SAFETY: plain data, laid out as the kernel's struct.
unsafe impl DeviceRepr for BinaryConvShape {}

/// `struct Epilogue` of `packed.cu`.
#[repr(C)]
struct EpilogueShape {
    pixels: i64,
    channels: i32,
    words: i32,
    ops: i32,
    residual: i32,
    write_values: i32,
    write_signs: i32,
}

// SAFETY: plain data, laid out as the kernel's struct.
unsafe impl DeviceRepr for EpilogueShape {}

/// `struct LabMap` of `packed.cu`.
#[repr(C)]
struct LabMap {
    n: i64,
    h: i32,
    w: i32,
    c: i32,
    words: i32,
}

// SAFETY: plain data, laid out as the kernel's struct.
unsafe impl DeviceRepr for LabMap {}

/// A binary convolution on the GPU: its filters laid out for the tensor cores once.
pub struct GpuBinaryConv {
    layout: ConvLayout,
    geometry: ConvGeometry,
    filters: CudaSlice<u32>,
    filter_popc: CudaSlice<i32>,
    tap_sums: CudaSlice<i32>,
}

impl GpuBinaryConv {
    /// `weights` with `geometry`, uploaded to `gpu`.
    pub fn new(
        gpu: &Gpu,
        weights: &super::PackedConvWeights,
        geometry: ConvGeometry,
    ) -> Result<Self> {
        if geometry.stride[0] == 0 || geometry.stride[1] == 0 {
            bail!(
                "binary convolution: strides must be at least 1, got {:?}",
                geometry.stride
            );
        }
        let layout = ConvLayout::new(weights);
        Ok(GpuBinaryConv {
            filters: gpu.upload(&layout.filters)?,
            filter_popc: gpu.upload(&layout.filter_popc)?,
            tap_sums: gpu.upload(&layout.tap_sums)?,
            layout,
            geometry,
        })
    }

    /// The output height and width for an input of `height x width`.
    pub fn output_size(&self, height: usize, width: usize) -> (usize, usize) {
        self.geometry.output_size(height, width, self.layout.kernel)
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.layout.out_channels
    }

    /// The kernel's shape for `input`, after checking it and `path`.
    fn shape(&self, gpu: &Gpu, input: &GpuMap, path: ConvPath) -> Result<BinaryConvShape> {
        Gpu::check_input("binary convolution", input)?;
        let layout = &self.layout;
        if input.channels != layout.in_channels {
            bail!(
                "binary convolution: the input has {} channels, the filters {}",
                input.channels,
                layout.in_channels
            );
        }
        if path == ConvPath::TensorCores && gpu.capability.0 < 8 {
            bail!(
                "binary convolution: binary tensor cores need compute capability 8.0, this GPU \
                 has {}.{}",
                gpu.capability.0,
                gpu.capability.1
            );
        }
        let (oh, ow) = self.output_size(input.height, input.width);
        let [top, _, left, _] = self.geometry.pads;
        Ok(BinaryConvShape {
            n: input.images as i64,
            h: input.height as i32,
            w: input.width as i32,
            words: input.words as i32,
            channels: layout.in_channels as i32,
            out_channels: layout.out_channels as i32,
            kh: layout.kernel[0] as i32,
            kw: layout.kernel[1] as i32,
            sy: self.geometry.stride[0] as i32,
            sx: self.geometry.stride[1] as i32,
            top: top as i32,
            left: left as i32,
            oh: oh as i32,
            ow: ow as i32,
            pad_one: i32::from(self.geometry.pad_value == PadValue::One),
            chunks: layout.chunks as i32,
        })
    }

    /// The tensor-core kernels' grid for `pixels` output pixels.
    fn mma_grid(&self, pixels: usize) -> LaunchConfig {
        debug_assert_eq!(self.layout.filters.len() % (CHUNK_WORDS * FILTER_BLOCK), 0);
        LaunchConfig {
            grid_dim: (
                pixels.div_ceil(MMA_PIXELS) as u32,
                (self.layout.padded_filters() / FILTER_BLOCK) as u32,
                1,
            ),
            block_dim: (MMA_THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// The exact integer dots of the convolution of `input`, `[images][oh][ow][out_channels]`
    /// (what the CPU kernel hands its epilogue, row by row), on the GPU's default path.
    pub fn dots(&self, gpu: &Gpu, input: &GpuMap) -> Result<CudaSlice<i32>> {
        self.dots_with(gpu, input, gpu.conv_path())
    }

    /// [`GpuBinaryConv::dots`] on `path`; the tensor cores need compute capability 8.0.
    pub fn dots_with(&self, gpu: &Gpu, input: &GpuMap, path: ConvPath) -> Result<CudaSlice<i32>> {
        let (oh, ow) = self.output_size(input.height, input.width);
        let mut dots = gpu.zeros::<i32>(input.images * oh * ow * self.layout.out_channels)?;
        self.dots_into(gpu, input, path, &mut dots)?;
        Ok(dots)
    }

    /// [`GpuBinaryConv::dots_with`] into `dots`, which holds at least the output's values.
    pub fn dots_into(
        &self,
        gpu: &Gpu,
        input: &GpuMap,
        path: ConvPath,
        dots: &mut CudaSlice<i32>,
    ) -> Result<()> {
        let shape = self.shape(gpu, input, path)?;
        let pixels = input.images * shape.oh as usize * shape.ow as usize;
        let values = pixels * self.layout.out_channels;
        if dots.len() < values {
            bail!(
                "binary convolution: {} dots for {values} values",
                dots.len()
            );
        }
        if values == 0 {
            return Ok(());
        }
        match path {
            ConvPath::TensorCores => {
                let func = gpu.kernel("binary_conv_mma")?;
                let mut launch = gpu.stream.launch_builder(&func);
                launch
                    .arg(&shape)
                    .arg(&input.data)
                    .arg(&self.filters)
                    .arg(&self.filter_popc)
                    .arg(&self.tap_sums)
                    .arg(dots);
                // SAFETY: `binary_conv_mma(BinaryConvShape, const unsigned* in, const unsigned*
                // weights, const int* filter_popc, const int* tap_sums, int* dots)`; the filters
                // are padded to the grid's columns and `chunks * 8` words each, `dots` holds
                // `pixels * out_channels` (checked above).
                unsafe { launch.launch(self.mma_grid(pixels)) }.w()?;
            }
            ConvPath::Popcount => {
                let func = gpu.kernel("binary_conv_popc")?;
                let mut launch = gpu.stream.launch_builder(&func);
                launch
                    .arg(&shape)
                    .arg(&input.data)
                    .arg(&self.filters)
                    .arg(&self.tap_sums)
                    .arg(dots);
                // SAFETY: `binary_conv_popc(BinaryConvShape, const unsigned* in, const unsigned*
                // weights, const int* tap_sums, int* dots)`: the same buffers as above.
                unsafe { launch.launch(elementwise(values)) }.w()?;
            }
        }
        Ok(())
    }

    /// The convolution of `input` with `epilogue` applied and `io`'s residual added, written to
    /// `io`'s outputs: in one kernel on the tensor cores, else as dots in `dots` (at least the output's
    /// values) and then [`GpuEpilogue::apply_into`].
    pub fn run_into(
        &self,
        gpu: &Gpu,
        input: &GpuMap,
        path: ConvPath,
        epilogue: &GpuEpilogue,
        io: EpilogueIo,
        dots: &mut CudaSlice<i32>,
    ) -> Result<()> {
        let shape = self.shape(gpu, input, path)?;
        let dims = [
            shape.oh as usize,
            shape.ow as usize,
            self.layout.out_channels,
        ];
        let Some(e) = epilogue.shape("binary convolution", input.images, dims, &io)? else {
            return Ok(());
        };
        if path == ConvPath::Popcount {
            self.dots_into(gpu, input, path, dots)?;
            return epilogue.apply_into(gpu, dots, io);
        }
        let (null, residual) = (0u64, io.residual.map(|r| &r.data));
        let (values, signs) = (
            io.values.map(|v| &mut v.data),
            io.signs.map(|s| &mut s.data),
        );
        let func = gpu.kernel("binary_conv_mma_epilogue")?;
        let mut launch = gpu.stream.launch_builder(&func);
        launch
            .arg(&shape)
            .arg(&input.data)
            .arg(&self.filters)
            .arg(&self.filter_popc)
            .arg(&self.tap_sums)
            .arg(&e)
            .arg(&epilogue.kinds)
            .arg(&epilogue.offsets)
            .arg(&epilogue.params);
        push_or_null(&mut launch, residual, &null);
        push_or_null(&mut launch, values, &null);
        push_or_null(&mut launch, signs, &null);
        // SAFETY: `binary_conv_mma_epilogue(BinaryConvShape, const unsigned* in, const
        // unsigned* weights, const int* filter_popc, const int* tap_sums, Epilogue, const int*
        // kinds, const int* offsets, const float* params, const float* residual, float* values,
        // unsigned* bits)`: the buffers of `dots_into`, the epilogue's program, and a residual,
        // values and signs of the output's shape (checked by `GpuEpilogue::shape`), null
        // where absent and then not read or written by the kernel's flags.
        unsafe { launch.launch(self.mma_grid(e.pixels as usize)) }.w()?;
        Ok(())
    }
}

/// Pushes `buffer` as a kernel argument, or a null pointer.
fn push_or_null<'a, A>(launch: &mut LaunchArgs<'a>, buffer: Option<A>, null: &'a u64)
where
    LaunchArgs<'a>: PushKernelArg<A> + PushKernelArg<&'a u64>,
{
    match buffer {
        Some(b) => launch.arg(b),
        None => launch.arg(null),
    };
}

/// LAB's binarizer on the GPU.
pub struct GpuLab {
    channels: usize,
    weights: LabWeights,
}

enum LabWeights {
    Folded {
        kernel: CudaSlice<f32>,
        bias: CudaSlice<f32>,
    },
    Paired {
        pos: CudaSlice<f32>,
        pos_source: CudaSlice<i32>,
        neg: CudaSlice<f32>,
        neg_source: CudaSlice<i32>,
        bias: CudaSlice<f32>,
    },
}

impl GpuLab {
    /// `lab`'s weights, uploaded to `gpu`.
    pub fn new(gpu: &Gpu, lab: &LabKernel) -> Result<Self> {
        let sources = |s: &[usize]| s.iter().map(|&c| c as i32).collect::<Vec<_>>();
        let weights = match &lab.form {
            Form::Folded { kernel, bias } => LabWeights::Folded {
                kernel: gpu.upload(kernel)?,
                bias: gpu.upload(bias)?,
            },
            Form::Paired {
                pos,
                pos_source,
                neg,
                neg_source,
                bias,
            } => LabWeights::Paired {
                pos: gpu.upload(pos)?,
                pos_source: gpu.upload(&sources(pos_source))?,
                neg: gpu.upload(neg)?,
                neg_source: gpu.upload(&sources(neg_source))?,
                bias: gpu.upload(bias)?,
            },
        };
        Ok(GpuLab {
            channels: lab.channels(),
            weights,
        })
    }

    /// LAB's binarization of NHWC float maps `x`, as [`super::lab_pack`]: the same bits.
    pub fn pack(&self, gpu: &Gpu, x: &GpuFloats) -> Result<GpuMap> {
        let mut out = gpu.map(x.images, x.shape())?;
        self.pack_into(gpu, x, &mut out)?;
        Ok(out)
    }

    /// [`GpuLab::pack`] into `out`, a map of `x`'s shape.
    pub fn pack_into(&self, gpu: &Gpu, x: &GpuFloats, out: &mut GpuMap) -> Result<()> {
        if x.channels != self.channels {
            bail!(
                "lab: the input has {} channels, LAB's kernel {}",
                x.channels,
                self.channels
            );
        }
        float::check_input("lab", x)?;
        Gpu::check_map("lab", out, x.images, x.shape())?;
        let (pixels, words) = (x.pixels(), out.words);
        if pixels * words == 0 {
            return Ok(());
        }
        let map = LabMap {
            n: x.images as i64,
            h: x.height as i32,
            w: x.width as i32,
            c: x.channels as i32,
            words: words as i32,
        };
        let config = elementwise(32 * pixels * words);
        match &self.weights {
            LabWeights::Folded { kernel, bias } => {
                let func = gpu.kernel("lab_pack_folded")?;
                let mut launch = gpu.stream.launch_builder(&func);
                launch
                    .arg(&map)
                    .arg(&x.data)
                    .arg(kernel)
                    .arg(bias)
                    .arg(&mut out.data);
                // SAFETY: `lab_pack_folded(LabMap, const float* x, const float* kernel, const
                // float* bias, unsigned* bits)`; `kernel` is [9][c], `bias` [c], `x` the maps
                // and the output `pixels * words` words (checked above).
                unsafe { launch.launch(config) }.w()?;
            }
            LabWeights::Paired {
                pos,
                pos_source,
                neg,
                neg_source,
                bias,
            } => {
                let func = gpu.kernel("lab_pack_paired")?;
                let mut launch = gpu.stream.launch_builder(&func);
                launch
                    .arg(&map)
                    .arg(&x.data)
                    .arg(pos)
                    .arg(pos_source)
                    .arg(neg)
                    .arg(neg_source)
                    .arg(bias)
                    .arg(&mut out.data);
                // SAFETY: `lab_pack_paired(LabMap, const float* x, const float* pos, const int*
                // pos_source, const float* neg, const int* neg_source, const float* bias,
                // unsigned* bits)`; the sources are channels below `c` (checked by
                // `LabKernel::paired`).
                unsafe { launch.launch(config) }.w()?;
            }
        }
        Ok(())
    }
}

/// A layer's output transform on the GPU: its ops' parameters uploaded once.
pub struct GpuEpilogue {
    channels: usize,
    /// The number of ops (a kernel argument).
    ops: i32,
    kinds: CudaSlice<i32>,
    offsets: CudaSlice<i32>,
    params: CudaSlice<f32>,
}

/// What [`GpuEpilogue::apply`] writes.
pub struct EpilogueOutput {
    /// The transformed values, `[pixels][channels]`, where asked for.
    pub values: Option<GpuFloats>,
    /// Larq's signs of the transformed values, packed, where asked for.
    pub signs: Option<GpuMap>,
}

/// What [`GpuEpilogue::apply_into`] and [`GpuBinaryConv::run_into`] read besides the dots, a
/// residual, and where they write: floats, packed signs, or both, each of the output's shape.
#[derive(Default)]
pub struct EpilogueIo<'a> {
    /// Added to the transformed values.
    pub residual: Option<&'a GpuFloats>,
    /// The transformed values.
    pub values: Option<&'a mut GpuFloats>,
    /// Their signs, packed.
    pub signs: Option<&'a mut GpuMap>,
}

impl GpuEpilogue {
    /// `ops` on `channels` output channels, uploaded to `gpu`.
    ///
    /// # Panics
    /// If an op's parameters are not one per channel.
    pub fn new(gpu: &Gpu, channels: usize, ops: &[EpilogueOp]) -> Result<Self> {
        let program = EpilogueProgram::new(channels, ops);
        Ok(GpuEpilogue {
            channels,
            ops: program.kinds.len() as i32,
            kinds: gpu.upload(&program.kinds)?,
            offsets: gpu.upload(&program.offsets)?,
            params: gpu.upload(&program.params)?,
        })
    }

    /// The output channels.
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// The kernels' `Epilogue` for `images` outputs of `[height, width, channels]`, after
    /// checking `io`'s buffers against it; `None` for an empty output.
    fn shape(
        &self,
        op: &str,
        images: usize,
        [height, width, channels]: [usize; 3],
        io: &EpilogueIo,
    ) -> Result<Option<EpilogueShape>> {
        let dims = [height, width, channels];
        if channels != self.channels {
            bail!(
                "{op}: {channels} output channels, the output transform {}",
                self.channels
            );
        }
        let float_shape = |m: &GpuFloats| m.images == images && m.shape() == dims;
        if !io.residual.is_none_or(float_shape) || !io.values.as_deref().is_none_or(float_shape) {
            bail!("{op}: a residual or output not of {images} maps of {dims:?}");
        }
        if let Some(signs) = io.signs.as_deref() {
            Gpu::check_map(op, signs, images, dims)?;
        }
        let pixels = images * height * width;
        Ok((pixels * channels > 0).then(|| EpilogueShape {
            pixels: pixels as i64,
            channels: channels as i32,
            words: 2 * channels.div_ceil(64) as i32,
            ops: self.ops,
            residual: i32::from(io.residual.is_some()),
            write_values: i32::from(io.values.is_some()),
            write_signs: i32::from(io.signs.is_some()),
        }))
    }

    /// The ops applied to `dots` of `images` maps of `height x width` (`[pixels][channels]`,
    /// as [`GpuBinaryConv::dots`] gives them), then `residual` added (one value per output
    /// value); the floats kept if `values`, their signs packed if `signs`.
    pub fn apply(
        &self,
        gpu: &Gpu,
        dots: &CudaSlice<i32>,
        images: usize,
        [height, width]: [usize; 2],
        residual: Option<&GpuFloats>,
        (values, signs): (bool, bool),
    ) -> Result<EpilogueOutput> {
        let shape = [height, width, self.channels];
        let mut out = EpilogueOutput {
            values: values.then(|| gpu.floats(images, shape)).transpose()?,
            signs: signs.then(|| gpu.map(images, shape)).transpose()?,
        };
        let io = EpilogueIo {
            residual,
            values: out.values.as_mut(),
            signs: out.signs.as_mut(),
        };
        self.apply_into(gpu, dots, io)?;
        Ok(out)
    }

    /// [`GpuEpilogue::apply`] into `out`'s buffers, whose shape is the output's; `dots` holds
    /// at least its values.
    pub fn apply_into(&self, gpu: &Gpu, dots: &CudaSlice<i32>, io: EpilogueIo) -> Result<()> {
        let (images, dims) = match (&io.values, &io.signs) {
            (Some(v), _) => (v.images, v.shape()),
            (None, Some(s)) => (s.images, [s.height, s.width, s.channels]),
            (None, None) => bail!("epilogue: neither values nor signs to write"),
        };
        let Some(e) = self.shape("epilogue", images, dims, &io)? else {
            return Ok(());
        };
        if dots.len() < e.pixels as usize * self.channels {
            bail!(
                "epilogue: {} dots for {images} maps of {dims:?}",
                dots.len()
            );
        }
        let (null, residual) = (0u64, io.residual.map(|r| &r.data));
        let (values, signs) = (
            io.values.map(|v| &mut v.data),
            io.signs.map(|s| &mut s.data),
        );
        let total = 32 * e.pixels as usize * e.words as usize;
        let func = gpu.kernel("dots_epilogue")?;
        let mut launch = gpu.stream.launch_builder(&func);
        launch
            .arg(&e)
            .arg(dots)
            .arg(&self.kinds)
            .arg(&self.offsets)
            .arg(&self.params);
        push_or_null(&mut launch, residual, &null);
        push_or_null(&mut launch, values, &null);
        push_or_null(&mut launch, signs, &null);
        // SAFETY: `dots_epilogue(Epilogue, const int* dots, const int* kinds, const int*
        // offsets, const float* params, const float* residual, float* values, unsigned* bits)`;
        // `dots`, a given residual and values hold `pixels * channels` values and the signs
        // `pixels * words` words (checked above); absent buffers are null and not touched.
        unsafe { launch.launch(elementwise(total)) }.w()?;
        Ok(())
    }
}

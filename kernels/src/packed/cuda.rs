//! The packed kernels on an NVIDIA GPU (feature `cuda`): the CUDA sources of
//! `kernels/cuda/packed.cu` run on batches of maps in the CPU kernels' bits
//! ([`super::gpu`] lays them out), so that every result can be compared with the CPU's exactly.
//!
//! - [`Gpu::pack_signs`]: Larq's sign of float NHWC maps, packed;
//! - [`GpuLab::pack`]: LAB's depthwise score, thresholded and packed, bit for bit the CPU's;
//! - [`GpuBinaryConv::dots`]: the exact integer ±1 convolution on binary tensor cores
//!   (`mma.m16n8k256` with AND + popcount; compute capability 8.0 and later), or with XOR and
//!   popcount on CUDA cores on older GPUs ([`ConvPath`]);
//! - [`GpuEpilogue::apply`]: the per-channel transforms of the dots and a residual, written as
//!   floats and/or packed signs;
//! - [`Gpu::max_pool`]: max pooling of ±1 maps.
//!
//! Without a GPU, [`Gpu::new`] fails saying so.

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, LaunchConfig,
    PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, Result};

use super::gpu::{full_words, ConvLayout, EpilogueOp, EpilogueProgram, CHUNK_WORDS, FILTER_BLOCK};
use super::lab::Form;
use super::{ConvGeometry, LabKernel, PadValue};
use crate::cuda::{elementwise, PACKED};

/// The threads of a block of the tensor-core convolution (`MMA_WARPS` warps in `packed.cu`).
const MMA_THREADS: u32 = 128;
/// Output pixels of a block of the tensor-core convolution (16 per warp).
const MMA_PIXELS: usize = 64;

/// A GPU with the packed kernels loaded, and the stream they run on.
pub struct Gpu {
    stream: Arc<CudaStream>,
    module: Arc<CudaModule>,
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
    /// GPU `ordinal`, its kernels compiled by NVRTC for its compute capability. Fails on a
    /// machine without a GPU or driver.
    pub fn new(ordinal: usize) -> Result<Self> {
        let context = CudaContext::new(ordinal).map_err(|e| {
            candle_core::Error::Cuda(
                format!("no CUDA GPU {ordinal} (no NVIDIA GPU, or no driver for it): {e:?}").into(),
            )
        })?;
        let capability = context.compute_capability().w()?;
        let ptx = PACKED.ptx(capability)?;
        let module = context.load_module(Ptx::from_src(&*ptx)).w()?;
        Ok(Gpu {
            stream: context.default_stream(),
            module,
            capability,
        })
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

    fn kernel(&self, name: &str) -> Result<CudaFunction> {
        self.module.load_function(name).w()
    }

    /// `values` copied to the GPU (a buffer of one element where `values` is empty, which CUDA
    /// cannot allocate).
    pub fn upload<T: DeviceRepr + Default + Clone>(&self, values: &[T]) -> Result<CudaSlice<T>> {
        if values.is_empty() {
            return self.stream.clone_htod(&[T::default()][..]).w();
        }
        self.stream.clone_htod(values).w()
    }

    /// The first `len` elements of `buffer`, copied to the host.
    pub fn download<T: DeviceRepr>(&self, buffer: &CudaSlice<T>, len: usize) -> Result<Vec<T>> {
        let mut all = self.stream.clone_dtoh(buffer).w()?;
        all.truncate(len);
        Ok(all)
    }

    /// A buffer of `len` zeros (at least one element, which CUDA needs).
    fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.stream.alloc_zeros::<T>(len.max(1)).w()
    }

    /// `images` maps of `height x width x channels` of +1 (all bits 0), for a kernel to write.
    fn zero_map(&self, images: usize, [height, width, channels]: [usize; 3]) -> Result<GpuMap> {
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

    /// Fails, naming `op`, unless `x` holds `images` float maps of `height x width x channels`.
    fn check_floats(
        op: &str,
        x: &CudaSlice<f32>,
        images: usize,
        [height, width, channels]: [usize; 3],
    ) -> Result<()> {
        if x.len() < images * height * width * channels {
            bail!(
                "{op}: {} floats for {images} maps of {height}x{width}x{channels}",
                x.len()
            );
        }
        Ok(())
    }

    /// Larq's sign of `images` NHWC float maps (`x`: `[images][height][width][channels]`),
    /// packed: bit 1 where `x < 0`, bit 0 elsewhere (`±0.0` and NaN included).
    pub fn pack_signs(
        &self,
        x: &CudaSlice<f32>,
        images: usize,
        [height, width, channels]: [usize; 3],
    ) -> Result<GpuMap> {
        Self::check_floats("pack_signs", x, images, [height, width, channels])?;
        let mut map = self.zero_map(images, [height, width, channels])?;
        let (pixels, words) = (images * height * width, map.words);
        if pixels * words > 0 {
            let (pixels, c, w) = (pixels as i64, channels as i32, words as i32);
            let func = self.kernel("pack_signs")?;
            let mut launch = self.stream.launch_builder(&func);
            launch
                .arg(x)
                .arg(&mut map.data)
                .arg(&pixels)
                .arg(&c)
                .arg(&w);
            // SAFETY: `pack_signs(const float* x, unsigned* bits, i64 pixels, int channels,
            // int words)`; `x` holds `pixels * channels` floats (checked above) and the map
            // `pixels * words` words.
            unsafe { launch.launch(elementwise(32 * pixels as usize * words)) }.w()?;
        }
        Ok(map)
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
    pub fn max_pool(
        &self,
        input: &GpuMap,
        size: [usize; 2],
        stride: [usize; 2],
        pads: [usize; 4],
    ) -> Result<GpuMap> {
        if stride[0] == 0 || stride[1] == 0 {
            bail!("max_pool: strides must be at least 1, got {stride:?}");
        }
        let [top, bottom, left, right] = pads;
        let out_size = |n: usize, k: usize, s: usize| if n < k { 0 } else { (n - k) / s + 1 };
        let oh = out_size(input.height + top + bottom, size[0], stride[0]);
        let ow = out_size(input.width + left + right, size[1], stride[1]);
        let mut out = self.zero_map(input.images, [oh, ow, input.channels])?;
        let total = input.images * oh * ow * input.words;
        if total > 0 {
            let shape = PoolShape {
                n: input.images as i64,
                h: input.height as i32,
                w: input.width as i32,
                words: input.words as i32,
                kh: size[0] as i32,
                kw: size[1] as i32,
                sy: stride[0] as i32,
                sx: stride[1] as i32,
                top: top as i32,
                left: left as i32,
                oh: oh as i32,
                ow: ow as i32,
            };
            let full = self.upload(&full_words(input.channels, input.words))?;
            let func = self.kernel("max_pool_bits")?;
            let mut launch = self.stream.launch_builder(&func);
            launch
                .arg(&shape)
                .arg(&input.data)
                .arg(&full)
                .arg(&mut out.data);
            // SAFETY: `max_pool_bits(PoolShape, const unsigned* in, const unsigned* full,
            // unsigned* out)`; `in` holds the input map, `full` `words` words and `out`
            // `images * oh * ow * words`.
            unsafe { launch.launch(elementwise(total)) }.w()?;
        }
        Ok(out)
    }
}

/// `struct PoolShape` of `packed.cu`.
#[repr(C)]
struct PoolShape {
    n: i64,
    h: i32,
    w: i32,
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

    /// The exact integer dots of the convolution of `input`, `[images][oh][ow][out_channels]`
    /// (what the CPU kernel hands its epilogue, row by row), on the GPU's default path.
    pub fn dots(&self, gpu: &Gpu, input: &GpuMap) -> Result<CudaSlice<i32>> {
        self.dots_with(gpu, input, gpu.conv_path())
    }

    /// [`GpuBinaryConv::dots`] on `path`; the tensor cores need compute capability 8.0.
    pub fn dots_with(&self, gpu: &Gpu, input: &GpuMap, path: ConvPath) -> Result<CudaSlice<i32>> {
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
        let pixels = input.images * oh * ow;
        let mut dots = gpu.zeros::<i32>(pixels * layout.out_channels)?;
        if pixels * layout.out_channels == 0 {
            return Ok(dots);
        }
        let [top, _, left, _] = self.geometry.pads;
        let shape = BinaryConvShape {
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
        };
        debug_assert_eq!(layout.filters.len() % (CHUNK_WORDS * FILTER_BLOCK), 0);
        match path {
            ConvPath::TensorCores => {
                let config = LaunchConfig {
                    grid_dim: (
                        pixels.div_ceil(MMA_PIXELS) as u32,
                        (layout.padded_filters() / FILTER_BLOCK) as u32,
                        1,
                    ),
                    block_dim: (MMA_THREADS, 1, 1),
                    shared_mem_bytes: 0,
                };
                let func = gpu.kernel("binary_conv_mma")?;
                let mut launch = gpu.stream.launch_builder(&func);
                launch
                    .arg(&shape)
                    .arg(&input.data)
                    .arg(&self.filters)
                    .arg(&self.filter_popc)
                    .arg(&self.tap_sums)
                    .arg(&mut dots);
                // SAFETY: `binary_conv_mma(BinaryConvShape, const unsigned* in, const unsigned*
                // weights, const int* filter_popc, const int* tap_sums, int* dots)`; the filters
                // are padded to the grid's columns and `chunks * 8` words each, `dots` holds
                // `pixels * out_channels`.
                unsafe { launch.launch(config) }.w()?;
            }
            ConvPath::Popcount => {
                let func = gpu.kernel("binary_conv_popc")?;
                let mut launch = gpu.stream.launch_builder(&func);
                launch
                    .arg(&shape)
                    .arg(&input.data)
                    .arg(&self.filters)
                    .arg(&self.tap_sums)
                    .arg(&mut dots);
                // SAFETY: `binary_conv_popc(BinaryConvShape, const unsigned* in, const unsigned*
                // weights, const int* tap_sums, int* dots)`: the same buffers as above.
                unsafe { launch.launch(elementwise(pixels * layout.out_channels)) }.w()?;
            }
        }
        Ok(dots)
    }
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

    /// LAB's binarization of `images` NHWC float maps of `height x width` (`x`), as
    /// [`super::lab_pack`]: the same bits.
    pub fn pack(
        &self,
        gpu: &Gpu,
        x: &CudaSlice<f32>,
        images: usize,
        [height, width]: [usize; 2],
    ) -> Result<GpuMap> {
        let channels = self.channels;
        Gpu::check_floats("lab", x, images, [height, width, channels])?;
        let mut out = gpu.zero_map(images, [height, width, channels])?;
        let (pixels, words) = (images * height * width, out.words);
        if pixels * words > 0 {
            let map = LabMap {
                n: images as i64,
                h: height as i32,
                w: width as i32,
                c: channels as i32,
                words: words as i32,
            };
            let config = elementwise(32 * pixels * words);
            match &self.weights {
                LabWeights::Folded { kernel, bias } => {
                    let func = gpu.kernel("lab_pack_folded")?;
                    let mut launch = gpu.stream.launch_builder(&func);
                    launch
                        .arg(&map)
                        .arg(x)
                        .arg(kernel)
                        .arg(bias)
                        .arg(&mut out.data);
                    // SAFETY: `lab_pack_folded(LabMap, const float* x, const float* kernel,
                    // const float* bias, unsigned* bits)`; `kernel` is [9][c], `bias` [c], `x`
                    // the maps (checked above), the output `pixels * words` words.
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
                        .arg(x)
                        .arg(pos)
                        .arg(pos_source)
                        .arg(neg)
                        .arg(neg_source)
                        .arg(bias)
                        .arg(&mut out.data);
                    // SAFETY: `lab_pack_paired(LabMap, const float* x, const float* pos,
                    // const int* pos_source, const float* neg, const int* neg_source,
                    // const float* bias, unsigned* bits)`; the sources are channels below `c`
                    // (checked by `LabKernel::paired`).
                    unsafe { launch.launch(config) }.w()?;
                }
            }
        }
        Ok(out)
    }
}

/// The output transform of a binary convolution on the GPU: its ops' parameters uploaded once.
pub struct GpuEpilogue {
    channels: usize,
    ops: usize,
    kinds: CudaSlice<i32>,
    offsets: CudaSlice<i32>,
    params: CudaSlice<f32>,
}

/// What [`GpuEpilogue::apply`] writes.
pub struct EpilogueOutput {
    /// The transformed values, `[pixels][channels]`, where asked for.
    pub values: Option<CudaSlice<f32>>,
    /// Larq's signs of the transformed values, packed, where asked for.
    pub signs: Option<GpuMap>,
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
            ops: program.kinds.len(),
            kinds: gpu.upload(&program.kinds)?,
            offsets: gpu.upload(&program.offsets)?,
            params: gpu.upload(&program.params)?,
        })
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
        residual: Option<&CudaSlice<f32>>,
        (values, signs): (bool, bool),
    ) -> Result<EpilogueOutput> {
        let pixels = images * height * width;
        let n = pixels * self.channels;
        if dots.len() < n || residual.is_some_and(|r| r.len() < n) {
            bail!(
                "epilogue: fewer dots or residual values than {images}x{height}x{width}x{}",
                self.channels
            );
        }
        let words = 2 * self.channels.div_ceil(64);
        let mut out = gpu.zeros::<f32>(if values { n } else { 1 })?;
        let mut bits = gpu.zeros::<u32>(if signs { pixels * words } else { 1 })?;
        if n > 0 {
            let shape = EpilogueShape {
                pixels: pixels as i64,
                channels: self.channels as i32,
                words: words as i32,
                ops: self.ops as i32,
                residual: i32::from(residual.is_some()),
                write_values: i32::from(values),
                write_signs: i32::from(signs),
            };
            let none = gpu.zeros::<f32>(1)?;
            let func = gpu.kernel("dots_epilogue")?;
            let mut launch = gpu.stream.launch_builder(&func);
            launch
                .arg(&shape)
                .arg(dots)
                .arg(&self.kinds)
                .arg(&self.offsets)
                .arg(&self.params)
                .arg(residual.unwrap_or(&none))
                .arg(&mut out)
                .arg(&mut bits);
            // SAFETY: `dots_epilogue(Epilogue, const int* dots, const int* kinds, const int*
            // offsets, const float* params, const float* residual, float* values, unsigned*
            // bits)`; `dots` and a given residual hold `pixels * channels` values (checked),
            // `values` and `bits` are read or written only where the flags say so, and then
            // hold `pixels * channels` floats and `pixels * words` words.
            unsafe { launch.launch(elementwise(32 * pixels * words)) }.w()?;
        }
        Ok(EpilogueOutput {
            values: values.then_some(out),
            signs: signs.then_some(GpuMap {
                images,
                height,
                width,
                channels: self.channels,
                words,
                data: bits,
            }),
        })
    }
}

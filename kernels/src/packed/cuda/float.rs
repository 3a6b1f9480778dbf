//! The inference engine's full-precision layers on the GPU (`kernels/cuda/float_layers.cu`):
//! the stem and transition convolutions, depthwise convolution and the blur, pooling, the
//! dense head, per-channel transforms, channel concatenation and the input's transpose, on
//! batches of NHWC float maps ([`GpuFloats`]). Each computes what the CPU engine's layer
//! computes (`zoo/src/engine/float.rs`), its output transform and residual included, with the
//! float operations of its AVX2 / AVX-512 kernels in their order (fused multiply-adds for
//! convolutions and the dense layer, rounded products and sums for depthwise ones), so that
//! the outputs are the CPU's bit for bit where the CPU runs those kernels.

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, LaunchArgs, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, Result};

use super::{push_or_null, Gpu, GpuEpilogue};
use crate::cuda::elementwise;
use crate::packed::Window;

/// A batch of float maps of one shape on the GPU, `[images][height][width][channels]`.
pub struct GpuFloats {
    /// Images.
    pub images: usize,
    /// Rows of each image.
    pub height: usize,
    /// Columns of each image.
    pub width: usize,
    /// Channels of each pixel.
    pub channels: usize,
    /// The values (at least `images * height * width * channels`).
    pub data: CudaSlice<f32>,
}

impl GpuFloats {
    /// `[height, width, channels]`.
    pub fn shape(&self) -> [usize; 3] {
        [self.height, self.width, self.channels]
    }

    /// Pixels over all images.
    pub fn pixels(&self) -> usize {
        self.images * self.height * self.width
    }

    /// Values over all images.
    pub fn len(&self) -> usize {
        self.pixels() * self.channels
    }

    /// True when the maps hold no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a pooling op computes over the taps of a window inside the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolMode {
    /// The maximum (the padding never wins).
    Max,
    /// The maximum of the taps and 0: the max pool of the map's ReLU.
    MaxOfRelu,
    /// The mean.
    Average,
}

/// `struct WindowShape` of `float_layers.cu`.
#[repr(C)]
struct WindowShape {
    n: i64,
    h: i32,
    w: i32,
    c: i32,
    oh: i32,
    ow: i32,
    oc: i32,
    kh: i32,
    kw: i32,
    sy: i32,
    sx: i32,
    top: i32,
    left: i32,
}

// SAFETY: plain data, laid out as the kernel's struct.
unsafe impl DeviceRepr for WindowShape {}

impl WindowShape {
    /// `window` over `x` with `oc` output channels; also the output's `[oh, ow, oc]`.
    fn new(x: &GpuFloats, window: Window, oc: usize) -> Result<(Self, [usize; 3])> {
        check_input("window op", x)?;
        if window.stride.contains(&0) {
            bail!("a window op with a zero stride ({:?})", window.stride);
        }
        let (oh, ow) = window.output(x.height, x.width);
        let shape = WindowShape {
            n: x.images as i64,
            h: x.height as i32,
            w: x.width as i32,
            c: x.channels as i32,
            oh: oh as i32,
            ow: ow as i32,
            oc: oc as i32,
            kh: window.kernel[0] as i32,
            kw: window.kernel[1] as i32,
            sy: window.stride[0] as i32,
            sx: window.stride[1] as i32,
            top: window.pads[0] as i32,
            left: window.pads[2] as i32,
        };
        Ok((shape, [oh, ow, oc]))
    }
}

/// Fails, naming `op`, unless `x` holds the values of its shape.
pub(super) fn check_input(op: &str, x: &GpuFloats) -> Result<()> {
    check_floats(op, x, x.images, x.shape())
}

/// Fails, naming `op`, unless `out` is `images` maps of `shape` and holds their values.
fn check_floats(op: &str, out: &GpuFloats, images: usize, shape: [usize; 3]) -> Result<()> {
    if out.images != images || out.shape() != shape {
        bail!(
            "{op}: {} maps of {:?}, expected {images} of {shape:?}",
            out.images,
            out.shape()
        );
    }
    if out.data.len() < out.len() {
        bail!("{op}: {} floats for {} values", out.data.len(), out.len());
    }
    Ok(())
}

impl GpuEpilogue {
    /// Pushes the op program (`int ops, const int* kinds, const int* offsets, const float*
    /// params`) for `channels` output channels.
    fn push_program<'a>(
        &'a self,
        launch: &mut LaunchArgs<'a>,
        op: &str,
        channels: usize,
    ) -> Result<()> {
        if channels != self.channels {
            bail!(
                "{op}: {channels} output channels, the output transform {}",
                self.channels
            );
        }
        launch
            .arg(&self.ops)
            .arg(&self.kinds)
            .arg(&self.offsets)
            .arg(&self.params);
        Ok(())
    }
}

impl Gpu {
    /// `images` float maps of `height x width x channels` of zeros.
    pub fn floats(&self, images: usize, shape: [usize; 3]) -> Result<GpuFloats> {
        let [height, width, channels] = shape;
        Ok(GpuFloats {
            images,
            height,
            width,
            channels,
            data: self.zeros::<f32>(images * height * width * channels)?,
        })
    }

    /// `values` (`[images][height][width][channels]`) copied to the GPU.
    pub fn upload_floats(
        &self,
        values: &[f32],
        images: usize,
        [height, width, channels]: [usize; 3],
    ) -> Result<GpuFloats> {
        if values.len() != images * height * width * channels {
            bail!(
                "{} floats for {images} maps of {height}x{width}x{channels}",
                values.len()
            );
        }
        Ok(GpuFloats {
            images,
            height,
            width,
            channels,
            data: self.upload(values)?,
        })
    }

    /// The values of `x`, copied to the host.
    pub fn download_floats(&self, x: &GpuFloats) -> Result<Vec<f32>> {
        self.download(&x.data, x.len())
    }

    /// Pooling of `x` over `window` into `out`, a map of the output's shape.
    pub fn pool_into(
        &self,
        x: &GpuFloats,
        window: Window,
        mode: PoolMode,
        out: &mut GpuFloats,
    ) -> Result<()> {
        let (shape, dims) = WindowShape::new(x, window, x.channels)?;
        check_floats("pool", out, x.images, dims)?;
        let total = out.len();
        if total == 0 {
            return Ok(());
        }
        let mode = match mode {
            PoolMode::Max => 0i32,
            PoolMode::MaxOfRelu => 1,
            PoolMode::Average => 2,
        };
        let func = self.float_kernel("float_pool")?;
        let mut launch = self.stream.launch_builder(&func);
        launch
            .arg(&shape)
            .arg(&mode)
            .arg(&x.data)
            .arg(&mut out.data);
        // SAFETY: `float_pool(WindowShape, int mode, const float* x, float* out)`; `x` is the
        // shape's input and `out` its output (checked above).
        unsafe { launch.launch(elementwise(total)) }.w()?;
        Ok(())
    }

    /// The mean of each image's channels over its pixels into `out`, `images` maps of
    /// `1 x 1 x channels`.
    pub fn global_avg_pool_into(&self, x: &GpuFloats, out: &mut GpuFloats) -> Result<()> {
        check_input("global_avg_pool", x)?;
        check_floats("global_avg_pool", out, x.images, [1, 1, x.channels])?;
        let total = out.len();
        if total == 0 {
            return Ok(());
        }
        let (n, pixels, c) = (
            x.images as i64,
            (x.height * x.width) as i64,
            x.channels as i32,
        );
        let func = self.float_kernel("global_avg_pool")?;
        let mut launch = self.stream.launch_builder(&func);
        launch
            .arg(&n)
            .arg(&pixels)
            .arg(&c)
            .arg(&x.data)
            .arg(&mut out.data);
        // SAFETY: `global_avg_pool(i64 n, i64 pixels, int c, const float* x, float* out)`; `x`
        // holds n * pixels * c values and `out` n * c (checked above).
        unsafe { launch.launch(elementwise(total)) }.w()?;
        Ok(())
    }

    /// Copies the maps `src` into channels `offset..` of `dst`, maps of the same images and
    /// pixels.
    pub fn copy_channels_into(
        &self,
        src: &GpuFloats,
        dst: &mut GpuFloats,
        offset: usize,
    ) -> Result<()> {
        let shape = [src.height, src.width, dst.channels];
        check_input("concat", src)?;
        check_floats("concat", dst, src.images, shape)?;
        if offset + src.channels > dst.channels {
            bail!(
                "concat: channels {offset}..{} of a map of {}",
                offset + src.channels,
                dst.channels
            );
        }
        if src.is_empty() {
            return Ok(());
        }
        let (pixels, from, to, at) = (
            src.pixels() as i64,
            src.channels as i32,
            dst.channels as i32,
            offset as i32,
        );
        let func = self.float_kernel("copy_channels")?;
        let mut launch = self.stream.launch_builder(&func);
        launch
            .arg(&pixels)
            .arg(&from)
            .arg(&to)
            .arg(&at)
            .arg(&src.data)
            .arg(&mut dst.data);
        // SAFETY: `copy_channels(i64 pixels, int from, int to, int offset, const float* src,
        // float* dst)`; both hold `pixels` pixels, the channels fit (checked above).
        unsafe { launch.launch(elementwise(src.len())) }.w()?;
        Ok(())
    }

    /// Copies the values of `src` into `dst`, maps of as many values (a flattened `src`).
    pub fn copy_into(&self, src: &GpuFloats, dst: &mut GpuFloats) -> Result<()> {
        check_input("copy", src)?;
        check_input("copy", dst)?;
        if src.len() != dst.len() || src.images != dst.images {
            bail!(
                "copy: {} maps of {:?} into {} of {:?}",
                src.images,
                src.shape(),
                dst.images,
                dst.shape()
            );
        }
        if src.is_empty() {
            return Ok(());
        }
        let len = src.len();
        self.stream
            .memcpy_dtod(&src.data.slice(..len), &mut dst.data.slice_mut(..len))
            .w()
    }

    /// `x`, `out.images` images in NCHW layout (the models' input), transposed into `out`.
    pub fn nchw_to_nhwc_into(&self, x: &CudaSlice<f32>, out: &mut GpuFloats) -> Result<()> {
        if x.len() < out.len() {
            bail!("input: {} floats for {} values", x.len(), out.len());
        }
        let total = out.len();
        if total == 0 {
            return Ok(());
        }
        let n = out.images as i64;
        let [h, w, c] = out.shape().map(|d| d as i32);
        let func = self.float_kernel("nchw_to_nhwc")?;
        let mut launch = self.stream.launch_builder(&func);
        launch
            .arg(&n)
            .arg(&c)
            .arg(&h)
            .arg(&w)
            .arg(x)
            .arg(&mut out.data);
        // SAFETY: `nchw_to_nhwc(i64 n, int c, int h, int w, const float* x, float* out)`; both
        // hold n * c * h * w values (checked above).
        unsafe { launch.launch(elementwise(total)) }.w()?;
        Ok(())
    }
}

/// The weights of a window op with an output transform (a convolution or a depthwise one) on
/// the GPU, and the launch both share: `kernel(WindowShape, param, const float* x, const float*
/// weight, int ops, const int* kinds, const int* offsets, const float* params, const float*
/// residual, float* out)`.
struct WindowWeights {
    weight: CudaSlice<f32>,
    window: Window,
    out_channels: usize,
}

impl WindowWeights {
    /// `weight` uploaded for `window`.
    fn new(gpu: &Gpu, weight: &[f32], window: Window, out_channels: usize) -> Result<Self> {
        Ok(WindowWeights {
            weight: gpu.upload(weight)?,
            window,
            out_channels,
        })
    }

    /// `kernel` (named `op` in errors) with its `param` on `x`, `epilogue` applied and
    /// `residual` added, into `out`.
    fn run_into<P: DeviceRepr>(
        &self,
        gpu: &Gpu,
        (kernel, op, param): (&str, &str, P),
        x: &GpuFloats,
        epilogue: &GpuEpilogue,
        residual: Option<&GpuFloats>,
        out: &mut GpuFloats,
    ) -> Result<()> {
        let (shape, dims) = WindowShape::new(x, self.window, self.out_channels)?;
        check_floats(op, out, x.images, dims)?;
        if let Some(r) = residual {
            check_floats(&format!("{op}'s residual"), r, x.images, dims)?;
        }
        let total = out.len();
        if total == 0 {
            return Ok(());
        }
        let null = 0u64;
        let func = gpu.float_kernel(kernel)?;
        let mut launch = gpu.stream.launch_builder(&func);
        launch
            .arg(&shape)
            .arg(&param)
            .arg(&x.data)
            .arg(&self.weight);
        epilogue.push_program(&mut launch, op, self.out_channels)?;
        push_or_null(&mut launch, residual.map(|r| &r.data), &null);
        launch.arg(&mut out.data);
        // SAFETY: `float_conv(WindowShape, float pad_value, ...)` and `depthwise_conv(
        // WindowShape, int multiplier, ...)` take the arguments above in this order (`P` is the
        // param's type, as the callers pass it); the weights are the shape's kernel, the maps
        // its input and output (checked above), a null residual is not read.
        unsafe { launch.launch(elementwise(total)) }.w()?;
        Ok(())
    }
}

/// A full-precision convolution on the GPU: weights `[kh][kw][in][out]`, taps in the padding
/// reading `pad_value`.
pub struct GpuFloatConv {
    weights: WindowWeights,
    pad_value: f32,
    in_channels: usize,
}

impl GpuFloatConv {
    /// `weight` (the row-major `(kh * kw * in_channels) x out_channels` matrix), uploaded.
    pub fn new(
        gpu: &Gpu,
        weight: &[f32],
        window: Window,
        pad_value: f32,
        [in_channels, out_channels]: [usize; 2],
    ) -> Result<Self> {
        let [kh, kw] = window.kernel;
        if weight.len() != kh * kw * in_channels * out_channels {
            bail!(
                "convolution: {} weights for a {kh}x{kw}x{in_channels}x{out_channels} kernel",
                weight.len()
            );
        }
        Ok(GpuFloatConv {
            weights: WindowWeights::new(gpu, weight, window, out_channels)?,
            pad_value,
            in_channels,
        })
    }

    /// The convolution of `x`, `epilogue` applied and `residual` added, into `out`.
    pub fn run_into(
        &self,
        gpu: &Gpu,
        x: &GpuFloats,
        epilogue: &GpuEpilogue,
        residual: Option<&GpuFloats>,
        out: &mut GpuFloats,
    ) -> Result<()> {
        if x.channels != self.in_channels {
            bail!(
                "convolution: the input has {} channels, the kernel {}",
                x.channels,
                self.in_channels
            );
        }
        let kernel = ("float_conv", "convolution", self.pad_value);
        self.weights
            .run_into(gpu, kernel, x, epilogue, residual, out)
    }
}

/// A depthwise convolution on the GPU with zero padding: weights `[kh][kw][channels *
/// multiplier]`, output channel `k * multiplier + q` reading input channel `k`.
pub struct GpuDepthwise {
    weights: WindowWeights,
    multiplier: usize,
}

impl GpuDepthwise {
    /// `weight` for `out_channels` output channels, uploaded.
    pub fn new(
        gpu: &Gpu,
        weight: &[f32],
        window: Window,
        multiplier: usize,
        out_channels: usize,
    ) -> Result<Self> {
        let [kh, kw] = window.kernel;
        if multiplier == 0 || weight.len() != kh * kw * out_channels {
            bail!(
                "depthwise convolution: {} weights for a {kh}x{kw}x{out_channels} kernel, \
                 multiplier {multiplier}",
                weight.len()
            );
        }
        Ok(GpuDepthwise {
            weights: WindowWeights::new(gpu, weight, window, out_channels)?,
            multiplier,
        })
    }

    /// The convolution of `x`, `epilogue` applied and `residual` added, into `out`.
    pub fn run_into(
        &self,
        gpu: &Gpu,
        x: &GpuFloats,
        epilogue: &GpuEpilogue,
        residual: Option<&GpuFloats>,
        out: &mut GpuFloats,
    ) -> Result<()> {
        let out_channels = self.weights.out_channels;
        if x.channels * self.multiplier != out_channels {
            bail!(
                "depthwise convolution: {} input channels for {out_channels} outputs at \
                 multiplier {}",
                x.channels,
                self.multiplier
            );
        }
        let kernel = (
            "depthwise_conv",
            "depthwise convolution",
            self.multiplier as i32,
        );
        self.weights
            .run_into(gpu, kernel, x, epilogue, residual, out)
    }
}

/// A fully connected layer on the GPU: weights `[features][units]`.
pub struct GpuDense {
    weight: CudaSlice<f32>,
    features: usize,
    units: usize,
}

impl GpuDense {
    /// `weight` (row-major `features x units`), uploaded.
    pub fn new(gpu: &Gpu, weight: &[f32], features: usize, units: usize) -> Result<Self> {
        if weight.len() != features * units {
            bail!(
                "dense: {} weights for {features} features x {units} units",
                weight.len()
            );
        }
        Ok(GpuDense {
            weight: gpu.upload(weight)?,
            features,
            units,
        })
    }

    /// Output units.
    pub fn units(&self) -> usize {
        self.units
    }

    /// The layer on each image's flattened map `x`, `epilogue` applied, into `out` (`images`
    /// maps of `1 x 1 x units`).
    pub fn run_into(
        &self,
        gpu: &Gpu,
        x: &GpuFloats,
        epilogue: &GpuEpilogue,
        out: &mut GpuFloats,
    ) -> Result<()> {
        check_input("dense", x)?;
        let features = x.height * x.width * x.channels;
        if features != self.features {
            bail!(
                "dense: {features} input features, the weights {}",
                self.features
            );
        }
        check_floats("dense", out, x.images, [1, 1, self.units])?;
        let total = out.len();
        if total == 0 {
            return Ok(());
        }
        let (n, f, u) = (x.images as i64, features as i32, self.units as i32);
        let func = gpu.float_kernel("dense")?;
        let mut launch = gpu.stream.launch_builder(&func);
        launch
            .arg(&n)
            .arg(&f)
            .arg(&u)
            .arg(&x.data)
            .arg(&self.weight);
        epilogue.push_program(&mut launch, "dense", self.units)?;
        launch.arg(&mut out.data);
        // SAFETY: `dense(i64 n, int features, int units, const float* x, const float* weight,
        // int ops, const int* kinds, const int* offsets, const float* params, float* out)`;
        // `x` holds n * features values, `out` n * units (checked above).
        unsafe { launch.launch(elementwise(total)) }.w()?;
        Ok(())
    }
}

impl GpuEpilogue {
    /// The ops on the float maps `x`, then `residual` added, into `out` (of `x`'s shape).
    pub fn transform_into(
        &self,
        gpu: &Gpu,
        x: &GpuFloats,
        residual: Option<&GpuFloats>,
        out: &mut GpuFloats,
    ) -> Result<()> {
        check_input("channel transform", x)?;
        check_floats("channel transform", out, x.images, x.shape())?;
        if let Some(r) = residual {
            check_floats("residual", r, x.images, x.shape())?;
        }
        let total = out.len();
        if total == 0 {
            return Ok(());
        }
        let (null, values, channels) = (0u64, out.len() as u64, x.channels as i32);
        let func = gpu.float_kernel("channel_transform")?;
        let mut launch = gpu.stream.launch_builder(&func);
        launch.arg(&values).arg(&channels).arg(&x.data);
        self.push_program(&mut launch, "channel transform", x.channels)?;
        push_or_null(&mut launch, residual.map(|r| &r.data), &null);
        launch.arg(&mut out.data);
        // SAFETY: `channel_transform(u64 values, int channels, const float* x, int ops, const
        // int* kinds, const int* offsets, const float* params, const float* residual, float*
        // out)`; `x`, `out` and a given residual hold `values` values (checked above).
        unsafe { launch.launch(elementwise(total)) }.w()?;
        Ok(())
    }
}

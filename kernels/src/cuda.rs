//! The CUDA paths of the custom ops (feature `cuda`).
//!
//! The kernels are CUDA C sources (`kernels/cuda/*.cu`), compiled by NVRTC at run time for the
//! compute capability of the GPU at hand, once per process and module, and loaded into each
//! candle device once (candle's cache of custom modules). `kernels/cuda/check.py` compiles the
//! same text with the same options in CI, where there is no GPU.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, ValidAsZeroBits,
};
use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::{Layout, Result, WithDType};

/// One CUDA source file of `kernels/cuda`.
#[derive(Clone, Copy)]
pub(crate) struct Module {
    name: &'static str,
    source: &'static str,
}

/// The elementwise binarizers (`sign`, the straight-through mask, LAB's threshold).
pub(crate) const BINARIZE: Module = Module {
    name: "binarize",
    source: include_str!("../cuda/binarize.cu"),
};
/// LAB, forward and backward.
pub(crate) const LAB: Module = Module {
    name: "lab",
    source: include_str!("../cuda/lab.cu"),
};
/// The binary convolution's packing and XNOR-popcount forward.
pub(crate) const BINARY_CONV: Module = Module {
    name: "binary_conv",
    source: include_str!("../cuda/binary_conv.cu"),
};
/// Depthwise convolution, forward and both gradients.
pub(crate) const DEPTHWISE: Module = Module {
    name: "depthwise",
    source: include_str!("../cuda/depthwise.cu"),
};
/// im2col and its adjoint col2im.
pub(crate) const UNFOLD: Module = Module {
    name: "unfold",
    source: include_str!("../cuda/unfold.cu"),
};
/// Batch normalisation in training mode, forward and backward.
pub(crate) const BATCH_NORM: Module = Module {
    name: "batch_norm",
    source: include_str!("../cuda/batch_norm.cu"),
};
/// The fused Adam update.
pub(crate) const ADAM: Module = Module {
    name: "adam",
    source: include_str!("../cuda/adam.cu"),
};
/// The packed inference kernels: sign and LAB packing, the binary tensor-core convolution and
/// its output transform, max pooling on bits ([`crate::packed::cuda`]).
pub(crate) const PACKED: Module = Module {
    name: "packed",
    source: include_str!("../cuda/packed.cu"),
};
/// The inference engine's full-precision layers ([`crate::packed::cuda::float`]).
pub(crate) const FLOAT_LAYERS: Module = Module {
    name: "float_layers",
    source: include_str!("../cuda/float_layers.cu"),
};
/// Max and average pooling, forward and backward.
pub(crate) const POOL: Module = Module {
    name: "pool",
    source: include_str!("../cuda/pool.cu"),
};

const COMMON: &str = include_str!("../cuda/common.cuh");
const INCLUDE: &str = "#include \"common.cuh\"";
const OPTIONS: &str = include_str!("../cuda/options.txt");

/// The threads of a block (`ZOO_BLOCK` in `common.cuh`).
pub(crate) const BLOCK: u32 = 256;

impl Module {
    /// The text NVRTC compiles: `common.cuh` expanded in place of its `#include`, and a `#line`
    /// directive so that messages give the source's own line numbers.
    fn text(&self) -> String {
        match self.source.find(INCLUDE) {
            Some(at) => {
                let line = self.source[..at].matches('\n').count() + 2;
                let rest = &self.source[at + INCLUDE.len()..];
                let head = &self.source[..at];
                format!("{head}{COMMON}\n#line {line} \"{}.cu\"{rest}", self.name)
            }
            None => self.source.to_string(),
        }
    }

    /// The PTX of this module for compute capability `major.minor`, compiled once per process.
    pub(crate) fn ptx(&self, (major, minor): (i32, i32)) -> Result<Arc<str>> {
        type Cache = Mutex<HashMap<(&'static str, i32, i32), Arc<str>>>;
        static CACHE: OnceLock<Cache> = OnceLock::new();
        let cache = CACHE.get_or_init(Default::default);
        let key = (self.name, major, minor);
        if let Some(ptx) = cache.lock().expect("the PTX cache").get(&key) {
            return Ok(ptx.clone());
        }
        let mut options: Vec<String> = OPTIONS
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty())
            .map(String::from)
            .collect();
        options.push(format!("--gpu-architecture=compute_{major}{minor}"));
        let compile = CompileOptions {
            options,
            name: Some(format!("{}.cu", self.name)),
            ..Default::default()
        };
        let ptx: Arc<str> = compile_ptx_with_opts(self.text(), compile)
            .map_err(|e| {
                candle_core::Error::Cuda(
                    format!(
                        "NVRTC could not compile kernels/cuda/{}.cu for compute_{major}{minor}: {e:?}",
                        self.name
                    )
                    .into(),
                )
            })?
            .to_src()
            .into();
        cache
            .lock()
            .expect("the PTX cache")
            .insert(key, ptx.clone());
        Ok(ptx)
    }

    /// [`Module::ptx`] for the GPU of `dev`.
    pub(crate) fn ptx_for(&self, dev: &CudaDevice) -> Result<Arc<str>> {
        let capability = dev.cuda_stream().context().compute_capability().w()?;
        self.ptx(capability)
    }

    /// The name under which candle caches this module on a device.
    pub(crate) fn cache_name(&self) -> String {
        format!("zoo-{}", self.name)
    }
}

/// Launches `kernel` of `module` on `dev` with `cfg` and the arguments, in order.
///
/// The arguments must match the kernel's parameters in type and order: the caller's `SAFETY`
/// comment says why they do.
macro_rules! launch {
    ($dev:expr, $module:expr, $kernel:expr, $cfg:expr; $($arg:expr),* $(,)?) => {{
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg as _;
        use candle_core::cuda_backend::WrapErr as _;
        let dev: &candle_core::cuda_backend::CudaDevice = $dev;
        let module: $crate::cuda::Module = $module;
        let ptx = module.ptx_for(dev)?;
        let func = dev.get_or_load_custom_func($kernel, &module.cache_name(), &ptx)?;
        let mut builder = func.builder();
        $( builder.arg($arg); )*
        // SAFETY: the caller's arguments match the kernel's signature (see the call site), and
        // every buffer holds the elements the kernel indexes.
        unsafe { builder.launch($cfg) }.w()?;
    }};
}
pub(crate) use launch;

/// `f32` or `f64` on the GPU, with the suffix of its kernels' names.
pub(crate) trait Real:
    WithDType + DeviceRepr + ValidAsZeroBits + candle_core::cuda_backend::CudaDType
{
    /// `f32` or `f64`: kernel `k` of this type is `k_f32` or `k_f64`.
    const SUFFIX: &'static str;

    /// The name of kernel `base` for this type.
    fn kernel(base: &str) -> String {
        format!("{base}_{}", Self::SUFFIX)
    }
}

impl Real for f32 {
    const SUFFIX: &'static str = "f32";
}

impl Real for f64 {
    const SUFFIX: &'static str = "f64";
}

/// Calls `$f::<f32>` or `$f::<f64>` with `$args` after the dtype of `$storage`, or fails
/// naming the op.
macro_rules! by_dtype {
    ($op:expr, $storage:expr, $f:ident($($args:expr),* $(,)?)) => {{
        use candle_core::backend::BackendStorage as _;
        match $storage.dtype() {
            candle_core::DType::F32 => $f::<f32>($($args),*),
            candle_core::DType::F64 => $f::<f64>($($args),*),
            other => candle_core::bail!("{}: expected f32 or f64, found {other:?}", $op),
        }
    }};
}
pub(crate) use by_dtype;

/// The elements of a contiguous tensor, or an error naming the op.
pub(crate) fn view<'a, T: Real>(
    op: &str,
    storage: &'a CudaStorage,
    layout: &Layout,
) -> Result<CudaView<'a, T>> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(storage.as_cuda_slice::<T>()?.slice(start..end)),
        None => candle_core::bail!("{op}: the input must be contiguous"),
    }
}

/// A fresh buffer of `len` zeros on `dev` (never of length 0, which CUDA cannot allocate).
pub(crate) fn zeros<T: DeviceRepr + ValidAsZeroBits>(
    dev: &CudaDevice,
    len: usize,
) -> Result<CudaSlice<T>> {
    dev.alloc_zeros::<T>(len.max(1))
}

/// A one-dimensional launch over `n` elements with grid-stride loops: `BLOCK` threads a
/// block, at most 2^16 blocks.
pub(crate) fn elementwise(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, 1 << 16) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `kernel(x, out, n)` of [`BINARIZE`] over a contiguous tensor: a fresh tensor of its shape.
pub(crate) fn unary(
    op: &str,
    kernel: &'static str,
    storage: &CudaStorage,
    layout: &Layout,
) -> Result<CudaStorage> {
    fn run<T: Real>(
        op: &str,
        kernel: &str,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> Result<CudaStorage> {
        let dev = storage.device();
        let x = view::<T>(op, storage, layout)?;
        let n = layout.shape().elem_count();
        let mut out = zeros::<T>(dev, n)?;
        if n > 0 {
            // SAFETY: `kernel(const T* x, T* out, u64 n)` over `n` elements of each.
            let len = n as u64;
            launch!(dev, BINARIZE, &T::kernel(kernel), elementwise(n); &x, &mut out, &len);
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    by_dtype!(op, storage, run(op, kernel, storage, layout))
}

/// `kernel(x, grad, out, n[, clip])` of [`BINARIZE`] over two contiguous tensors of one shape.
pub(crate) fn binary(
    op: &str,
    kernel: &'static str,
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    clip: Option<f64>,
) -> Result<CudaStorage> {
    fn run<T: Real>(
        op: &str,
        kernel: &str,
        (s1, l1): (&CudaStorage, &Layout),
        (s2, l2): (&CudaStorage, &Layout),
        clip: Option<f64>,
    ) -> Result<CudaStorage> {
        let dev = s1.device();
        let (x, g) = (view::<T>(op, s1, l1)?, view::<T>(op, s2, l2)?);
        let n = l1.shape().elem_count();
        if l2.shape().elem_count() != n {
            candle_core::bail!("{op}: {:?} and {:?} differ", l1.shape(), l2.shape());
        }
        let mut out = zeros::<T>(dev, n)?;
        if n > 0 {
            let (cfg, name, n) = (elementwise(n), T::kernel(kernel), n as u64);
            match clip {
                // SAFETY: `kernel(const T* x, const T* g, T* out, u64 n, double clip)`.
                Some(clip) => launch!(dev, BINARIZE, &name, cfg; &x, &g, &mut out, &n, &clip),
                // SAFETY: `kernel(const T* x, const T* g, T* out, u64 n)`.
                None => launch!(dev, BINARIZE, &name, cfg; &x, &g, &mut out, &n),
            }
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    if s1.dtype() != s2.dtype() {
        candle_core::bail!("{op}: {:?} and {:?} differ", s1.dtype(), s2.dtype());
    }
    by_dtype!(op, s1, run(op, kernel, (s1, l1), (s2, l2), clip))
}

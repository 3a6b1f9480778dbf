//! Where training and evaluation compute: the CPU, or an NVIDIA GPU when the zoo is built with
//! its `cuda` feature (`kernels/cuda/build.sh`).

use candle_core::Device;

use crate::Error;

/// The device named `name`: `cpu`, `cuda` (the first GPU) or `cuda:N`.
///
/// A GPU is a clear error when the zoo was built without the `cuda` feature, or when the
/// driver finds no such GPU.
pub fn parse(name: &str) -> Result<Device, Error> {
    let Some(ordinal) = gpu_ordinal(name)? else {
        return Ok(Device::Cpu);
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(without_cuda(name));
    }
    Device::new_cuda(ordinal).map_err(|e| {
        Error::Train(format!(
            "device `{name}`: no CUDA GPU {ordinal} could be opened ({e})"
        ))
    })
}

/// The GPU a device name names (`cuda` is GPU 0), or `None` for `cpu`; an unknown name is an
/// error saying what is expected.
pub fn gpu_ordinal(name: &str) -> Result<Option<usize>, Error> {
    let bad = || {
        Error::Train(format!(
            "unknown device `{name}`: expected `cpu`, `cuda` or `cuda:N` (N the GPU's index)"
        ))
    };
    match name.trim().to_ascii_lowercase().as_str() {
        "cpu" => Ok(None),
        "cuda" => Ok(Some(0)),
        other => match other.strip_prefix("cuda:") {
            Some(n) => n.parse::<usize>().map(Some).map_err(|_| bad()),
            None => Err(bad()),
        },
    }
}

/// The error for a GPU asked of a zoo built without its `cuda` feature.
pub fn without_cuda(name: &str) -> Error {
    Error::Train(format!(
        "device `{name}`: this zoo was built without its `cuda` feature; build it with \
         `kernels/cuda/build.sh` (see the README's GPU section)"
    ))
}

/// `cpu` or `cuda:N`, as [`parse`] reads it.
pub fn name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Process settings that keep small CPU training steps fast on few cores (measured: about
/// 1.3x the images/s of quicknet-lab on 2 cores); the CLI and the benchmarks call it first
/// thing, before other threads start. Both can be overridden from the environment.
pub fn tune_runtime() {
    // candle's elementwise thread pool spins 25,000 times after every op before sleeping,
    // competing with the rayon threads that run the zoo's kernels.
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0");
    }
    // Keep freed activation buffers in the heap instead of returning them to the OS (and
    // faulting fresh zeroed pages in) at every step.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("GLIBC_TUNABLES").is_none() {
        // SAFETY: mallopt only changes allocator thresholds; called before any threads start.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, i32::MAX);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_bad_ones_say_what_is_expected() {
        assert!(parse("cpu").unwrap().is_cpu());
        assert!(parse(" CPU ").unwrap().is_cpu());
        assert_eq!(name(&Device::Cpu), "cpu");
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", ""] {
            let err = parse(bad).unwrap_err().to_string();
            assert!(
                err.contains("expected `cpu`, `cuda` or `cuda:N`"),
                "{bad}: {err}"
            );
        }
        // Without the feature (the default build), a GPU is refused naming the feature; with
        // it and no GPU, naming the missing GPU.
        let err = parse("cuda:4096").map(|_| ()).unwrap_err().to_string();
        if cfg!(feature = "cuda") {
            assert!(err.contains("no CUDA GPU 4096"), "{err}");
        } else {
            assert!(err.contains("without its `cuda` feature"), "{err}");
        }
    }
}

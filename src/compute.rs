//! Where and how the network runs: one device choice and one precision, shared by `train`, `serve`, `predict` and
//! `demo`. The GPU when the binary is built with `cuda` and one is present, else the CPU; `--device` /
//! `SEMSEG_DEVICE` choose explicitly. The choice is logged once. The ops decide CPU or GPU kernels inside
//! themselves (`model::ops`), so nothing past this point branches on the device.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use anyhow::Context;
use candle_core::Device;

#[cfg(feature = "cuda")]
use crate::cuda_libraries;
use crate::model::precision::{self, MathMode, Precision};

/// `auto`, `cpu`, `cuda` (device 0) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim().to_ascii_lowercase();
        match text.as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            _ => text
                .strip_prefix("cuda:")
                .or_else(|| text.strip_prefix("gpu:"))
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("unknown device {s:?}; expected auto, cpu, cuda or cuda:N")),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// `--device` and `--precision`, for the commands that run the network outside a training job (a training job reads
/// its precision from the `precision` hyperparameter).
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct ComputeArgs {
    /// Where the network runs: auto (the GPU when this build has CUDA and one is present, else the CPU), cpu, cuda
    /// or cuda:N.
    #[arg(long, env = "SEMSEG_DEVICE", default_value = "auto")]
    pub device: DeviceChoice,
    /// Numeric precision: auto (TF32 on GPUs that have it, fp32 elsewhere), fp32 (strict) or bf16 (GPU mixed
    /// precision; bf16 products on CPUs with AVX512-BF16, fp32 on others).
    #[arg(long, env = "SEMSEG_PRECISION", default_value = "auto")]
    pub precision: Precision,
}

/// What the process runs the network for, which decides how a GPU picks its convolution algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Training steps: the same shapes step after step, so cuDNN's algorithms are timed once per shape (as
    /// PyTorch's `cudnn.benchmark = True`).
    Training,
    /// Serving and predicting: each image keeps its own size, so a new shape takes cuDNN's heuristics (PyTorch's
    /// default) instead of timing every algorithm of every layer for that one size.
    Inference,
}

impl Workload {
    /// Whether cuDNN times its algorithms for each new convolution shape: as `SEMSEG_CUDNN_BENCHMARK` (`setting`)
    /// says when it is 1/true/on/yes or 0/false/off/no, else for training only. `Err` names any other setting.
    pub fn times_conv_algorithms(self, setting: Option<&str>) -> Result<bool, String> {
        match setting.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
            None | Some("") => Ok(self == Self::Training),
            Some("1" | "true" | "on" | "yes") => Ok(true),
            Some("0" | "false" | "off" | "no") => Ok(false),
            Some(_) => Err(format!(
                "SEMSEG_CUDNN_BENCHMARK={:?} is neither 1 nor 0; ignored",
                setting.unwrap_or_default()
            )),
        }
    }
}

/// Whether new convolution shapes have cuDNN's algorithms timed in this process (see [`Workload`]); mirrored here so
/// that [`ImageSizedShapes`] can put it back on every build.
static CONV_TIMING: AtomicBool = AtomicBool::new(true);

fn install_conv_timing(timed: bool) {
    CONV_TIMING.store(timed, Ordering::Relaxed);
    #[cfg(feature = "cuda")]
    crate::model::ops::conv_cuda::set_algorithm_timing(timed);
}

/// While alive, new convolution shapes take cuDNN's heuristics, as under [`Workload::Inference`] (unless
/// `SEMSEG_CUDNN_BENCHMARK=1`): for passes inside a training job whose shapes follow the images, such as
/// whole-image validation (`validation_mini_batch_size=1`). The process's choice comes back when it drops. Changes
/// nothing on the CPU.
#[derive(Debug)]
pub struct ImageSizedShapes {
    previous: bool,
}

impl ImageSizedShapes {
    pub fn enter() -> Self {
        let setting = std::env::var("SEMSEG_CUDNN_BENCHMARK").ok();
        let previous = CONV_TIMING.load(Ordering::Relaxed);
        // An unreadable setting was already reported when the device opened.
        install_conv_timing(
            Workload::Inference
                .times_conv_algorithms(setting.as_deref())
                .unwrap_or(false),
        );
        Self { previous }
    }
}

impl Drop for ImageSizedShapes {
    fn drop(&mut self) {
        install_conv_timing(self.previous);
    }
}

/// The device and the numeric mode in force for this process.
#[derive(Debug, Clone)]
pub struct Compute {
    pub device: Device,
    pub precision: Precision,
    pub mode: MathMode,
}

impl Compute {
    /// Opens the device, resolves the precision on it, installs it and the `workload`'s algorithm choice for the
    /// ops, and logs the result once.
    pub fn open(choice: DeviceChoice, precision: Precision, workload: Workload) -> anyhow::Result<Self> {
        let device = open_device(choice)?;
        let (mode, fallback) = precision::resolve(precision, &device);
        if let Some(note) = fallback {
            tracing::warn!("{note}");
        }
        precision::install(mode);
        let setting = std::env::var("SEMSEG_CUDNN_BENCHMARK").ok();
        let timed = workload.times_conv_algorithms(setting.as_deref()).unwrap_or_else(|e| {
            tracing::warn!("{e}");
            workload == Workload::Training
        });
        install_conv_timing(timed);
        tracing::info!(
            device = %describe(&device),
            requested = %choice,
            %precision,
            compute_dtype = ?mode.compute_dtype,
            tf32 = mode.tf32,
            bf16_products = mode.bf16_products,
            bf16_kernel = if mode.bf16_products { crate::model::ops::gemm_bf16::kernel_name() } else { "-" },
            cpu_threads = candle_core::utils::get_num_threads(),
            ?workload,
            cudnn_algorithms = if timed { "timed" } else { "heuristic" },
            "compute device chosen"
        );
        Ok(Self {
            device,
            precision,
            mode,
        })
    }

    /// The strict-fp32 CPU, for tests and tools.
    pub fn cpu() -> Self {
        Self {
            device: Device::Cpu,
            precision: Precision::Fp32,
            mode: MathMode::STRICT_F32,
        }
    }
}

/// Bytes of memory in use on `device`'s GPU (the whole GPU, as nvidia-smi counts it: this process's tensors, the
/// CUDA context, cuDNN workspaces and any other process); `None` on the CPU or when the driver cannot say.
pub fn gpu_memory_used(device: &Device) -> Option<u64> {
    let (free, total) = gpu_memory_info(device)?;
    Some(total.saturating_sub(free))
}

/// Free and total bytes of `device`'s GPU as its driver reports them; `None` on the CPU or when the driver cannot
/// say.
pub fn gpu_memory_info(device: &Device) -> Option<(u64, u64)> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        cuda.cuda_stream().context().bind_to_thread().ok()?;
        let (free, total) = cudarc::driver::result::mem_get_info().ok()?;
        return Some((free as u64, total as u64));
    }
    let _ = device;
    None
}

/// The most bytes this process's GPU tensors held at once since the last call (the memory pool's in-use high-water
/// mark, fragmentation and the CUDA context left out), then starts the next period; `None` on the CPU.
pub fn gpu_tensor_memory_high(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        use cudarc::driver::sys;
        let context = cuda.cuda_stream().context().clone();
        context.bind_to_thread().ok()?;
        let mut pool = std::mem::MaybeUninit::<sys::CUmemoryPool>::uninit();
        let mut high = 0u64;
        let attribute = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
        // SAFETY: the context is bound; `pool` is written before it is read; the attribute is a u64, and setting
        // it to 0 is how the driver resets a high-water mark.
        unsafe {
            sys::cuDeviceGetDefaultMemPool(pool.as_mut_ptr(), context.cu_device())
                .result()
                .ok()?;
            let pool = pool.assume_init();
            sys::cuMemPoolGetAttribute(pool, attribute, &mut high as *mut u64 as *mut std::ffi::c_void)
                .result()
                .ok()?;
            let mut zero = 0u64;
            let _ = sys::cuMemPoolSetAttribute(pool, attribute, &mut zero as *mut u64 as *mut std::ffi::c_void);
        }
        return Some(high);
    }
    let _ = device;
    None
}

/// "cpu" or "cuda:N".
pub fn describe(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Logs why `auto` runs on the CPU once per reason: a process that opens its device more than once (the demo trains,
/// then serves) would otherwise repeat the same warning each time.
#[derive(Debug)]
struct FallbackNotice {
    last: Mutex<Option<String>>,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl FallbackNotice {
    const fn new() -> Self {
        Self { last: Mutex::new(None) }
    }

    /// Whether `reason` is news: it differs from the last one this notice saw, which it then becomes.
    fn is_new(&self, reason: &str) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if last.as_deref() == Some(reason) {
            return false;
        }
        *last = Some(reason.to_string());
        true
    }

    fn warn(&self, reason: String) {
        if self.is_new(&reason) {
            tracing::warn!("{reason}");
        }
    }
}

fn open_device(choice: DeviceChoice) -> anyhow::Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Auto => Ok(first_gpu().unwrap_or(Device::Cpu)),
        DeviceChoice::Cuda(ordinal) => open_cuda(ordinal),
    }
}

#[cfg(feature = "cuda")]
fn first_gpu() -> Option<Device> {
    let missing = cuda_libraries::missing();
    if !missing.is_empty() {
        CPU_FALLBACK.warn(cuda_libraries::cpu_fallback_reason(&missing));
        return None;
    }
    match Device::new_cuda(0) {
        Ok(device) => {
            prepare_gpu(&device);
            Some(device)
        }
        Err(error) => {
            let error = without_backtrace(error);
            CPU_FALLBACK.warn(format!("no usable GPU ({error}); running on the CPU"));
            None
        }
    }
}

/// Why `auto` last fell back to the CPU in this process.
#[cfg(feature = "cuda")]
static CPU_FALLBACK: FallbackNotice = FallbackNotice::new();

/// Candle attaches a backtrace to its errors when `RUST_BACKTRACE` is set, which would spread one log line or
/// failure reason over dozens; only the message is wanted there.
#[cfg(feature = "cuda")]
fn without_backtrace(error: candle_core::Error) -> candle_core::Error {
    match error {
        candle_core::Error::WithBacktrace { inner, .. } => without_backtrace(*inner),
        other => other,
    }
}

#[cfg(not(feature = "cuda"))]
fn first_gpu() -> Option<Device> {
    None
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> anyhow::Result<Device> {
    let missing = cuda_libraries::missing();
    if !missing.is_empty() {
        anyhow::bail!(cuda_libraries::cannot_open(ordinal, &missing));
    }
    let device = Device::new_cuda(ordinal)
        .map_err(without_backtrace)
        .with_context(|| format!("cannot open CUDA device {ordinal} (--device / SEMSEG_DEVICE)"))?;
    prepare_gpu(&device);
    Ok(device)
}

/// What a freshly opened GPU needs before its first tensor: no per-allocation events, pooled memory, the kernels
/// loaded.
#[cfg(feature = "cuda")]
fn prepare_gpu(device: &Device) {
    skip_stream_events(device);
    keep_freed_memory_pooled(device);
    load_kernels_in_parallel(device);
}

/// cudarc gives every allocation two CUDA events, created with it and destroyed with it (four driver calls, on the
/// order of a microsecond each, for each of the thousand-odd tensors of a training step), so that buffers shared
/// between streams can be synchronised. It records and waits on them only once the context has a stream made by
/// `new_stream`: Candle's device runs on the per-thread default stream and semseg makes no other, so the events
/// were created and destroyed unused. Turned off before the first tensor, they are not made at all; no ordering
/// changes.
#[cfg(feature = "cuda")]
fn skip_stream_events(device: &Device) {
    let Device::Cuda(cuda) = device else { return };
    // SAFETY: cudarc's condition is that the caller orders the uses of a buffer across streams itself. Its events
    // never took part in that here (the context never has a `new_stream` stream), so nothing relied on them.
    unsafe { cuda.disable_event_tracking() };
}

/// Candle ships its kernels as PTX, which the driver compiles for the GPU when a module is first loaded (then
/// caches on disk, under ~/.nv or CUDA_CACHE_PATH). Candle loads its modules one at a time, on first use: about 20 s
/// of one core on a fresh machine before the first image. The patched candle-kernels (vendor/candle-kernels) also
/// embeds each module as a fat binary with machine code for the GPUs of the build's `CUDA_SASS_ARCHS`, which loads
/// without compiling; on any other GPU the driver still JIT-compiles the PTX inside it. Loading every module here,
/// one thread each, through the patched candle-core's `load_kernel_module` (which keeps each module for the kernels'
/// first calls) does any such compilation in parallel, semseg's own NVRTC kernels included.
#[cfg(feature = "cuda")]
fn load_kernels_in_parallel(device: &Device) {
    use candle_core::cuda_backend::kernels;
    let Device::Cuda(cuda) = device else { return };
    let started = std::time::Instant::now();
    // Every module the networks, the loss and the optimiser use (QUANTIZED, the largest, is for GGUF models only).
    let modules = [
        ("affine", &kernels::AFFINE),
        ("binary", &kernels::BINARY),
        ("cast", &kernels::CAST),
        ("conv", &kernels::CONV),
        ("fill", &kernels::FILL),
        ("indexing", &kernels::INDEXING),
        ("reduce", &kernels::REDUCE),
        ("sort", &kernels::SORT),
        ("ternary", &kernels::TERNARY),
        ("unary", &kernels::UNARY),
    ];
    let failures: Vec<String> = std::thread::scope(|scope| {
        let mut jobs: Vec<_> = modules
            .iter()
            .map(|&(name, module)| {
                scope.spawn(move || {
                    cuda.load_kernel_module(module)
                        .map(drop)
                        .map_err(|e| format!("{name}: {e}"))
                })
            })
            .collect();
        jobs.push(
            scope.spawn(|| crate::model::ops::batch_norm_cuda::preload(cuda).map_err(|e| format!("batch norm: {e}"))),
        );
        jobs.push(
            scope.spawn(|| crate::model::ops::elementwise_cuda::preload(cuda).map_err(|e| format!("elementwise: {e}"))),
        );
        jobs.into_iter()
            .filter_map(|job| {
                job.join()
                    .unwrap_or_else(|_| Err("a loader thread panicked".into()))
                    .err()
            })
            .collect()
    });
    if failures.is_empty() {
        tracing::info!(seconds = started.elapsed().as_secs_f64(), "GPU kernels loaded");
    } else {
        // Candle loads (and reports) any module it then needs; this pass only saves time.
        tracing::warn!(?failures, "some GPU kernels did not preload");
    }
}

/// Candle allocates from the device's stream-ordered memory pool, whose release threshold is 0 by default: every
/// synchronisation (one per training step at least) hands the freed memory back to the driver, and the next step
/// maps it again, allocation by allocation. A threshold of "never" keeps it pooled for reuse, as PyTorch's caching
/// allocator does; the pool then holds the peak of what was in use. A failure only costs speed, so it is logged.
#[cfg(feature = "cuda")]
fn keep_freed_memory_pooled(device: &Device) {
    use cudarc::driver::sys;
    let Device::Cuda(cuda) = device else { return };
    let result = (|| -> Result<(), cudarc::driver::DriverError> {
        let context = cuda.cuda_stream().context().clone();
        context.bind_to_thread()?;
        let mut pool = std::mem::MaybeUninit::<sys::CUmemoryPool>::uninit();
        let mut threshold = u64::MAX;
        // SAFETY: the context is bound; `pool` is written by the driver before it is read; the attribute takes a
        // u64 (cuuint64_t), which `threshold` is.
        unsafe {
            sys::cuDeviceGetDefaultMemPool(pool.as_mut_ptr(), context.cu_device()).result()?;
            sys::cuMemPoolSetAttribute(
                pool.assume_init(),
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut threshold as *mut u64 as *mut std::ffi::c_void,
            )
            .result()?;
        }
        Ok(())
    })();
    if let Err(error) = result {
        tracing::warn!(%error, "could not keep freed GPU memory pooled; allocations may be slower");
    }
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(ordinal: usize) -> anyhow::Result<Device> {
    Err(anyhow::anyhow!(
        "device cuda:{ordinal} was asked for, but this binary was built without CUDA support; use --device cpu (or \
         SEMSEG_DEVICE=cpu), or the CUDA build (Dockerfile.train, scripts/build-cuda.sh)"
    ))
    .context("cannot open the GPU")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cpu_fallback_reason_is_logged_once_until_it_changes() {
        let notice = FallbackNotice::new();
        assert!(notice.is_new("no NVIDIA driver here"));
        assert!(!notice.is_new("no NVIDIA driver here"));
        assert!(notice.is_new("no usable GPU"));
        assert!(notice.is_new("no NVIDIA driver here"));
    }

    #[test]
    fn parses_device_names() {
        assert_eq!("auto".parse(), Ok(DeviceChoice::Auto));
        assert_eq!("CPU".parse(), Ok(DeviceChoice::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceChoice::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceChoice::Cuda(3)));
        assert_eq!("gpu:1".parse(), Ok(DeviceChoice::Cuda(1)));
        for bad in ["cuda:", "cuda:x", "tpu", ""] {
            let err = bad.parse::<DeviceChoice>().unwrap_err();
            assert!(err.contains("auto, cpu, cuda or cuda:N"), "{bad}: {err}");
        }
        assert_eq!(DeviceChoice::Cuda(2).to_string(), "cuda:2");
    }

    #[test]
    fn cpu_and_auto_open_the_cpu_without_a_gpu() -> anyhow::Result<()> {
        let _lock = conv_timing_lock();
        let compute = Compute::open(DeviceChoice::Cpu, Precision::Auto, Workload::Inference)?;
        assert!(compute.device.is_cpu());
        assert_eq!(compute.mode, MathMode::STRICT_F32);
        if !candle_core::utils::cuda_is_available() {
            assert!(Compute::open(DeviceChoice::Auto, Precision::Fp32, Workload::Training)?
                .device
                .is_cpu());
        }
        Ok(())
    }

    #[test]
    fn training_times_conv_algorithms_and_inference_takes_heuristics_unless_the_setting_says() {
        assert_eq!(Workload::Training.times_conv_algorithms(None), Ok(true));
        assert_eq!(Workload::Inference.times_conv_algorithms(None), Ok(false));
        assert_eq!(Workload::Inference.times_conv_algorithms(Some(" ")), Ok(false));
        for on in ["1", "true", "ON", " yes "] {
            assert_eq!(Workload::Inference.times_conv_algorithms(Some(on)), Ok(true), "{on}");
        }
        for off in ["0", "False", "off", "no"] {
            assert_eq!(Workload::Training.times_conv_algorithms(Some(off)), Ok(false), "{off}");
        }
        let err = Workload::Training.times_conv_algorithms(Some("fast")).unwrap_err();
        assert!(err.contains("SEMSEG_CUDNN_BENCHMARK") && err.contains("fast"), "{err}");
    }

    /// Held by the tests that install a convolution-algorithm choice (opening a device does), which is
    /// process-wide.
    static CONV_TIMING_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn conv_timing_lock() -> std::sync::MutexGuard<'static, ()> {
        CONV_TIMING_TESTS
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    #[test]
    fn image_sized_shapes_take_the_heuristics_until_dropped() {
        if std::env::var_os("SEMSEG_CUDNN_BENCHMARK").is_some() {
            return; // the setting overrides both choices
        }
        let _lock = conv_timing_lock();
        let found = CONV_TIMING.load(Ordering::Relaxed);
        install_conv_timing(true);
        {
            let _shapes = ImageSizedShapes::enter();
            assert!(!CONV_TIMING.load(Ordering::Relaxed));
        }
        assert!(CONV_TIMING.load(Ordering::Relaxed));
        install_conv_timing(found);
    }

    #[test]
    fn the_cpu_reports_no_gpu_memory() {
        assert_eq!(gpu_memory_used(&Device::Cpu), None);
    }

    /// A CUDA build where NVIDIA's driver is not installed (the build machines, CI, a CPU instance, a container
    /// run without `--gpus`): auto runs on the CPU, an explicit GPU fails naming the driver's library, neither panics.
    #[cfg(feature = "cuda")]
    #[test]
    fn a_cuda_build_without_the_driver_runs_on_the_cpu_or_names_the_library() -> anyhow::Result<()> {
        if !crate::cuda_libraries::missing().contains(&crate::cuda_libraries::DRIVER) {
            eprintln!("skipped: an NVIDIA driver is installed here");
            return Ok(());
        }
        let _lock = conv_timing_lock();
        assert!(Compute::open(DeviceChoice::Auto, Precision::Auto, Workload::Training)?
            .device
            .is_cpu());
        let err = format!(
            "{:#}",
            Compute::open(DeviceChoice::Cuda(0), Precision::Auto, Workload::Inference).unwrap_err()
        );
        assert!(
            err.contains("cannot open CUDA device 0") && err.contains("libcuda.so.1") && err.contains("--device cpu"),
            "{err}"
        );
        Ok(())
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn asking_for_cuda_in_a_cpu_build_says_so() {
        let _lock = conv_timing_lock();
        let err = format!(
            "{:#}",
            Compute::open(DeviceChoice::Cuda(0), Precision::Auto, Workload::Inference).unwrap_err()
        );
        assert!(
            err.contains("built without CUDA") && err.contains("--device cpu"),
            "{err}"
        );
    }
}

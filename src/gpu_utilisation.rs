//! How busy the GPU was over an epoch, as `nvidia-smi` reports it: the share of time one or more kernels were
//! running. A low figure says the GPU waits (for the loader, the host, a synchronisation), not that the kernels are
//! slow.
//!
//! A thread reads NVML's utilisation rate (`libnvidia-ml.so.1`, which the NVIDIA driver installs and the container
//! toolkit mounts into containers) every [`PERIOD`] while the epoch trains, and the epoch's figure is the mean. NVML
//! is loaded at run time, so a binary built with `cuda` still starts where it is missing; then nothing is sampled
//! and the job says why once. On the CPU there is nothing to sample.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::Device;

/// How often the sampler reads the rate; NVML's own sample period is 1/6 s to 1 s, depending on the GPU.
pub const PERIOD: Duration = Duration::from_millis(200);

/// The mean utilisation over a period.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Utilisation {
    /// Mean of the samples, in percent (0 to 100).
    pub mean_percent: f64,
    pub samples: usize,
}

/// Samples a GPU's utilisation on a thread until [`Self::finish`].
pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Option<Utilisation>>,
}

impl Sampler {
    /// Starts sampling `device`'s utilisation; `Err` with the reason where it cannot be read (the CPU, no NVML).
    pub fn start(device: &Device) -> Result<Self, String> {
        let read = reader(device)?;
        Self::with_reader(read, PERIOD)
    }

    /// Starts a thread that calls `read` every `period` (the first time one period after starting, so every sample
    /// covers the sampled span) and averages what it returns.
    pub fn with_reader(
        mut read: impl FnMut() -> Option<u32> + Send + 'static,
        period: Duration,
    ) -> Result<Self, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("gpu-utilisation".into())
            .spawn(move || {
                let (mut sum, mut samples) = (0u64, 0usize);
                let mut next = Instant::now() + period;
                while !stopped.load(Ordering::Acquire) {
                    // Parking may end early (an unpark, or spuriously): sample only once the period is over.
                    let now = Instant::now();
                    if now < next {
                        std::thread::park_timeout(next - now);
                        continue;
                    }
                    next = now + period;
                    if let Some(percent) = read() {
                        sum += u64::from(percent.min(100));
                        samples += 1;
                    }
                }
                (samples > 0).then(|| Utilisation {
                    mean_percent: sum as f64 / samples as f64,
                    samples,
                })
            })
            .map_err(|e| format!("cannot start the sampling thread: {e}"))?;
        Ok(Self { stop, thread })
    }

    /// Stops sampling; the mean since [`Self::start`], or `None` when no sample was taken (a span shorter than one
    /// period).
    pub fn finish(self) -> Option<Utilisation> {
        self.stop.store(true, Ordering::Release);
        self.thread.thread().unpark();
        self.thread.join().ok().flatten()
    }
}

/// A function returning `device`'s current utilisation in percent.
fn reader(device: &Device) -> Result<Box<dyn FnMut() -> Option<u32> + Send>, String> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        let bus_id = nvml::pci_bus_id(cuda)?;
        let gpu = nvml::Gpu::open(&bus_id)?;
        return Ok(Box::new(move || gpu.utilisation_percent()));
    }
    let _ = device;
    Err("the device is not a GPU".into())
}

#[cfg(feature = "cuda")]
mod nvml {
    //! The four NVML calls the sampler needs, bound at run time (nvml.h's C API).

    use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
    use std::sync::OnceLock;

    use candle_core::CudaDevice;
    use libloading::Library;

    /// `nvmlReturn_t`; 0 is `NVML_SUCCESS`.
    type Status = c_int;
    /// `nvmlDevice_t`, an opaque handle.
    type Handle = *mut c_void;

    /// `nvmlUtilization_t`.
    #[repr(C)]
    #[derive(Default)]
    struct Utilization {
        gpu: c_uint,
        memory: c_uint,
    }

    struct Api {
        // Keeps the functions below loaded.
        _library: Library,
        handle_by_pci_bus_id: unsafe extern "C" fn(*const c_char, *mut Handle) -> Status,
        utilization_rates: unsafe extern "C" fn(Handle, *mut Utilization) -> Status,
    }

    /// NVML, loaded and initialised once per process (never shut down: the process ends first).
    fn api() -> Result<&'static Api, String> {
        static API: OnceLock<Result<Api, String>> = OnceLock::new();
        API.get_or_init(load).as_ref().map_err(Clone::clone)
    }

    fn load() -> Result<Api, String> {
        // SAFETY: loading the driver's NVML library runs no initialisation beyond the dynamic linker's; the
        // symbols are given their nvml.h signatures, and nvmlInit_v2 is called before any other.
        unsafe {
            let library = Library::new("libnvidia-ml.so.1")
                .map_err(|e| format!("NVML (libnvidia-ml.so.1, from the NVIDIA driver) cannot be loaded: {e}"))?;
            let init = *library
                .get::<unsafe extern "C" fn() -> Status>(b"nvmlInit_v2\0")
                .map_err(|e| format!("NVML has no nvmlInit_v2: {e}"))?;
            let handle_by_pci_bus_id = *library
                .get::<unsafe extern "C" fn(*const c_char, *mut Handle) -> Status>(
                    b"nvmlDeviceGetHandleByPciBusId_v2\0",
                )
                .map_err(|e| format!("NVML has no nvmlDeviceGetHandleByPciBusId_v2: {e}"))?;
            let utilization_rates = *library
                .get::<unsafe extern "C" fn(Handle, *mut Utilization) -> Status>(b"nvmlDeviceGetUtilizationRates\0")
                .map_err(|e| format!("NVML has no nvmlDeviceGetUtilizationRates: {e}"))?;
            match init() {
                0 => Ok(Api {
                    _library: library,
                    handle_by_pci_bus_id,
                    utilization_rates,
                }),
                status => Err(format!("nvmlInit_v2 failed with NVML status {status}")),
            }
        }
    }

    /// The PCI bus id ("0000:3b:00.0") of the GPU behind `cuda`: how NVML finds the same GPU whatever the CUDA
    /// device order.
    pub fn pci_bus_id(cuda: &CudaDevice) -> Result<CString, String> {
        use cudarc::driver::sys;
        let context = cuda.cuda_stream().context().clone();
        context
            .bind_to_thread()
            .map_err(|e| format!("cannot bind the CUDA context: {e}"))?;
        let mut buffer = [0 as c_char; 64];
        // SAFETY: the buffer's length is passed; the driver writes a NUL-terminated string into it.
        unsafe {
            sys::cuDeviceGetPCIBusId(buffer.as_mut_ptr(), buffer.len() as c_int, context.cu_device())
                .result()
                .map_err(|e| format!("cannot read the GPU's PCI bus id: {e}"))?;
            Ok(CStr::from_ptr(buffer.as_ptr()).to_owned())
        }
    }

    /// One GPU's NVML handle.
    pub struct Gpu {
        api: &'static Api,
        handle: Handle,
    }

    // SAFETY: NVML's functions are thread-safe, and a device handle stays valid until nvmlShutdown, which is never
    // called.
    unsafe impl Send for Gpu {}

    impl Gpu {
        pub fn open(pci_bus_id: &CStr) -> Result<Self, String> {
            let api = api()?;
            let mut handle: Handle = std::ptr::null_mut();
            // SAFETY: a NUL-terminated id and a place for the handle, as nvml.h asks.
            match unsafe { (api.handle_by_pci_bus_id)(pci_bus_id.as_ptr(), &mut handle) } {
                0 => Ok(Self { api, handle }),
                status => Err(format!(
                    "NVML does not find the GPU at PCI bus id {} (NVML status {status})",
                    pci_bus_id.to_string_lossy()
                )),
            }
        }

        /// The share of the last sample period (1/6 s to 1 s) in which a kernel ran, in percent.
        pub fn utilisation_percent(&self) -> Option<u32> {
            let mut rates = Utilization::default();
            // SAFETY: a valid handle and a place for the rates.
            let status = unsafe { (self.api.utilization_rates)(self.handle, &mut rates) };
            (status == 0).then_some(rates.gpu)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn the_sampler_averages_what_it_reads_until_finished() {
        let calls = Arc::new(AtomicU32::new(0));
        let counted = Arc::clone(&calls);
        // Reads 0, 50, 100, 0, 50, 100... and a missing reading every fourth call, which is skipped.
        let sampler = Sampler::with_reader(
            move || {
                let n = counted.fetch_add(1, Ordering::SeqCst);
                (n % 4 != 3).then_some((n % 4) * 50)
            },
            Duration::from_millis(5),
        )
        .expect("start");
        while calls.load(Ordering::SeqCst) < 8 {
            std::thread::sleep(Duration::from_millis(5));
        }
        let utilisation = sampler.finish().expect("samples were taken");
        // The thread has ended: every call is counted.
        let readings: Vec<u32> = (0..calls.load(Ordering::SeqCst))
            .filter(|n| n % 4 != 3)
            .map(|n| (n % 4) * 50)
            .collect();
        assert_eq!(utilisation.samples, readings.len(), "{utilisation:?}");
        let mean = readings.iter().sum::<u32>() as f64 / readings.len() as f64;
        assert!(
            (utilisation.mean_percent - mean).abs() < 1e-9,
            "{utilisation:?} vs {mean}"
        );
    }

    #[test]
    fn a_span_shorter_than_one_period_has_no_figure() {
        let sampler = Sampler::with_reader(|| Some(100), Duration::from_secs(60)).expect("start");
        assert_eq!(sampler.finish(), None, "finish wakes the thread and takes no sample");
    }

    #[test]
    fn the_cpu_has_no_utilisation_to_sample() {
        let error = Sampler::start(&Device::Cpu).err().expect("no sampler on the CPU");
        assert!(error.contains("not a GPU"), "{error}");
    }

    #[test]
    fn readings_above_100_count_as_100() {
        let sampler = Sampler::with_reader(|| Some(250), Duration::from_millis(2)).expect("start");
        std::thread::sleep(Duration::from_millis(30));
        let utilisation = sampler.finish().expect("samples");
        assert_eq!(utilisation.mean_percent, 100.0);
    }
}

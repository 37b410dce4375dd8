//! The shared libraries a CUDA build needs to use a GPU, looked for before its first CUDA call.
//!
//! A CUDA build opens NVIDIA's libraries when it first uses the GPU (cudarc's dynamic loading), not when the process
//! starts, so the same binary runs where they are absent: a CPU instance, a laptop, or `docker run` without
//! `--gpus`, where the driver's `libcuda.so.1` is not mounted into the container. (Linked at build time, as Candle
//! links them, the binary would not start there at all: the dynamic linker stops it before `main`, with no log line
//! and no `output/failure`.) cudarc panics on the first call into a library it cannot load, so [`missing`] asks
//! first: `--device auto` then runs on the CPU and says why, `--device cuda` fails naming the library.

/// One library the GPU path loads: the file name users will look for, and where it comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuLibrary {
    pub file: &'static str,
    pub provider: &'static str,
}

/// The NVIDIA driver's library: without it there is no GPU to use, whatever else is installed.
pub const DRIVER: GpuLibrary = GpuLibrary {
    file: "libcuda.so.1",
    provider: "the NVIDIA driver, which a container gets from the NVIDIA Container Toolkit: docker run --gpus all",
};

/// The libraries of the CUDA toolkit and cuDNN that Candle's and semseg's GPU ops call (the runtime images of
/// nvidia/cuda's `-cudnn-` variants ship them all).
pub const TOOLKIT: [GpuLibrary; 5] = [
    GpuLibrary {
        file: "libcublas.so",
        provider: "the CUDA toolkit",
    },
    GpuLibrary {
        file: "libcublasLt.so",
        provider: "the CUDA toolkit",
    },
    GpuLibrary {
        file: "libcurand.so",
        provider: "the CUDA toolkit",
    },
    GpuLibrary {
        file: "libnvrtc.so",
        provider: "the CUDA toolkit",
    },
    GpuLibrary {
        file: "libcudnn.so.9",
        provider: "cuDNN 9",
    },
];

/// The libraries of [`DRIVER`] and [`TOOLKIT`] that cannot be loaded here, in that order.
#[cfg(feature = "cuda")]
pub fn missing() -> Vec<GpuLibrary> {
    // cudarc's own probes try the same file names its loaders will (libcublas.so.13, libcublas.so.12, ...).
    let present: [unsafe fn() -> bool; 6] = [
        cudarc::driver::sys::is_culib_present,
        cudarc::cublas::sys::is_culib_present,
        cudarc::cublaslt::sys::is_culib_present,
        cudarc::curand::sys::is_culib_present,
        cudarc::nvrtc::sys::is_culib_present,
        cudarc::cudnn::sys::is_culib_present,
    ];
    std::iter::once(DRIVER)
        .chain(TOOLKIT)
        .zip(present)
        // SAFETY: each probe only opens (and closes) a shared library by name; none calls into it.
        .filter(|(_, present)| !unsafe { present() })
        .map(|(library, _)| library)
        .collect()
}

/// The missing libraries in words: "libcuda.so.1 (from the NVIDIA driver; ...), libcudnn.so.9 (from cuDNN 9)".
pub fn describe(missing: &[GpuLibrary]) -> String {
    missing
        .iter()
        .map(|library| format!("{} (from {})", library.file, library.provider))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why `--device auto` runs on the CPU, for the warning: no driver means no GPU here; a driver without the toolkit's
/// libraries means a GPU this installation cannot use.
pub fn cpu_fallback_reason(missing: &[GpuLibrary]) -> String {
    if missing.contains(&DRIVER) {
        format!(
            "no NVIDIA driver here, so no GPU can be used: cannot load {}; running on the CPU",
            describe(&[DRIVER])
        )
    } else {
        format!(
            "the NVIDIA driver is here but these GPU libraries cannot be loaded: {}; add their folder to \
             LD_LIBRARY_PATH to use the GPU; running on the CPU",
            describe(missing)
        )
    }
}

/// The error for an explicit `--device cuda:N` that cannot be served.
pub fn cannot_open(ordinal: usize, missing: &[GpuLibrary]) -> String {
    format!(
        "cannot open CUDA device {ordinal} (--device / SEMSEG_DEVICE): cannot load {}; install or mount {}, or use \
         --device cpu",
        describe(missing),
        if missing.len() == 1 {
            "it (its folder on LD_LIBRARY_PATH)"
        } else {
            "them (their folders on LD_LIBRARY_PATH)"
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_the_driver_the_cpu_is_chosen_and_the_driver_is_named() {
        let reason = cpu_fallback_reason(&[DRIVER, TOOLKIT[4]]);
        assert!(reason.contains("no NVIDIA driver"), "{reason}");
        assert!(
            reason.contains("libcuda.so.1") && reason.contains("--gpus all"),
            "{reason}"
        );
        assert!(reason.ends_with("running on the CPU"), "{reason}");
    }

    #[test]
    fn with_the_driver_the_missing_toolkit_libraries_are_named() {
        let reason = cpu_fallback_reason(&[TOOLKIT[0], TOOLKIT[4]]);
        assert!(reason.contains("driver is here"), "{reason}");
        assert!(
            reason.contains("libcublas.so (from the CUDA toolkit), libcudnn.so.9 (from cuDNN 9)"),
            "{reason}"
        );
        assert!(reason.contains("LD_LIBRARY_PATH"), "{reason}");
        assert!(!reason.contains("libcuda.so.1"), "{reason}");
    }

    #[test]
    fn an_explicit_gpu_fails_naming_the_device_the_library_and_the_way_out() {
        let error = cannot_open(1, &[DRIVER]);
        assert!(
            error.contains("CUDA device 1") && error.contains("libcuda.so.1"),
            "{error}"
        );
        assert!(error.contains("--device cpu"), "{error}");
    }

    /// In a CUDA build run where no NVIDIA driver is installed (this project's build and CI machines), the probe
    /// finds the driver missing without panicking, which is what lets `--device auto` fall back.
    #[cfg(feature = "cuda")]
    #[test]
    fn the_probe_agrees_with_the_dynamic_linker_about_the_driver() {
        // SAFETY: opening the library by name runs only its initialisers, as the probe does.
        let loadable = unsafe { libloading::Library::new(DRIVER.file) }.is_ok();
        assert_eq!(missing().contains(&DRIVER), !loadable);
    }
}

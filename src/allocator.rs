//! Keep freed memory in the process for reuse (glibc only).
//!
//! Candle gives every operation's output a fresh buffer. glibc's malloc serves big requests with their own `mmap`
//! and unmaps them on `free`, and trims the heap top back to the kernel, so each training step page-faults its whole
//! working set in again. Raising the mmap threshold to glibc's ceiling (32 MiB) and never trimming lets those buffers
//! be reused. Measured 2026-11-26 on a 2-core VM: DeepLabV3-ResNet-50 training steps (batch 2, crop 256, 5 steps,
//! examples/bench_train) 0.314–0.368 → 0.385–0.391 images/s, minor page faults 6.8 M → 1.7–1.9 M; the CI training
//! recipe (ResNet-18 FCN, crop 64) 4.0–4.2 → 3.4–3.7 s per epoch, faults 3.5 M → 0.28 M per 6 epochs. The
//! price: the process keeps its peak heap instead of returning it, which a training job or a server reaches every
//! step or request anyway. Buffers above that ceiling (a batch-16 activation at crop 240 is 60 MB) are kept off
//! `mmap` altogether (`M_MMAP_MAX = 0`): measured 2026-11-28 (2-core AMD EPYC), DeepLabV3-ResNet-50 at batch 16,
//! crop 240: 0.951 → 1.084 images/s, peak RSS 8.36 → 8.57 GB; batch 2 and inference unchanged within noise (one
//! 512² inference: 543 MB peak either way). Settings from `MALLOC_*` environment variables win (they are read first by glibc, and
//! this only applies where none is set).

/// Apply the settings above; call once, first thing in `main`, before threads start.
pub fn keep_freed_memory_for_reuse() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let user_tuned = std::env::vars_os().any(|(k, _)| k.to_string_lossy().starts_with("MALLOC_"));
        if user_tuned {
            return;
        }
        const MMAP_THRESHOLD: libc::c_int = 32 << 20; // glibc's maximum on 64-bit
        const TOP_PAD: libc::c_int = 64 << 20;
        // SAFETY: mallopt only changes allocator parameters; it is called before other threads exist.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
            libc::mallopt(libc::M_TOP_PAD, TOP_PAD);
            // Buffers above the 32 MiB ceiling (a batch-16 activation is 60 MB) come from the heap too, so they
            // are reused rather than mapped, faulted in and zeroed by the kernel at every step.
            libc::mallopt(libc::M_MMAP_MAX, 0);
        }
    }
}

//! An opt-in record of every convolution's time, for the per-layer profiles (`examples/bench_infer --profile`,
//! `examples/bench_train --profile`, which also times each convolution's two gradients).
//!
//! Off by default: one relaxed atomic load per convolution. When on, each convolution appends its shape, the
//! multiply-accumulates it was asked for and its wall time; the bench prints them beside the whole forward's time,
//! so the time outside convolutions shows too.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ENABLED: AtomicBool = AtomicBool::new(false);
static RECORDS: Mutex<Vec<ConvRecord>> = Mutex::new(Vec::new());

/// One convolution call.
#[derive(Clone, Debug)]
pub struct ConvRecord {
    /// `forward`, `weight-grad` or `input-grad`.
    pub phase: &'static str,
    /// `[B, Cin, H, W]`.
    pub input: [usize; 4],
    /// `[Cout, Cin, k, k]`.
    pub weight: [usize; 4],
    pub stride: usize,
    pub dilation: usize,
    /// `[B, Cout, oh, ow]`.
    pub output: [usize; 4],
    /// Multiply-accumulates of the dense convolution (padded taps included), as FLOP counters count them.
    pub macs: u64,
    pub elapsed: Duration,
}

impl ConvRecord {
    pub fn gflops(&self) -> f64 {
        2.0 * self.macs as f64 / self.elapsed.as_secs_f64() / 1e9
    }
}

/// Starts recording afresh (clearing earlier records), or stops, keeping the records for [`take`].
pub fn enable(on: bool) {
    if on {
        RECORDS.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
    ENABLED.store(on, Ordering::Relaxed);
}

/// Takes the records made since the last call.
pub fn take() -> Vec<ConvRecord> {
    std::mem::take(&mut *RECORDS.lock().unwrap_or_else(|e| e.into_inner()))
}

/// Runs `f`, recording it as a convolution (or one of its gradients) when profiling is on.
pub(crate) fn conv<T>(
    phase: &'static str,
    input: [usize; 4],
    weight: [usize; 4],
    (stride, dilation): (usize, usize),
    f: impl FnOnce() -> candle_core::Result<T>,
    output_dims: impl Fn(&T) -> [usize; 4],
) -> candle_core::Result<T> {
    if !ENABLED.load(Ordering::Relaxed) {
        return f();
    }
    let start = Instant::now();
    let out = f()?;
    let elapsed = start.elapsed();
    let output = output_dims(&out);
    let macs = (output.iter().product::<usize>() * weight[1] * weight[2] * weight[3]) as u64;
    RECORDS.lock().unwrap_or_else(|e| e.into_inner()).push(ConvRecord {
        phase,
        input,
        weight,
        stride,
        dilation,
        output,
        macs,
        elapsed,
    });
    Ok(out)
}

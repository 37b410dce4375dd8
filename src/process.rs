//! Process-wide settings that the binary (and the benchmarks that stand for it) apply first thing in `main`,
//! before any thread starts: how freed memory is kept ([`crate::allocator`]) and how Candle's own thread pool
//! waits for work.

/// Spin rounds a Candle pool thread waits for the next op before it sleeps (Candle's default: 25,000).
const CANDLE_SPIN_LIMIT: &str = "1000";

/// Applies both settings; each leaves alone what the user set in the environment (`MALLOC_*`,
/// `CANDLE_BARRIER_POOL_SPIN_LIMIT`).
pub fn tune() {
    crate::allocator::keep_freed_memory_for_reuse();
    keep_candle_pool_from_spinning();
}

/// Candle 0.11 runs its large elementwise ops (backprop's gradient sums, the optimizer's and loss's tensor
/// arithmetic) on a pool of its own, one thread fewer than the cores, beside rayon's threads that run the
/// convolutions. After each op those threads spin 25,000 rounds (about a millisecond) before sleeping: a training
/// step runs hundreds of such ops, and on 2 cores each spin takes a core from the next convolution. With 1,000
/// rounds (tens of microseconds), measured 2026-12-05 on 2 AMD Zen 4 cores (`examples/bench_train`,
/// DeepLabV3-ResNet-50, batch 2, crop 256, alternating): 0.713 / 0.672 → 0.834 / 0.812 images/s; inference
/// unchanged within noise. 50 rounds, or no pool at all (`CANDLE_NUM_THREADS=1`), measured the same.
fn keep_candle_pool_from_spinning() {
    const VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(VAR).is_none() {
        // Read by Candle once, when its pool starts (the first large elementwise op): set before any thread
        // exists, so no other thread reads the environment meanwhile.
        std::env::set_var(VAR, CANDLE_SPIN_LIMIT);
    }
}

//! The machine's practical f32 matrix-product peak: the best of several 3072³ products through the gemm crate (the
//! kernels Candle and semseg's convolutions use), on `RAYON_NUM_THREADS` threads, and the same product in bf16
//! (`precision=bf16`'s kernel) where the CPU has AVX512-BF16. The bench scripts print it beside
//! the networks' GFLOP/s. Prints one JSON line.

use std::time::Instant;

fn main() {
    let n = 3072usize;
    let a: Vec<f32> = (0..n * n).map(|i| (i % 13) as f32 * 0.01).collect();
    let b: Vec<f32> = (0..n * n).map(|i| (i % 7) as f32 * 0.01).collect();
    let mut c = vec![0f32; n * n];
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        // SAFETY: all three are n×n row-major matrices.
        unsafe {
            gemm::gemm(
                n,
                n,
                n,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                n as isize,
                b.as_ptr(),
                1,
                n as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            )
        };
        best = best.min(t.elapsed().as_secs_f64());
    }
    let gflops = 2.0 * (n * n * n) as f64 / best / 1e9;
    // The same product with bf16 inputs (precision=bf16's kernel), where the CPU has AVX512-BF16.
    let bf16 = if semseg::model::ops::gemm_bf16::available() {
        let mut best = f64::INFINITY;
        for _ in 0..5 {
            let t = Instant::now();
            semseg::model::ops::gemm_bf16::matmul_bf16(n, n, n, &a, &b, &mut c);
            best = best.min(t.elapsed().as_secs_f64());
        }
        format!("{:.1}", 2.0 * (n * n * n) as f64 / best / 1e9)
    } else {
        "null".to_string()
    };
    println!(
        "{{\"matmul\": [{n}, {n}, {n}], \"threads\": {threads}, \"best_ms\": {:.1}, \"gflops\": {gflops:.1}, \
         \"bf16_gflops\": {bf16}}}",
        best * 1e3
    );
}

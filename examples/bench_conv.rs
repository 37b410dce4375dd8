//! One CPU convolution, timed: the kernel `conv2d_image` runs for that geometry (Winograd, tap-wise, blocked or a
//! plain product), with bias and ReLU, on `RAYON_NUM_THREADS` threads. For reading one layer's cost in isolation
//! (under `perf`, say) rather than inside a whole network's profile. `--keep` lets the convolution keep its
//! transformed weights across calls, as an inference model's do (`KeptWeights`).
//! `--residual` adds a residual (a bottleneck's last convolution), `--plain` drops the bias and ReLU too.
//! Usage: bench_conv CIN H W COUT K [STRIDE PADDING DILATION] [--runs N] [--keep] [--residual | --plain]; prints one
//! JSON line.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use semseg::model::ops::conv_cpu::{conv2d_image, ConvGeometry, Epilogue, KeptWeights, Scratch};

fn main() -> Result<()> {
    let mut numbers = Vec::new();
    let mut runs = 10usize;
    let mut kept = None;
    let (mut with_residual, mut plain) = (false, false);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--keep" {
            kept = Some(KeptWeights::default());
        } else if a == "--residual" {
            with_residual = true;
        } else if a == "--plain" {
            plain = true;
        } else if a == "--runs" {
            runs = args.next().context("--runs needs a value")?.parse()?;
        } else {
            numbers.push(a.parse::<usize>().with_context(|| format!("not a number: {a}"))?);
        }
    }
    let [cin, h, w, cout, k, rest @ ..] = numbers.as_slice() else {
        bail!("usage: bench_conv CIN H W COUT K [STRIDE PADDING DILATION] [--runs N] [--keep] [--residual | --plain]");
    };
    let (stride, padding, dilation) = match rest {
        [] => (1, k / 2, 1),
        [s, p, d] => (*s, *p, *d),
        _ => bail!("STRIDE PADDING DILATION go together"),
    };
    let g = ConvGeometry::new((*cin, *h, *w), (*cout, *k), stride, padding, dilation)
        .context("kernel larger than input")?;
    let x: Vec<f32> = (0..g.input_len())
        .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5)
        .collect();
    let weight: Vec<f32> = (0..g.weight_len())
        .map(|i| ((i * 104729) % 1000) as f32 * 1e-4 - 0.05)
        .collect();
    let bias: Vec<f32> = (0..g.cout).map(|i| i as f32 * 1e-3).collect();
    let residual: Vec<f32> = (0..g.output_len()).map(|i| ((i * 613) % 1000) as f32 * 1e-3).collect();
    let mut out = vec![0f32; g.output_len()];
    let mut scratch = Scratch::default();
    let epilogue = Epilogue {
        bias: (!plain).then_some(&bias[..]),
        residual: with_residual.then_some(&residual[..]),
        relu: !plain,
    };
    // Warm up for half a second: on the 2-core VMs the first ~150 ms of work after idling ran erratically at up to
    // twice the steady time (2026-12-06, Zen 4: a 3 ms 1×1 conv took 5–8 ms for its first 30 calls), which a
    // median of a few dozen calls took for the layer's cost.
    let warm_up = Instant::now();
    while warm_up.elapsed().as_secs_f64() < 0.5 {
        conv2d_image(&g, &x, (&weight, kept.as_ref()), epilogue, &mut out, &mut scratch);
    }
    let mut ms: Vec<f64> = (0..runs.max(1))
        .map(|_| {
            let t = Instant::now();
            conv2d_image(&g, &x, (&weight, kept.as_ref()), epilogue, &mut out, &mut scratch);
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    let macs = (g.cout * g.cin * g.k * g.k * g.oh * g.ow) as f64;
    println!(
        "{{\"geometry\": \"{g:?}\", \"epilogue\": \"{}\", \"threads\": {}, \"median_ms\": {:.2}, \"min_ms\": {:.2}, \"dense_gflops\": {:.1}}}",
        match (plain, with_residual) {
            (true, _) => "none",
            (false, true) => "bias+residual+relu",
            (false, false) => "bias+relu",
        },
        rayon::current_num_threads(),
        ms[ms.len() / 2],
        ms[0],
        2.0 * macs / ms[0] / 1e6
    );
    Ok(())
}

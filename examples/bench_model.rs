//! Model-only latency of a model artifact on one image: what `POST /invocations` calls its "model" step
//! (`Inference::mask`: the network, softmax and argmax at the image's size), without HTTP, JPEG decoding or PNG
//! encoding. `scripts/bench-serve` prints it beside the server's latencies. Threads: `RAYON_NUM_THREADS`, as the server.
//! Usage: bench_model MODEL_DIR IMAGE [--warmup N] [--runs N]; prints one JSON line.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use semseg::infer::{Inference, InferenceLimits};

fn main() -> Result<()> {
    semseg::process::tune(); // as the semseg binary does
    let mut args = std::env::args().skip(1);
    let model = args
        .next()
        .context("usage: bench_model MODEL_DIR IMAGE [--warmup N] [--runs N]")?;
    let image_path = args
        .next()
        .context("usage: bench_model MODEL_DIR IMAGE [--warmup N] [--runs N]")?;
    let (mut warmup, mut runs) = (2usize, 10usize);
    while let Some(flag) = args.next() {
        let value: usize = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?
            .parse()
            .with_context(|| format!("{flag} needs a number"))?;
        match flag.as_str() {
            "--warmup" => warmup = value,
            "--runs" => runs = value.max(1),
            other => bail!("unknown argument {other}"),
        }
    }
    let image = image::open(&image_path)
        .with_context(|| format!("cannot read {image_path}"))?
        .to_rgb8();
    let segmenter = semseg::infer::model_adapter::load(std::path::Path::new(&model), &semseg::compute::Compute::cpu())?;
    // The server's limits, so a large image is resized exactly as it would be there.
    let inference = Inference::new(segmenter, InferenceLimits::default());
    for _ in 0..warmup {
        inference.mask(&image)?;
    }
    let mut ms: Vec<f64> = (0..runs)
        .map(|_| {
            let started = Instant::now();
            inference.mask(&image).map(|_| started.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<Result<_>>()?;
    ms.sort_by(f64::total_cmp);
    let median = if runs % 2 == 1 {
        ms[runs / 2]
    } else {
        (ms[runs / 2 - 1] + ms[runs / 2]) / 2.0
    };
    let report = serde_json::json!({
        "model": model,
        "image": [image.width(), image.height()],
        "threads": candle_core::utils::get_num_threads(),
        "runs": runs,
        "median_ms": median,
        "min_ms": ms[0],
        "max_ms": ms[runs - 1],
    });
    println!("{report}");
    Ok(())
}

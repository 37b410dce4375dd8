//! CPU inference latency of the BatchNorm-folded ResNet-50 models (random weights, torchvision initialisation),
//! one JSON line per model in the same shape as `../shared/bench/peer/torch_infer.py`'s, so they can be printed
//! side by side. Threads: set `RAYON_NUM_THREADS` (Candle's CPU kernels and matmuls use Rayon's pool).
//! Usage: bench_infer [--size H W] [--batch N] [--warmup N] [--runs N] [--models fcn,deeplab,psp] [--backbone resnet-50]

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use semseg::model::{Algorithm, Backbone, ModelConfig, OutputStride, SegmentationModel};

/// CPU-seconds used by all processes (Linux `/proc/stat`), to report how busy the rest of the machine was.
fn machine_busy_s() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<f64> = text
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|f| f.parse().ok())
        .collect();
    (v.len() == 8).then(|| (v.iter().sum::<f64>() - v[3] - v[4]) / 100.0)
}

fn process_cpu_s() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after = text.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / 100.0)
}

fn peer_name(a: Algorithm, b: Backbone) -> String {
    let algo = match a {
        Algorithm::Fcn => "fcn",
        Algorithm::Deeplab => "deeplabv3",
        Algorithm::Psp => "pspnet",
    };
    format!("{algo}_{}", b.as_str().replace('-', ""))
}

fn main() -> Result<()> {
    semseg::allocator::keep_freed_memory_for_reuse(); // as the semseg binary does
    let mut args = std::env::args().skip(1);
    let (mut h, mut w, mut batch, mut warmup, mut runs) = (512usize, 512usize, 1usize, 2usize, 5usize);
    let mut models = vec![Algorithm::Fcn, Algorithm::Deeplab, Algorithm::Psp];
    let mut backbone = Backbone::Resnet50;
    while let Some(a) = args.next() {
        let mut num = |what: &str| -> Result<usize> {
            args.next()
                .with_context(|| format!("{what} needs a value"))?
                .parse()
                .with_context(|| what.to_string())
        };
        match a.as_str() {
            "--size" => {
                h = num("--size")?;
                w = num("--size")?;
            }
            "--batch" => batch = num("--batch")?,
            "--warmup" => warmup = num("--warmup")?,
            "--runs" => runs = num("--runs")?.max(1),
            "--models" => {
                models = args
                    .next()
                    .context("--models needs a value")?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?
            }
            "--backbone" => backbone = args.next().context("--backbone needs a value")?.parse()?,
            other => bail!("unknown argument {other}"),
        }
    }
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into());
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (batch, 3, h, w), &dev)?;
    for algorithm in models {
        let cfg = ModelConfig::new(algorithm, backbone, 21, OutputStride::Eight, false)?;
        let vm = VarMap::new();
        let net = SegmentationModel::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?.fold_batchnorm()?;
        for _ in 0..warmup {
            net.logits(&x)?;
        }
        let (b0, c0, t_start) = (machine_busy_s(), process_cpu_s(), Instant::now());
        let mut ts = Vec::with_capacity(runs);
        for _ in 0..runs {
            let t0 = Instant::now();
            let y = net.logits(&x)?;
            ts.push(t0.elapsed().as_secs_f64() * 1e3);
            if y.dims() != [batch, 21, h, w] {
                bail!("unexpected output shape {:?}", y.dims());
            }
        }
        let wall = t_start.elapsed().as_secs_f64();
        let other = match (b0, machine_busy_s(), c0, process_cpu_s()) {
            (Some(b0), Some(b1), Some(c0), Some(c1)) => ((b1 - b0 - (c1 - c0)) / wall).max(0.0),
            _ => f64::NAN,
        };
        ts.sort_by(f64::total_cmp);
        let median = if runs % 2 == 1 {
            ts[runs / 2]
        } else {
            (ts[runs / 2 - 1] + ts[runs / 2]) / 2.0
        };
        println!(
            "{{\"model\": \"{}\", \"input\": [{batch}, 3, {h}, {w}], \"threads\": \"{threads}\", \"runs\": {runs}, \
             \"engine\": \"semseg-candle\", \"folded_bn\": true, \"median_ms\": {median:.1}, \"min_ms\": {:.1}, \
             \"max_ms\": {:.1}, \"other_cores\": {other:.2}}}",
            peer_name(algorithm, backbone),
            ts[0],
            ts[runs - 1]
        );
    }
    Ok(())
}

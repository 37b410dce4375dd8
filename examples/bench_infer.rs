//! CPU inference latency of the BatchNorm-folded ResNet-50 models (random weights, torchvision initialisation),
//! one JSON line per model in the same shape as `../shared/bench/peer/torch_infer.py`'s, so they can be printed
//! side by side. Threads: set `RAYON_NUM_THREADS` (Candle's CPU kernels and matmuls use Rayon's pool).
//! Usage: bench_infer [--size H W] [--batch N] [--warmup N] [--runs N] [--models fcn,deeplab,psp] [--backbone resnet-50]
//!   [--profile]: after the timed runs, one more forward with every convolution timed, printed to stderr as a
//!   per-layer table (time, GFLOP/s) with the time outside convolutions;
//!   [--composed-conv]: Candle's own convolution and separate epilogue ops (the path before the fused CPU kernel);
//!   [--precision fp32|bf16]: bf16 runs the convolutions' products in bf16 (CPUs with AVX512-BF16) and adds the
//!   output's relative L2 error and argmax agreement against the same model in fp32.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use semseg::model::precision::{self, MathMode, Precision};
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
    semseg::process::tune(); // as the semseg binary does
    let mut args = std::env::args().skip(1);
    let (mut h, mut w, mut batch, mut warmup, mut runs) = (512usize, 512usize, 1usize, 2usize, 5usize);
    let mut models = vec![Algorithm::Fcn, Algorithm::Deeplab, Algorithm::Psp];
    let mut backbone = Backbone::Resnet50;
    let mut print_profile = false;
    let mut requested = Precision::Fp32;
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
            "--profile" => print_profile = true,
            // Candle's own convolution with separate bias/residual/ReLU ops: the path before the fused CPU kernel.
            "--composed-conv" => semseg::model::ops::conv::use_composed_path_only(true),
            "--precision" => {
                requested = args
                    .next()
                    .context("--precision needs a value")?
                    .parse()
                    .map_err(anyhow::Error::msg)?
            }
            "--backbone" => backbone = args.next().context("--backbone needs a value")?.parse()?,
            other => bail!("unknown argument {other}"),
        }
    }
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into());
    let dev = Device::Cpu;
    let (mode, fallback) = precision::resolve(requested, &dev);
    if let Some(note) = fallback {
        bail!("{note}");
    }
    let engine = if mode.bf16_products {
        "semseg-bf16"
    } else {
        "semseg-candle"
    };
    let x = Tensor::randn(0f32, 1.0, (batch, 3, h, w), &dev)?;
    for algorithm in models {
        let cfg = ModelConfig::new(algorithm, backbone, 21, OutputStride::Eight, false)?;
        let vm = VarMap::new();
        let net = SegmentationModel::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?.fold_batchnorm()?;
        // In bf16, the same model's fp32 output is the reference for the error columns.
        let reference = if mode.bf16_products {
            precision::install(MathMode::STRICT_F32);
            let y = net.logits(&x)?;
            precision::install(mode);
            Some(y)
        } else {
            None
        };
        for _ in 0..warmup {
            net.logits(&x)?;
        }
        let (b0, c0, t_start) = (machine_busy_s(), process_cpu_s(), Instant::now());
        let mut ts = Vec::with_capacity(runs);
        let mut last = None;
        for _ in 0..runs {
            let t0 = Instant::now();
            let y = net.logits(&x)?;
            ts.push(t0.elapsed().as_secs_f64() * 1e3);
            last = Some(y.clone());
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
        // One more forward with every convolution timed: the MAC count, and the per-layer table when asked.
        semseg::model::ops::profile::enable(true);
        let t0 = Instant::now();
        net.logits(&x)?;
        let forward = t0.elapsed();
        semseg::model::ops::profile::enable(false);
        let convs = semseg::model::ops::profile::take();
        let macs: u64 = convs.iter().map(|c| c.macs).sum();
        if print_profile {
            print_conv_profile(&peer_name(algorithm, backbone), &convs, forward);
        }
        let versus_fp32 = match (&reference, &last) {
            (Some(want), Some(got)) => {
                let (rel_l2, agree) = compare(want, got)?;
                format!(", \"rel_l2_vs_fp32\": {rel_l2:.2e}, \"argmax_agreement_vs_fp32\": {agree:.5}")
            }
            _ => String::new(),
        };
        println!(
            "{{\"model\": \"{}\", \"input\": [{batch}, 3, {h}, {w}], \"threads\": \"{threads}\", \"runs\": {runs}, \
             \"engine\": \"{engine}\", \"folded_bn\": true, \"median_ms\": {median:.1}, \"min_ms\": {:.1}, \
             \"max_ms\": {:.1}, \"conv_gmacs\": {:.2}, \"gflops\": {:.1}, \"other_cores\": {other:.2}{versus_fp32}}}",
            peer_name(algorithm, backbone),
            ts[0],
            ts[runs - 1],
            macs as f64 / 1e9,
            2.0 * macs as f64 / (median / 1e3) / 1e9,
        );
    }
    Ok(())
}

/// Relative L2 error of `got` against `want` (`[B, classes, H, W]`) and the share of pixels whose argmax agrees.
fn compare(want: &Tensor, got: &Tensor) -> Result<(f64, f64)> {
    let want64 = want.to_dtype(DType::F64)?;
    let diff = (got.to_dtype(DType::F64)? - &want64)?
        .sqr()?
        .sum_all()?
        .to_scalar::<f64>()?;
    let norm = want64.sqr()?.sum_all()?.to_scalar::<f64>()?;
    let same = want
        .argmax(1)?
        .eq(&got.argmax(1)?)?
        .to_dtype(DType::F64)?
        .mean_all()?
        .to_scalar::<f64>()?;
    Ok(((diff / norm).sqrt(), same))
}

/// The per-layer table on stderr: each convolution's shape, time and GFLOP/s, then totals.
fn print_conv_profile(model: &str, convs: &[semseg::model::ops::profile::ConvRecord], forward: std::time::Duration) {
    eprintln!(
        "\n{model}: per-convolution profile (one forward, {:.0} ms)",
        forward.as_secs_f64() * 1e3
    );
    eprintln!(
        "{:>3} {:>20} {:>16} {:>3} {:>3} {:>9} {:>8} {:>8}",
        "#", "input", "weight", "s", "d", "GMAC", "ms", "GFLOP/s"
    );
    let mut conv_total = std::time::Duration::ZERO;
    for (i, c) in convs.iter().enumerate() {
        conv_total += c.elapsed;
        eprintln!(
            "{i:>3} {:>20} {:>16} {:>3} {:>3} {:>9.3} {:>8.1} {:>8.1}",
            format!("{:?}", c.input),
            format!("{:?}", c.weight),
            c.stride,
            c.dilation,
            c.macs as f64 / 1e9,
            c.elapsed.as_secs_f64() * 1e3,
            c.gflops()
        );
    }
    let macs: u64 = convs.iter().map(|c| c.macs).sum();
    eprintln!(
        "convolutions: {:.0} ms for {:.1} GMAC ({:.1} GFLOP/s); outside convolutions: {:.0} ms of {:.0} ms",
        conv_total.as_secs_f64() * 1e3,
        macs as f64 / 1e9,
        2.0 * macs as f64 / conv_total.as_secs_f64() / 1e9,
        (forward - conv_total).as_secs_f64() * 1e3,
        forward.as_secs_f64() * 1e3
    );
}

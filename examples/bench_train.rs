//! CPU training-step time, the same step as the training job and as the peer's `torch_train.py`
//! (`../shared/bench/peer`): forward in train mode, per-pixel cross-entropy on random labels (plus 0.4 × the aux
//! head's with --aux), backward, SGD with momentum 0.9 and weight decay 1e-4 (semseg's own optimizer). Prints lines
//! shaped like the peer's, for comparison. Threads: `RAYON_NUM_THREADS`.
//! Usage: bench_train [--size H W] [--batch N] [--steps N] [--models fcn,deeplab,psp] [--backbone resnet-50] [--aux]
//!   [--profile]: one more step with every convolution and both its gradients timed, summarised on stderr;
//!   [--precision fp32|bf16]: bf16 runs the convolutions' products in bf16 (CPUs with AVX512-BF16; it fails on
//!   others rather than time fp32 under bf16's name).

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use semseg::model::precision::{self, Precision};
use semseg::model::{weights, Algorithm, Backbone, ModelConfig, OutputStride, SegmentationModel};
use semseg::sagemaker::hyperparameters::OptimizerKind;
use semseg::train::loss::{training_loss, Targets};
use semseg::train::memory_check;
use semseg::train::optim::{Optimizer, OptimizerConfig};

fn main() -> Result<()> {
    semseg::process::tune(); // as the semseg binary does
    let mut args = std::env::args().skip(1);
    let (mut h, mut w, mut batch, mut steps, mut aux) = (256usize, 256usize, 2usize, 3usize, false);
    let mut print_profile = false;
    let mut models = vec![Algorithm::Fcn, Algorithm::Deeplab, Algorithm::Psp];
    let mut backbone = Backbone::Resnet50;
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
            "--steps" => steps = num("--steps")?.max(1),
            "--aux" => aux = true,
            "--profile" => print_profile = true,
            "--models" => {
                models = args
                    .next()
                    .context("--models needs a value")?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?
            }
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
    let dev = Device::Cpu;
    let (mode, fallback) = precision::resolve(requested, &dev);
    if let Some(note) = fallback {
        bail!("{note}");
    }
    precision::install(mode);
    let engine = if mode.bf16_products {
        "semseg-bf16"
    } else {
        "semseg-candle"
    };
    let x = Tensor::randn(0f32, 1.0, (batch, 3, h, w), &dev)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let labels: Vec<u8> = (0..batch * h * w).map(|_| rng.random_range(0..21u8)).collect();
    let targets = Targets::new(&labels, batch, h, w, &dev)?;
    for algorithm in models {
        let cfg = ModelConfig::new(algorithm, backbone, 21, OutputStride::Eight, aux)?;
        let vm = VarMap::new();
        let net = SegmentationModel::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
        let sgd = OptimizerConfig {
            kind: OptimizerKind::Sgd,
            momentum: 0.9,
            weight_decay: 1e-4,
            gamma1: 0.9,
            gamma2: 0.9,
        };
        let mut optimizer = Optimizer::new(sgd, weights::trainable_vars(&vm));
        let mut ts = Vec::new();
        let mut graph_mib = 0.0;
        for step in 0..=steps + usize::from(print_profile) {
            let profiling = print_profile && step == steps + 1;
            semseg::model::ops::profile::enable(profiling);
            let t0 = Instant::now();
            let loss = training_loss(&net.forward_t(&x, true)?, &targets)?;
            if step == 0 {
                graph_mib = memory_check::graph_bytes(&loss) as f64 / (1 << 20) as f64;
            }
            optimizer.step(&loss.backward()?, 0.01)?;
            if profiling {
                semseg::model::ops::profile::enable(false);
                print_phases(&semseg::model::ops::profile::take(), t0.elapsed());
            } else if step > 0 {
                ts.push(t0.elapsed().as_secs_f64() * 1e3); // step 0 is the warm-up
            }
        }
        ts.sort_by(f64::total_cmp);
        let median = ts[ts.len() / 2];
        println!(
            "{{\"model\": \"{cfg}\", \"engine\": \"{engine}\", \"batch\": {batch}, \"size\": [{h}, {w}], \
             \"steps\": {steps}, \"images_per_s\": {:.3}, \"step_ms_median\": {median:.1}, \"step_ms_min\": {:.1}, \
             \"step_ms_max\": {:.1}, \"graph_mib\": {graph_mib:.0}}}",
            batch as f64 / (median / 1e3),
            ts[0],
            ts[ts.len() - 1]
        );
    }
    Ok(())
}

/// Time and dense GFLOP/s per phase (forward, weight gradient, input gradient) over a step, then the slowest calls.
fn print_phases(records: &[semseg::model::ops::profile::ConvRecord], step: std::time::Duration) {
    let mut total = std::time::Duration::ZERO;
    eprintln!(
        "\nconvolutions in one profiled step ({:.0} ms):",
        step.as_secs_f64() * 1e3
    );
    for phase in ["forward", "weight-grad", "input-grad"] {
        let rs: Vec<_> = records.iter().filter(|r| r.phase == phase).collect();
        let t: std::time::Duration = rs.iter().map(|r| r.elapsed).sum();
        let macs: u64 = rs.iter().map(|r| r.macs).sum();
        total += t;
        eprintln!(
            "  {phase:<12} {:>3} calls {:>8.0} ms {:>8.1} GMAC {:>7.1} GFLOP/s",
            rs.len(),
            t.as_secs_f64() * 1e3,
            macs as f64 / 1e9,
            2.0 * macs as f64 / t.as_secs_f64() / 1e9
        );
    }
    eprintln!(
        "  outside convolutions: {:.0} ms",
        (step.saturating_sub(total)).as_secs_f64() * 1e3
    );
    let mut slow: Vec<_> = records.iter().collect();
    slow.sort_by_key(|r| std::cmp::Reverse(r.elapsed));
    for r in slow.iter().take(12) {
        eprintln!(
            "  {:<12} {:>18} {:>18} s{} d{} {:>7.1} ms {:>7.1} GFLOP/s",
            r.phase,
            format!("{:?}", r.input),
            format!("{:?}", r.weight),
            r.stride,
            r.dilation,
            r.elapsed.as_secs_f64() * 1e3,
            r.gflops()
        );
    }
}

//! A self-check of the training ops on one device against an f64 CPU reference: the convolution (forward, input
//! and weight gradients; cuDNN on CUDA), the fused convolution epilogue (bias, residual, ReLU), the fused
//! training BatchNorm (forward with and without ReLU, its three gradients and the batch statistics), the residual
//! add + ReLU, the stem's max-pool and the cross-entropy loss, in each precision mode: strict fp32, fp32 with TF32
//! allowed, and bf16 activations with f32 weights; and, once (the weights are f32 in every mode), the optimizer's
//! in-place sgd / nag update and BatchNorm's in-place running-statistics update against the CPU's f32 ones.
//!
//! The reference sees the same input values the device does (bf16-rounded in bf16 mode), so the errors measure the
//! kernels' arithmetic, not the rounding of the inputs. Each case reports the relative L2 error
//! `‖device − reference‖ / ‖reference‖` of every output and passes when all are within its mode's threshold.
//! On the CPU the bf16 mode is skipped (the CPU's activations are f32) and the TF32 flag changes nothing; a CPU with
//! AVX512-BF16 adds the `cpu-bf16` mode instead: the convolutions with bf16 products (`precision=bf16` there),
//! against the f64 reference of the unrounded inputs.

use anyhow::Context;
use candle_core::{DType, Device, Tensor, Var};
use serde_json::{json, Value};

use super::{add_relu, batch_norm, conv, dropout, pool, running_stats};
use crate::model::precision::{self, MathMode};
use crate::sagemaker::hyperparameters::OptimizerKind;
use crate::train::loss::{cross_entropy, Targets};
use crate::train::optim::{Optimizer, OptimizerConfig};

/// Relative-L2 limits per mode.
pub const STRICT_F32_MAX: f64 = 1e-5;
pub const TF32_MAX: f64 = 2e-3;
pub const BF16_MAX: f64 = 3e-2;

/// (cin, h, w, cout, k, padding, stride, dilation).
type ConvGeometry = (usize, usize, usize, usize, usize, usize, usize, usize);

/// Batch 2: 1×1 (plain and strided), 3×3 stride 1 and 2 on odd
/// sizes, dilated 3×3 (d = 2, and d = 12 on a map smaller than the dilation), the 7×7 stride-2 stem, and one
/// larger 3×3 so that cuDNN picks a real (tiled / Winograd / FFT) algorithm.
const CONV_CASES: &[ConvGeometry] = &[
    (16, 9, 9, 8, 1, 0, 1, 1),
    (16, 9, 10, 8, 1, 0, 2, 1),
    (8, 12, 12, 8, 3, 1, 1, 1),
    (8, 5, 7, 6, 3, 1, 2, 1),
    (8, 13, 11, 6, 3, 2, 1, 2),
    (8, 9, 10, 4, 3, 12, 1, 12),
    (3, 19, 18, 8, 7, 3, 2, 1),
    (64, 24, 20, 64, 3, 1, 1, 1),
];

/// BatchNorm inputs `[B, C, H, W]`: odd sizes, one value per plane (the ASPP pooling branch), a bigger map that
/// splits each channel over several blocks, and channels with a large mean (cancellation in the variance).
const BN_CASES: &[([usize; 4], f64, f64)] = &[
    ([2, 8, 5, 7], 1.0, 0.0),
    ([3, 16, 1, 1], 1.0, 0.0),
    ([2, 32, 40, 36], 1.0, 0.0),
    ([2, 8, 9, 11], 0.5, 20.0),
];

/// Inputs of the add + ReLU, max-pool and cross-entropy cases (`[N, C, H, W]`; C is the classes for the loss):
/// odd and even sides, one pixel, and a map larger than one block of threads.
const ELEMENTWISE_CASES: &[[usize; 4]] = &[[2, 3, 5, 7], [1, 4, 1, 1], [2, 21, 24, 26]];

/// (rule, momentum) of the optimizer cases: sgd with momentum, nag, and sgd without momentum.
const SGD_CASES: [(OptimizerKind, f64); 3] = [
    (OptimizerKind::Sgd, 0.9),
    (OptimizerKind::Nag, 0.9),
    (OptimizerKind::Sgd, 0.0),
];

const EPS: f64 = 1e-5;

#[derive(Clone, Copy, Debug)]
struct Mode {
    name: &'static str,
    dtype: DType,
    tf32: bool,
    /// The CPU convolutions' products in bf16 (only the convolution cases run in this mode).
    bf16_products: bool,
    max: f64,
}

const MODES: [Mode; 4] = [
    Mode {
        name: "fp32",
        dtype: DType::F32,
        tf32: false,
        bf16_products: false,
        max: STRICT_F32_MAX,
    },
    Mode {
        name: "tf32",
        dtype: DType::F32,
        tf32: true,
        bf16_products: false,
        max: TF32_MAX,
    },
    Mode {
        name: "bf16",
        dtype: DType::BF16,
        tf32: false,
        bf16_products: false,
        max: BF16_MAX,
    },
    Mode {
        name: "cpu-bf16",
        dtype: DType::F32,
        tf32: false,
        bf16_products: true,
        max: BF16_MAX,
    },
];

/// Restores the process's TF32 and bf16-products settings when dropped.
struct RestoreMode {
    tf32: bool,
    bf16_products: bool,
}

impl Drop for RestoreMode {
    fn drop(&mut self) {
        precision::install(MathMode {
            compute_dtype: DType::F32,
            tf32: self.tf32,
            bf16_products: self.bf16_products,
        });
    }
}

/// Runs every case on `device` and returns `{device, pass, thresholds, cases: [{mode, op, case, errors, max,
/// pass, error?}], skipped: [...]}`. A case that fails to run is reported (with its error) as failed; the
/// function itself fails only when the reference cannot be computed.
pub fn compare_with_cpu(device: &Device) -> anyhow::Result<Value> {
    compare_modes(device, true)
}

/// [`compare_with_cpu`], with or without the `cpu-bf16` mode. That mode installs bf16 products for the whole
/// process while it runs, so it is left out where other work shares the process (the unit tests).
fn compare_modes(device: &Device, cpu_bf16: bool) -> anyhow::Result<Value> {
    let _restore = RestoreMode {
        tf32: precision::tf32_allowed(),
        bf16_products: precision::bf16_products(),
    };
    let mut cases = Vec::new();
    let mut skipped = Vec::new();
    for mode in MODES {
        if mode.dtype == DType::BF16 && device.is_cpu() {
            skipped.push(json!({"mode": mode.name, "why": "bf16 activations are GPU-only (see cpu-bf16)"}));
            continue;
        }
        if mode.bf16_products && !cpu_bf16 {
            skipped.push(json!({"mode": mode.name, "why": "not asked for"}));
            continue;
        }
        if mode.bf16_products && !device.is_cpu() {
            skipped.push(json!({"mode": mode.name, "why": "bf16 products are the CPU's bf16"}));
            continue;
        }
        if mode.bf16_products && !super::gemm_bf16::available() {
            skipped.push(json!({"mode": mode.name, "why": "this CPU lacks AVX512-BF16"}));
            continue;
        }
        precision::install(MathMode {
            compute_dtype: mode.dtype,
            tf32: mode.tf32,
            bf16_products: mode.bf16_products,
        });
        for (i, &geometry) in CONV_CASES.iter().enumerate() {
            let (cin, h, w, cout, k, p, s, d) = geometry;
            let name = format!("{cin}x{h}x{w} -> {cout}, k{k} p{p} s{s} d{d}");
            let seed = 100 + 10 * i as u64;
            let run = conv_case(device, mode, geometry, seed).with_context(|| format!("conv {name}"));
            cases.push(report(mode, "conv", &name, run));
            let run = fused_case(device, mode, geometry, seed + 5).with_context(|| format!("conv_fused {name}"));
            cases.push(report(mode, "conv_fused", &name, run));
        }
        if mode.bf16_products {
            continue; // only the convolutions' products change in this mode
        }
        for (i, &(shape, scale, offset)) in BN_CASES.iter().enumerate() {
            for (relu, residual) in [(false, false), (true, false), (true, true)] {
                let name = format!(
                    "{shape:?} x*{scale}+{offset}{}",
                    match (relu, residual) {
                        (_, true) => " + residual, relu",
                        (true, false) => " relu",
                        _ => "",
                    }
                );
                let run = bn_case(
                    device,
                    mode,
                    shape,
                    (scale, offset),
                    (relu, residual),
                    500 + 10 * i as u64,
                )
                .with_context(|| format!("batch_norm {name}"));
                cases.push(report(mode, "batch_norm", &name, run));
            }
        }
        for (i, &shape) in ELEMENTWISE_CASES.iter().enumerate() {
            let name = format!("{shape:?}");
            let seed = 700 + 10 * i as u64;
            let run = add_relu_case(device, mode, shape, seed).with_context(|| format!("add_relu {name}"));
            cases.push(report(mode, "add_relu", &name, run));
            let run = max_pool_case(device, mode, shape, seed + 5).with_context(|| format!("max_pool {name}"));
            cases.push(report(mode, "max_pool", &name, run));
            let run =
                cross_entropy_case(device, mode, shape, seed + 7).with_context(|| format!("cross_entropy {name}"));
            cases.push(report(mode, "cross_entropy", &name, run));
            let run = dropout_case(device, mode, shape, seed + 9).with_context(|| format!("dropout {name}"));
            cases.push(report(mode, "dropout", &name, run));
        }
        if mode.name == "fp32" {
            for (i, &(kind, momentum)) in SGD_CASES.iter().enumerate() {
                let name = format!("{kind:?} momentum {momentum}, [64, 3, 7, 7]");
                let run = sgd_case(device, kind, momentum, 900 + 10 * i as u64).with_context(|| format!("sgd {name}"));
                cases.push(report(mode, "sgd", &name, run));
            }
            let run = running_stats_case(device, 950).context("running statistics");
            cases.push(report(mode, "running_stats", "[256], three updates", run));
            let run = batch_upload_case(device).context("batch uploads");
            cases.push(report(
                mode,
                "batch_upload",
                "5 batches of [2, 3, 64, 64] behind queued work",
                run,
            ));
        }
    }
    let pass = cases.iter().all(|c| c["pass"] == json!(true));
    Ok(json!({
        "device": format!("{device:?}"),
        "pass": pass,
        "thresholds": {"fp32": STRICT_F32_MAX, "tf32": TF32_MAX, "bf16": BF16_MAX},
        "cases": cases,
        "skipped": skipped,
    }))
}

fn report(mode: Mode, op: &str, case: &str, run: anyhow::Result<Vec<(&'static str, f64)>>) -> Value {
    match run {
        Ok(errors) => {
            // NaN fails (the comparison is false).
            let pass = errors.iter().all(|(_, e)| *e <= mode.max);
            let errors: serde_json::Map<String, Value> =
                errors.into_iter().map(|(k, e)| (k.to_string(), json!(e))).collect();
            json!({"mode": mode.name, "op": op, "case": case, "errors": errors, "max": mode.max, "pass": pass})
        }
        Err(e) => json!({"mode": mode.name, "op": op, "case": case, "max": mode.max, "pass": false,
                         "error": format!("{e:#}")}),
    }
}

/// Deterministic values in (−1, 1), f64 on the CPU.
fn seeded(shape: &[usize], seed: u64) -> candle_core::Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let data: Vec<f64> = (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu)
}

/// ‖a − b‖ / ‖b‖ in f64 on the CPU (0 when both are zero).
fn relative_l2(a: &Tensor, b: &Tensor) -> anyhow::Result<f64> {
    anyhow::ensure!(a.dims() == b.dims(), "shapes differ: {:?} vs {:?}", a.dims(), b.dims());
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let num = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let den = b.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    Ok(if den == 0.0 && num == 0.0 { 0.0 } else { num / den })
}

/// `t` (f64, CPU) as the device sees it: rounded to `dtype` and moved.
fn on_device(t: &Tensor, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
    t.to_dtype(dtype)?.to_device(device)
}

/// The values of a device tensor, exactly, as f64 on the CPU (the reference's input).
fn as_reference(t: &Tensor) -> candle_core::Result<Tensor> {
    t.to_device(&Device::Cpu)?.to_dtype(DType::F64)
}

fn grad(grads: &candle_core::backprop::GradStore, v: &Var, what: &str) -> anyhow::Result<Tensor> {
    grads
        .get(v.as_tensor())
        .cloned()
        .with_context(|| format!("no gradient for {what}"))
}

/// The weight as the device's convolution sees it: f32 master values, cast to the activations' dtype inside the op.
fn weight_reference(w32: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
    as_reference(&w32.to_dtype(dtype)?)
}

fn conv_case(
    device: &Device,
    mode: Mode,
    (cin, h, w, cout, k, p, s, d): ConvGeometry,
    seed: u64,
) -> anyhow::Result<Vec<(&'static str, f64)>> {
    let x64 = seeded(&[2, cin, h, w], seed)?;
    let w64 = (seeded(&[cout, cin, k, k], seed + 1)? / ((cin * k * k) as f64).sqrt())?;
    let xd = Var::from_tensor(&on_device(&x64, mode.dtype, device)?)?;
    let wd = Var::from_tensor(&on_device(&w64, DType::F32, device)?)?;
    let y = conv::conv2d(xd.as_tensor(), wd.as_tensor(), p, s, d)?;
    let r64 = seeded(y.dims(), seed + 2)?;
    let r = on_device(&r64, DType::F32, device)?;
    let grads = (y.to_dtype(DType::F32)? * &r)?.sum_all()?.backward()?;
    let (dx, dw) = (grad(&grads, &xd, "x")?, grad(&grads, &wd, "weight")?);
    anyhow::ensure!(
        dw.dtype() == DType::F32,
        "the weight gradient is {:?}, not f32",
        dw.dtype()
    );

    let xr = Var::from_tensor(&as_reference(xd.as_tensor())?)?;
    let wr = Var::from_tensor(&weight_reference(wd.as_tensor(), mode.dtype)?)?;
    let yr = conv::conv2d(xr.as_tensor(), wr.as_tensor(), p, s, d)?;
    let rr = as_reference(&r)?;
    let gr = (&yr * &rr)?.sum_all()?.backward()?;
    Ok(vec![
        ("y", relative_l2(&y, &yr)?),
        ("dx", relative_l2(&dx, &grad(&gr, &xr, "x (reference)")?)?),
        ("dw", relative_l2(&dw, &grad(&gr, &wr, "weight (reference)")?)?),
    ])
}

/// Inference: `relu(conv(x, w) + bias + residual)` with an f32 bias, nothing tracked.
fn fused_case(
    device: &Device,
    mode: Mode,
    (cin, h, w, cout, k, p, s, d): ConvGeometry,
    seed: u64,
) -> anyhow::Result<Vec<(&'static str, f64)>> {
    let x64 = seeded(&[2, cin, h, w], seed)?;
    let w64 = (seeded(&[cout, cin, k, k], seed + 1)? / ((cin * k * k) as f64).sqrt())?;
    let b64 = (seeded(&[cout], seed + 2)? * 0.5)?;
    let xd = on_device(&x64, mode.dtype, device)?;
    let wd = on_device(&w64, DType::F32, device)?;
    let bd = on_device(&b64, DType::F32, device)?;
    let y0 = conv::conv2d(&xd, &wd, p, s, d)?;
    let resd = on_device(&seeded(y0.dims(), seed + 3)?, mode.dtype, device)?;
    let y = conv::conv2d_fused(&xd, (&wd, None), Some(&bd), Some(&resd), true, (p, s, d))?;
    anyhow::ensure!(
        y.dtype() == mode.dtype,
        "output dtype {:?}, expected {:?}",
        y.dtype(),
        mode.dtype
    );

    let (xr, wr, br, resr) = (
        as_reference(&xd)?,
        weight_reference(&wd, mode.dtype)?,
        as_reference(&bd.to_dtype(mode.dtype)?)?,
        as_reference(&resd)?,
    );
    let yr = conv::conv2d(&xr, &wr, p, s, d)?
        .broadcast_add(&br.reshape((1, cout, 1, 1))?)?
        .add(&resr)?
        .relu()?;
    Ok(vec![("y", relative_l2(&y, &yr)?)])
}

fn bn_case(
    device: &Device,
    mode: Mode,
    shape: [usize; 4],
    (scale, offset): (f64, f64),
    (relu, residual): (bool, bool),
    seed: u64,
) -> anyhow::Result<Vec<(&'static str, f64)>> {
    let c = shape[1];
    // With `residual`: relu(bn(x) + residual), the bottleneck's fused last op (relu is then implied).
    let run = |x: &Tensor, g: &Tensor, b: &Tensor, r: &Tensor| {
        if residual {
            batch_norm::batch_norm_add_relu_train(x, g, b, EPS, r)
        } else {
            batch_norm::batch_norm_train(x, g, b, EPS, relu)
        }
    };
    let res64 = seeded(&shape, seed + 4)?;
    let resd = Var::from_tensor(&on_device(&res64, mode.dtype, device)?)?;
    let x64 = seeded(&shape, seed)?.affine(scale, offset)?;
    let g64 = (seeded(&[c], seed + 1)?.affine(0.5, 1.0))?;
    let b64 = (seeded(&[c], seed + 2)? * 0.3)?;
    let xd = Var::from_tensor(&on_device(&x64, mode.dtype, device)?)?;
    let gd = Var::from_tensor(&on_device(&g64, DType::F32, device)?)?;
    let bd = Var::from_tensor(&on_device(&b64, DType::F32, device)?)?;
    anyhow::ensure!(
        batch_norm::supports(xd.as_tensor(), gd.as_tensor()),
        "the fused BatchNorm does not take {:?} on {:?} in this build",
        mode.dtype,
        device
    );
    let (y, mean, var) = run(xd.as_tensor(), gd.as_tensor(), bd.as_tensor(), resd.as_tensor())?;
    anyhow::ensure!(
        y.dtype() == mode.dtype,
        "output dtype {:?}, expected {:?}",
        y.dtype(),
        mode.dtype
    );
    anyhow::ensure!(
        mean.dims() == [c] && var.dims() == [c] && mean.device().same_device(device),
        "statistics {:?} / {:?} on {:?}, expected [{c}] on the device",
        mean.dims(),
        var.dims(),
        mean.device()
    );
    let r64 = seeded(&shape, seed + 3)?;
    let r = on_device(&r64, DType::F32, device)?;
    let grads = (y.to_dtype(DType::F32)? * &r)?.sum_all()?.backward()?;
    let (dx, dg, db) = (
        grad(&grads, &xd, "x")?,
        grad(&grads, &gd, "gamma")?,
        grad(&grads, &bd, "beta")?,
    );
    anyhow::ensure!(
        dg.dtype() == DType::F32 && db.dtype() == DType::F32,
        "parameter gradients {:?} / {:?}, expected f32",
        dg.dtype(),
        db.dtype()
    );

    let xr = Var::from_tensor(&as_reference(xd.as_tensor())?)?;
    let gr = Var::from_tensor(&as_reference(gd.as_tensor())?)?;
    let br = Var::from_tensor(&as_reference(bd.as_tensor())?)?;
    let resr = Var::from_tensor(&as_reference(resd.as_tensor())?)?;
    let (yr, mean_r, var_r) = run(xr.as_tensor(), gr.as_tensor(), br.as_tensor(), resr.as_tensor())?;
    let rr = as_reference(&r)?;
    let gref = (&yr * &rr)?.sum_all()?.backward()?;
    let mut errors = vec![
        ("y", relative_l2(&y, &yr)?),
        ("mean", relative_l2(&mean, &mean_r)?),
        ("var", relative_l2(&var, &var_r)?),
        ("dx", relative_l2(&dx, &grad(&gref, &xr, "x (reference)")?)?),
        ("dgamma", relative_l2(&dg, &grad(&gref, &gr, "gamma (reference)")?)?),
        ("dbeta", relative_l2(&db, &grad(&gref, &br, "beta (reference)")?)?),
    ];
    if residual {
        let dres = grad(&grads, &resd, "residual")?;
        errors.push((
            "dresidual",
            relative_l2(&dres, &grad(&gref, &resr, "residual (reference)")?)?,
        ));
    }
    Ok(errors)
}

/// `relu(a + b)` and both gradients against the composed ops in f64.
fn add_relu_case(
    device: &Device,
    mode: Mode,
    shape: [usize; 4],
    seed: u64,
) -> anyhow::Result<Vec<(&'static str, f64)>> {
    let ad = Var::from_tensor(&on_device(&seeded(&shape, seed)?, mode.dtype, device)?)?;
    let bd = Var::from_tensor(&on_device(&seeded(&shape, seed + 1)?, mode.dtype, device)?)?;
    let y = add_relu::add_relu(ad.as_tensor(), bd.as_tensor())?;
    let r = on_device(&seeded(&shape, seed + 2)?, DType::F32, device)?;
    let grads = (y.to_dtype(DType::F32)? * &r)?.sum_all()?.backward()?;
    let ar = Var::from_tensor(&as_reference(ad.as_tensor())?)?;
    let br = Var::from_tensor(&as_reference(bd.as_tensor())?)?;
    let yr = (ar.as_tensor() + br.as_tensor())?.relu()?;
    let gr = (&yr * as_reference(&r)?)?.sum_all()?.backward()?;
    Ok(vec![
        ("y", relative_l2(&y, &yr)?),
        (
            "da",
            relative_l2(&grad(&grads, &ad, "a")?, &grad(&gr, &ar, "a (reference)")?)?,
        ),
        (
            "db",
            relative_l2(&grad(&grads, &bd, "b")?, &grad(&gr, &br, "b (reference)")?)?,
        ),
    ])
}

/// Dropout and its gradient against the CPU op in f64 with the same key: the masks must be the same bits.
fn dropout_case(device: &Device, mode: Mode, shape: [usize; 4], seed: u64) -> anyhow::Result<Vec<(&'static str, f64)>> {
    let op = dropout::Dropout { key: seed, p: 0.3 };
    let xd = Var::from_tensor(&on_device(&seeded(&shape, seed)?, mode.dtype, device)?)?;
    let y = xd.as_tensor().apply_op1(op)?;
    let r = on_device(&seeded(&shape, seed + 1)?, DType::F32, device)?;
    let grads = (y.to_dtype(DType::F32)? * &r)?.sum_all()?.backward()?;
    let xr = Var::from_tensor(&as_reference(xd.as_tensor())?)?;
    let yr = xr.as_tensor().apply_op1(op)?;
    let gr = (&yr * as_reference(&r)?)?.sum_all()?.backward()?;
    Ok(vec![
        ("y", relative_l2(&y, &yr)?),
        (
            "dx",
            relative_l2(&grad(&grads, &xd, "x")?, &grad(&gr, &xr, "x (reference)")?)?,
        ),
    ])
}

/// The 3×3/2 max-pool and its gradient against the CPU op in f64 (both send the gradient to the first maximum).
fn max_pool_case(
    device: &Device,
    mode: Mode,
    shape: [usize; 4],
    seed: u64,
) -> anyhow::Result<Vec<(&'static str, f64)>> {
    let xd = Var::from_tensor(&on_device(&seeded(&shape, seed)?, mode.dtype, device)?)?;
    let y = pool::max_pool_3x3_s2(xd.as_tensor())?;
    let r = on_device(&seeded(y.dims(), seed + 1)?, DType::F32, device)?;
    let grads = (y.to_dtype(DType::F32)? * &r)?.sum_all()?.backward()?;
    let xr = Var::from_tensor(&as_reference(xd.as_tensor())?)?;
    let yr = pool::max_pool_3x3_s2(xr.as_tensor())?;
    let gr = (&yr * as_reference(&r)?)?.sum_all()?.backward()?;
    Ok(vec![
        ("y", relative_l2(&y, &yr)?),
        (
            "dx",
            relative_l2(&grad(&grads, &xd, "x")?, &grad(&gr, &xr, "x (reference)")?)?,
        ),
    ])
}

/// The training loss (labels with ignored pixels; logits in the mode's dtype, as the network hands them over) and
/// its gradient against log-softmax, gather and mean in f64.
fn cross_entropy_case(
    device: &Device,
    mode: Mode,
    [n, c, h, w]: [usize; 4],
    seed: u64,
) -> anyhow::Result<Vec<(&'static str, f64)>> {
    let xd = Var::from_tensor(&on_device(&(seeded(&[n, c, h, w], seed)? * 3.0)?, mode.dtype, device)?)?;
    let labels: Vec<u8> = (0..n * h * w)
        .map(|i| {
            if i % 5 == 2 {
                255
            } else {
                ((i * 7 + seed as usize) % c) as u8
            }
        })
        .collect();
    let loss = cross_entropy(xd.as_tensor(), &Targets::new(&labels, n, h, w, device)?)?;
    let grads = loss.backward()?;
    let xr = Var::from_tensor(&as_reference(xd.as_tensor())?)?;
    let indices: Vec<u32> = labels
        .iter()
        .map(|&l| if l == 255 { 0 } else { u32::from(l) })
        .collect();
    let weights: Vec<f64> = labels.iter().map(|&l| if l == 255 { 0.0 } else { 1.0 }).collect();
    let counted = weights.iter().filter(|&&w| w > 0.0).count().max(1);
    let indices = Tensor::from_vec(indices, (n, 1, h, w), &Device::Cpu)?;
    let weights = Tensor::from_vec(weights, (n, 1, h, w), &Device::Cpu)?;
    let picked = candle_nn::ops::log_softmax(xr.as_tensor(), 1)?.gather(&indices, 1)?;
    let lr = ((picked * weights)?.sum_all()?.neg()? / counted as f64)?;
    let gr = lr.backward()?;
    Ok(vec![
        ("loss", relative_l2(&loss, &lr)?),
        (
            "dx",
            relative_l2(&grad(&grads, &xd, "logits")?, &grad(&gr, &xr, "logits (reference)")?)?,
        ),
    ])
}

/// Three optimizer steps (the first creates the momentum buffer) on `device` against the same f32 steps on the
/// CPU: the weight and the momentum buffer after them.
fn sgd_case(
    device: &Device,
    kind: OptimizerKind,
    momentum: f64,
    seed: u64,
) -> anyhow::Result<Vec<(&'static str, f64)>> {
    let shape = [64, 3, 7, 7];
    let config = OptimizerConfig {
        kind,
        momentum,
        weight_decay: 1e-4,
        gamma1: 0.0,
        gamma2: 0.0,
    };
    let run = |on: &Device| -> anyhow::Result<(Tensor, Option<Tensor>)> {
        let weight = Var::from_tensor(&on_device(&seeded(&shape, seed)?, DType::F32, on)?)?;
        let mut optimizer = Optimizer::new(config, vec![("w".to_string(), weight.clone())]);
        for step in 0..3u64 {
            // The loss Σ w·r has the gradient r.
            let r = on_device(&seeded(&shape, seed + 1 + step)?, DType::F32, on)?;
            let grads = (weight.as_tensor() * &r)?.sum_all()?.backward()?;
            optimizer.step(&grads, 0.01 * (step + 1) as f64)?;
        }
        let (state, _) = optimizer.state_tensors();
        Ok((weight.as_tensor().clone(), state.get("w.0").cloned()))
    };
    let ((w, buf), (wr, buf_r)) = (run(device)?, run(&Device::Cpu)?);
    let mut errors = vec![("w", relative_l2(&w, &wr)?)];
    match (buf, buf_r) {
        (Some(b), Some(br)) => errors.push(("buf", relative_l2(&b, &br)?)),
        (None, None) => {}
        (b, br) => anyhow::bail!(
            "momentum buffer on the device: {}, on the CPU: {}",
            b.is_some(),
            br.is_some()
        ),
    }
    Ok(errors)
}

/// BatchNorm's running mean and (unbiased) variance after three in-place updates, against the CPU's.
fn running_stats_case(device: &Device, seed: u64) -> anyhow::Result<Vec<(&'static str, f64)>> {
    const C: usize = 256;
    let run = |on: &Device| -> anyhow::Result<(Tensor, Tensor)> {
        let mean = on_device(&seeded(&[C], seed)?, DType::F32, on)?;
        let var = on_device(&seeded(&[C], seed + 1)?.abs()?, DType::F32, on)?;
        for step in 0..3u64 {
            let batch_mean = on_device(&seeded(&[C], seed + 2 + step)?, DType::F32, on)?;
            let batch_var = on_device(&seeded(&[C], seed + 5 + step)?.abs()?, DType::F32, on)?;
            anyhow::ensure!(
                running_stats::supports(&mean, &batch_mean),
                "the in-place update does not run on {on:?} in this build"
            );
            running_stats::update_in_place(&mean, &batch_mean, 0.1, 1.0)?;
            running_stats::update_in_place(&var, &batch_var, 0.1, 4096.0 / 4095.0)?;
        }
        Ok((mean, var))
    };
    let ((mean, var), (mean_r, var_r)) = (run(device)?, run(&Device::Cpu)?);
    Ok(vec![
        ("mean", relative_l2(&mean, &mean_r)?),
        ("var", relative_l2(&var, &var_r)?),
    ])
}

/// A training job's batch uploads (on a GPU through two pinned buffers in turn): five batches queued behind
/// enough work that their copies wait, each read back afterwards. A buffer written again before its copy ran
/// would hand a batch another's values.
fn batch_upload_case(device: &Device) -> anyhow::Result<Vec<(&'static str, f64)>> {
    let shape = (2usize, 3, 64, 64);
    let n = 2 * 3 * 64 * 64;
    // Tens of milliseconds of products on a GPU (8 of 4096³); on the CPU, where nothing is queued, a token.
    let side = if device.is_cpu() { 128 } else { 4096 };
    let busy = Tensor::ones((side, side), DType::F32, device)?;
    let mut queued = busy.clone();
    for _ in 0..8 {
        queued = (queued.matmul(&busy)? * (1.0 / side as f64))?;
    }
    let mut upload = crate::train::batch_upload::Upload::<f32>::new("device-check batches");
    let batches: Vec<Vec<f32>> = (0..5u64)
        .map(|k| seeded(&[n], 990 + k).and_then(|t| t.to_dtype(DType::F32)?.to_vec1::<f32>()))
        .collect::<candle_core::Result<_>>()?;
    let uploaded = batches
        .iter()
        .map(|b| upload.tensor(b.clone(), shape, device))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let expected: Vec<Tensor> = batches
        .into_iter()
        .map(|b| Tensor::from_vec(b, shape, &Device::Cpu))
        .collect::<candle_core::Result<_>>()?;
    drop(queued);
    Ok(vec![(
        "batches",
        relative_l2(&Tensor::stack(&uploaded, 0)?, &Tensor::stack(&expected, 0)?)?,
    )])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_kernels_pass_their_own_device_check() -> anyhow::Result<()> {
        // Without cpu-bf16: it would switch every concurrently running test to bf16 products (the binary's
        // device-check runs it; tests/predict_cli.rs).
        let report = compare_modes(&Device::Cpu, false)?;
        let cases = report["cases"].as_array().expect("cases");
        // fp32 and tf32 (bf16 is skipped on the CPU): (8 conv + 8 fused + 12 batch norm (plain, relu, residual and
        // relu) + 4 × 3 elementwise) each, and the 3 optimizer cases, the running statistics and the batch uploads
        // once.
        assert_eq!(
            cases.len(),
            2 * (2 * CONV_CASES.len() + 3 * BN_CASES.len() + 4 * ELEMENTWISE_CASES.len()) + SGD_CASES.len() + 2,
            "{report:#}"
        );
        let failed: Vec<&Value> = cases.iter().filter(|c| c["pass"] != json!(true)).collect();
        assert!(failed.is_empty(), "failed cases: {failed:#?}");
        assert_eq!(report["pass"], json!(true));
        assert_eq!(report["skipped"][0]["mode"], json!("bf16"));
        Ok(())
    }
}

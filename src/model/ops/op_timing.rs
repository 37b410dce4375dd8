//! Times each op of a training step alone, at DeepLabV3-ResNet-50's shapes for batch 8 at crop 512 (output stride
//! 8), forward and forward + backward, in TF32 and bf16: `semseg device-check --timing`. A whole step's time
//! (`SEMSEG_PROFILE_STEPS=1`) says how much is spent; this says which op spends it.
//!
//! Every figure is the median of a few runs after warm-up, each ended by a device synchronisation. Backward starts
//! from `sum_all` of the output (one broadcast pass of its own).

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor, Var};
use serde_json::{json, Value};

use super::{add_relu, batch_norm, conv, pool, resize};
use crate::model::precision::{self, MathMode};
use crate::train::loss::{cross_entropy, Targets};

const WARMUP: usize = 2;
const RUNS: usize = 5;

/// One op under test: its inputs' shapes and how to apply it.
struct Case {
    name: &'static str,
    /// Shapes of the inputs; the first is the activation (compute dtype), the others parameters (f32).
    shapes: Vec<Vec<usize>>,
    apply: fn(&[Tensor]) -> Result<Tensor>,
}

fn cases(batch: usize) -> Vec<Case> {
    let b = batch;
    vec![
        Case {
            name: "stem conv 7x7 s2 3->64 @512",
            shapes: vec![vec![b, 3, 512, 512], vec![64, 3, 7, 7]],
            apply: |t| conv::conv2d(&t[0], &t[1], 3, 2, 1),
        },
        Case {
            name: "conv 1x1 1024->256 @64",
            shapes: vec![vec![b, 1024, 64, 64], vec![256, 1024, 1, 1]],
            apply: |t| conv::conv2d(&t[0], &t[1], 0, 1, 1),
        },
        Case {
            name: "conv 1x1 256->1024 @64",
            shapes: vec![vec![b, 256, 64, 64], vec![1024, 256, 1, 1]],
            apply: |t| conv::conv2d(&t[0], &t[1], 0, 1, 1),
        },
        Case {
            name: "conv 3x3 d2 256->256 @64",
            shapes: vec![vec![b, 256, 64, 64], vec![256, 256, 3, 3]],
            apply: |t| conv::conv2d(&t[0], &t[1], 2, 1, 2),
        },
        Case {
            name: "conv 3x3 d4 512->512 @64",
            shapes: vec![vec![b, 512, 64, 64], vec![512, 512, 3, 3]],
            apply: |t| conv::conv2d(&t[0], &t[1], 4, 1, 4),
        },
        Case {
            name: "conv 3x3 d12 2048->256 @64 (ASPP)",
            shapes: vec![vec![b, 2048, 64, 64], vec![256, 2048, 3, 3]],
            apply: |t| conv::conv2d(&t[0], &t[1], 12, 1, 12),
        },
        Case {
            name: "batchnorm+relu 256 @64",
            shapes: vec![vec![b, 256, 64, 64], vec![256], vec![256]],
            apply: |t| Ok(batch_norm::batch_norm_train(&t[0], &t[1], &t[2], 1e-5, true)?.0),
        },
        Case {
            name: "batchnorm 1024 @64",
            shapes: vec![vec![b, 1024, 64, 64], vec![1024], vec![1024]],
            apply: |t| Ok(batch_norm::batch_norm_train(&t[0], &t[1], &t[2], 1e-5, false)?.0),
        },
        Case {
            name: "batchnorm+relu 64 @256 (stem)",
            shapes: vec![vec![b, 64, 256, 256], vec![64], vec![64]],
            apply: |t| Ok(batch_norm::batch_norm_train(&t[0], &t[1], &t[2], 1e-5, true)?.0),
        },
        Case {
            name: "batchnorm+add+relu 1024 @64 (block end)",
            shapes: vec![vec![b, 1024, 64, 64], vec![1024], vec![1024], vec![b, 1024, 64, 64]],
            apply: |t| {
                let residual = t[3].to_dtype(t[0].dtype())?;
                Ok(batch_norm::batch_norm_add_relu_train(&t[0], &t[1], &t[2], 1e-5, &residual)?.0)
            },
        },
        Case {
            name: "add+relu 1024 @64",
            shapes: vec![vec![b, 1024, 64, 64], vec![b, 1024, 64, 64]],
            apply: |t| add_relu::add_relu(&t[0], &t[1].to_dtype(t[0].dtype())?),
        },
        Case {
            name: "max pool 3x3 s2 64 @256",
            shapes: vec![vec![b, 64, 256, 256]],
            apply: |t| pool::max_pool_3x3_s2(&t[0]),
        },
        Case {
            name: "bilinear 21 @64 -> 512",
            shapes: vec![vec![b, 21, 64, 64]],
            apply: |t| resize::resize_bilinear(&t[0], 512, 512),
        },
        Case {
            name: "adaptive avg pool 2048 @64 -> 1",
            shapes: vec![vec![b, 2048, 64, 64]],
            apply: |t| pool::adaptive_avg_pool2d(&t[0], 1, 1),
        },
        Case {
            name: "cross-entropy 21 @512",
            shapes: vec![vec![b, 21, 512, 512]],
            apply: |t| {
                let (n, _, h, w) = t[0].dims4()?;
                let labels: Vec<u8> = (0..n * h * w).map(|i| (i % 23) as u8).collect();
                let labels: Vec<u8> = labels.into_iter().map(|l| if l > 20 { 255 } else { l }).collect();
                let targets = Targets::new(&labels, n, h, w, t[0].device())?;
                cross_entropy(&t[0], &targets)
            },
        },
    ]
}

fn median_ms(device: &Device, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..WARMUP {
        f()?;
    }
    device.synchronize()?;
    let mut times = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let start = Instant::now();
        f()?;
        device.synchronize()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[RUNS / 2])
}

/// Times every case on `device` in TF32 (f32 activations) and bf16; the precision in force is restored after.
pub fn time_ops(device: &Device, batch: usize) -> anyhow::Result<Value> {
    let saved = MathMode {
        compute_dtype: DType::F32,
        tf32: precision::tf32_allowed(),
        bf16_products: precision::bf16_products(),
    };
    let mut rows = Vec::new();
    for (mode_name, dtype) in [("tf32", DType::F32), ("bf16", DType::BF16)] {
        precision::install(MathMode {
            compute_dtype: dtype,
            tf32: true,
            bf16_products: false,
        });
        for case in cases(batch) {
            let inputs: Vec<Var> = case
                .shapes
                .iter()
                .enumerate()
                .map(|(i, shape)| {
                    let t = Tensor::randn(0f32, 1f32, shape.as_slice(), device)?;
                    let t = if i == 0 { t.to_dtype(dtype)? } else { t.abs()? };
                    Var::from_tensor(&t)
                })
                .collect::<Result<_>>()?;
            let tensors: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
            let forward = median_ms(device, || (case.apply)(&tensors).map(drop));
            let both = median_ms(device, || {
                let y = (case.apply)(&tensors)?;
                y.to_dtype(DType::F32)?.sum_all()?.backward().map(drop)
            });
            let row = match (forward, both) {
                (Ok(f), Ok(fb)) => {
                    json!({"mode": mode_name, "op": case.name, "forward_ms": f, "forward_backward_ms": fb})
                }
                (f, fb) => json!({
                    "mode": mode_name,
                    "op": case.name,
                    "error": format!("{:?} / {:?}", f.err().map(|e| e.to_string()), fb.err().map(|e| e.to_string())),
                }),
            };
            tracing::info!("{row}");
            rows.push(row);
        }
    }
    precision::install(saved);
    Ok(json!({"batch": batch, "device": format!("{device:?}"), "timings": rows}))
}

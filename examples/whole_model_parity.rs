//! Whole-model parity with PyTorch: loads what `../shared/bench/peer/export_reference.py` wrote (torchvision-named
//! weights, an input PNG, the reference logits) and prints the relative L2 error of our logits, for the folded
//! inference model and the unfolded eval network. Exits with status 1 when either exceeds the bound.
//! Run through `scripts/whole-model-parity.sh`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use semseg::model::{weights, Algorithm, Backbone, InferenceModel, ModelConfig, ModelMeta, OutputStride};
use serde::Deserialize;

const BOUND: f64 = 1e-4;

#[derive(Deserialize)]
struct RefMeta {
    model: String,
    num_classes: usize,
    mean: [f32; 3],
    std: [f32; 3],
    output_stride: u32,
}

fn config(meta: &RefMeta) -> Result<ModelConfig> {
    let (algo, backbone) = meta
        .model
        .split_once("_resnet")
        .context("model name like deeplabv3_resnet50")?;
    let algorithm = match algo {
        "deeplabv3" => Algorithm::Deeplab,
        "pspnet" => Algorithm::Psp,
        other => other.parse()?,
    };
    let backbone: Backbone = format!("resnet-{backbone}").parse()?;
    Ok(ModelConfig::new(
        algorithm,
        backbone,
        meta.num_classes,
        OutputStride::try_from(meta.output_stride)?,
        false,
    )?)
}

fn input(path: &Path, meta: &RefMeta) -> Result<Tensor> {
    let img = image::open(path)
        .with_context(|| format!("reading {}", path.display()))?
        .to_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut chw = vec![0f32; 3 * h * w];
    for (x, y, p) in img.enumerate_pixels() {
        for c in 0..3 {
            chw[c * h * w + y as usize * w + x as usize] = (p[c] as f32 / 255.0 - meta.mean[c]) / meta.std[c];
        }
    }
    Ok(Tensor::from_vec(chw, (1, 3, h, w), &Device::Cpu)?)
}

fn rel_l2(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_dtype(DType::F64)?;
    let b = b.to_dtype(DType::F64)?;
    let num = (&a - &b)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f64>()?;
    Ok(num / b.sqr()?.sum_all()?.sqrt()?.to_scalar::<f64>()?)
}

fn main() -> Result<()> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .context("usage: whole_model_parity DIR (export_reference.py's --out)")?,
    );
    let meta: RefMeta = serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json"))?)?;
    let cfg = config(&meta)?;
    let tensors = candle_core::safetensors::load(dir.join("weights.safetensors"), &Device::Cpu)?;
    let x = input(&dir.join("input.png"), &meta)?;
    let want = Tensor::read_npy(dir.join("logits.npy"))?;

    let net = weights::segmenter_from_tensors(&cfg, tensors.clone(), true, DType::F32, &Device::Cpu)?;
    let t0 = std::time::Instant::now();
    let unfolded = net.logits(&x)?;
    let t_unfolded = t0.elapsed().as_secs_f64();
    let mut model_meta = ModelMeta::new(&cfg);
    model_meta.normalization.mean = meta.mean;
    model_meta.normalization.std = meta.std;
    let model = InferenceModel::from_parts(model_meta, tensors, &Device::Cpu)?;
    let t0 = std::time::Instant::now();
    let folded = model.logits(&x)?;
    let t_folded = t0.elapsed().as_secs_f64();

    let (e_unfolded, e_folded) = (rel_l2(&unfolded, &want)?, rel_l2(&folded, &want)?);
    println!(
        "{{\"model\": \"{}\", \"shape\": {:?}, \"rel_l2_eval\": {e_unfolded:.3e}, \"rel_l2_folded\": {e_folded:.3e}, \
         \"bound\": {BOUND:e}, \"seconds_eval\": {t_unfolded:.2}, \"seconds_folded\": {t_folded:.2}}}",
        meta.model,
        want.dims()
    );
    if e_unfolded > BOUND || e_folded > BOUND {
        bail!("{}: relative L2 error above {BOUND:e}", meta.model);
    }
    Ok(())
}

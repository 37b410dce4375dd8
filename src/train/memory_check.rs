//! Before the first step: can a training step fit in the device's memory at all?
//!
//! A step keeps every tensor its graph holds until backward ends (Candle keeps each op's inputs), and that grows
//! with `mini_batch_size × crop_size²`. Without this check an oversized job is found only when it runs out: on the
//! CPU the kernel's OOM killer ends the process with SIGKILL, so no `output/failure` and no log line say why
//! (FCN-ResNet-50 at crop 2048, batch 6 on a 24 GiB machine: killed after 47 s); on a GPU the allocator fails
//! mid-step.
//!
//! The activations are measured, not tabulated, so the figure follows the code: the job's network, built on the CPU
//! with the same configuration, runs its training forward and loss at two small crops, and the bytes its graph holds
//! ([`graph_bytes`]) give a line in the crop's pixel count (the fixed part is the pooled branches), read off at the
//! job's crop and times its batch. Added to the weights, their gradients and the optimizer's state, that is a lower
//! bound of the step's peak: backward's gradients, cuDNN's workspace and the allocator's slack come on top. So the
//! check fails only a job that cannot fit, and warns from [`WARN_FRACTION`] of the memory available.
//! `SEMSEG_MEMORY_CHECK=off` turns the failure into a warning (machines whose memory is not what Linux or the GPU
//! driver reports).

use anyhow::{Context, Result};
use candle_core::{DType, Device, Storage, Tensor};
use candle_nn::{VarBuilder, VarMap};

use super::loss::{training_loss, Targets};
use crate::compute::Compute;
use crate::model::config::ModelConfig;
use crate::model::precision::Precision;
use crate::model::{weights, SegmentationModel};
use crate::sagemaker::hyperparameters::OptimizerKind;
use crate::sagemaker::Hyperparameters;

/// The crops the probe runs at (multiples of 8, as every crop is; large enough for PSPNet's 6×6 bins at output
/// stride 8).
const PROBE_CROPS: [usize; 2] = [64, 96];
/// Warn when the lower bound reaches this share of the memory available.
pub const WARN_FRACTION: f64 = 0.8;

/// The least memory one training step needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepMemory {
    /// Images per step.
    pub batch: usize,
    /// What the graph of one step holds until backward ends, per image of the batch.
    pub activations_per_image: u64,
    /// Weights, their gradients and the optimizer's state (f32).
    pub parameters: u64,
}

impl StepMemory {
    /// What the graph of one step holds until backward ends: the activations of the batch.
    pub fn activations(&self) -> u64 {
        self.activations_per_image * self.batch as u64
    }

    pub fn total(&self) -> u64 {
        self.activations() + self.parameters
    }

    /// The largest batch whose step fits in `available` by this bound (0 when not even one image does).
    pub fn largest_batch(&self, available: u64) -> u64 {
        available.saturating_sub(self.parameters) / self.activations_per_image.max(1)
    }

    /// The bound in words: "a training step at crop_size … needs at least … GiB (… of activations …)".
    pub fn describe(&self, crop: u32) -> String {
        format!(
            "a training step at crop_size {crop} with batches of {} needs at least {:.1} GiB ({:.1} GiB of \
             activations kept for backward, {:.2} GiB of weights, gradients and optimizer state)",
            self.batch,
            gib(self.total()),
            gib(self.activations()),
            gib(self.parameters)
        )
    }
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// `bytes` in GiB with two decimals, as the log lines' `*_gib` fields give them.
pub fn gib_two_places(bytes: u64) -> String {
    format!("{:.2}", gib(bytes))
}

/// The bound for `config` at `crop`×`crop`, batches of `batch`, activations in `compute_dtype`, trained by `optimizer`.
pub fn estimate(
    config: &ModelConfig,
    compute_dtype: DType,
    optimizer: OptimizerKind,
    batch: usize,
    crop: usize,
) -> Result<StepMemory> {
    let varmap = VarMap::new();
    let model = SegmentationModel::new(config, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))
        .context("building the network to measure its activations")?;
    let [small, large] = PROBE_CROPS.map(|size| probe(&model, config.num_classes, size));
    let (small, large) = (small?, large?);
    // bytes(pixels) = fixed + slope · pixels, through the two probes.
    let (p_small, p_large) = (
        (PROBE_CROPS[0] * PROBE_CROPS[0]) as f64,
        (PROBE_CROPS[1] * PROBE_CROPS[1]) as f64,
    );
    let slope = (large as f64 - small as f64) / (p_large - p_small);
    let fixed = (small as f64 - slope * p_small).max(0.0);
    let f32_per_image = fixed + slope * (crop * crop) as f64;
    // In bf16 every activation is at least half its f32 size (a few, such as the logits for the loss, stay f32).
    let per_image = (f32_per_image * compute_dtype.size_in_bytes() as f64 / 4.0) as u64;

    let parameter_count: usize = weights::trainable_vars(&varmap)
        .iter()
        .map(|(_, var)| var.elem_count())
        .sum();
    let copies = 2 + state_tensors_per_parameter(optimizer); // weight, gradient, state
    Ok(StepMemory {
        batch,
        activations_per_image: per_image,
        parameters: (parameter_count * copies * 4) as u64,
    })
}

/// What the graph of one training forward and loss holds per image at `size`×`size` (a batch of 2: the pooled
/// branches' BatchNorms need two values per channel in training).
fn probe(model: &SegmentationModel, num_classes: usize, size: usize) -> Result<usize> {
    Ok(graph_bytes_of_step(model, num_classes, PROBE_BATCH, size)? / PROBE_BATCH)
}

const PROBE_BATCH: usize = 2;

/// What the graph of a training forward and loss holds for a batch of `batch` images of `size`×`size`.
fn graph_bytes_of_step(model: &SegmentationModel, num_classes: usize, batch: usize, size: usize) -> Result<usize> {
    let x = Tensor::zeros((batch, 3, size, size), DType::F32, &Device::Cpu)?;
    let labels: Vec<u8> = (0..batch * size * size).map(|i| (i % num_classes) as u8).collect();
    let targets = Targets::new(&labels, batch, size, size, &Device::Cpu)?;
    let output = model.forward_t(&x, true)?;
    Ok(graph_bytes(&training_loss(&output, &targets)?))
}

/// The fewest state tensors of a parameter's size each optimizer keeps (momentum buffer, moment estimates...).
fn state_tensors_per_parameter(optimizer: OptimizerKind) -> usize {
    match optimizer {
        OptimizerKind::Adam => 2,
        OptimizerKind::Sgd | OptimizerKind::Nag | OptimizerKind::Adagrad | OptimizerKind::Rmsprop => 1,
    }
}

/// Bytes of the distinct CPU storages the graph of `loss` holds until backward ends (Candle keeps every op's
/// inputs): the activations a step keeps, variables (the weights) excluded.
pub fn graph_bytes(loss: &Tensor) -> usize {
    use candle_core::CpuStorage;
    let mut seen = std::collections::HashSet::new();
    let mut bytes = 0;
    for node in loss.sorted_nodes() {
        if node.is_variable() {
            continue;
        }
        let (storage, _) = node.storage_and_layout();
        if !seen.insert(&*storage as *const Storage as usize) {
            continue;
        }
        bytes += match &*storage {
            Storage::Cpu(CpuStorage::F32(v)) => v.len() * 4,
            Storage::Cpu(CpuStorage::F64(v)) => v.len() * 8,
            Storage::Cpu(CpuStorage::BF16(v)) => v.len() * 2,
            Storage::Cpu(CpuStorage::U32(v)) => v.len() * 4,
            Storage::Cpu(CpuStorage::U8(v)) => v.len(),
            _ => 0,
        };
    }
    bytes
}

/// What the check concluded.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Fits,
    /// Within [`WARN_FRACTION`] of the memory available: the step's transients may not fit.
    Tight(String),
    DoesNotFit(String),
}

/// Compare the bound with the `available` bytes of `device` (named as in the message: "the machine", "cuda:0").
pub fn judge(need: &StepMemory, available: u64, device: &str, crop: u32) -> Verdict {
    let total = need.total();
    let figures = format!(
        "{}, and {device} has {:.1} GiB available",
        need.describe(crop),
        gib(available)
    );
    if total > available {
        let advice = match need.largest_batch(available) {
            0 => "lower crop_size: not even one image of this crop fits".to_string(),
            1 => "lower mini_batch_size to 1, or crop_size (the activations grow with mini_batch_size × crop_size²)"
                .to_string(),
            fits => format!(
                "lower mini_batch_size to {fits} or less, or crop_size (the activations grow with mini_batch_size × \
                 crop_size²)"
            ),
        };
        Verdict::DoesNotFit(format!("not enough memory for training: {figures}; {advice}"))
    } else if total as f64 > WARN_FRACTION * available as f64 {
        Verdict::Tight(format!(
            "memory is tight: {figures}; backward's gradients and the allocator need more than that, so the job may \
             run out of memory"
        ))
    } else {
        Verdict::Fits
    }
}

/// Fails a job whose step cannot fit in `compute`'s memory before it starts, naming the figures and the batch that
/// would fit; warns when it fits narrowly; logs the bound either way. `SEMSEG_MEMORY_CHECK=off` makes the failure a
/// warning.
pub fn check(config: &ModelConfig, hp: &Hyperparameters, batch: usize, compute: &Compute) -> Result<()> {
    let Some(available) = crate::free_memory::available(&compute.device) else {
        tracing::info!("the device does not report its free memory; the step's memory is not checked");
        return Ok(());
    };
    let need = estimate(
        config,
        compute.mode.compute_dtype,
        hp.optimizer,
        batch,
        hp.crop_size as usize,
    )?;
    tracing::info!(
        at_least_gib = gib_two_places(need.total()),
        activations_gib = gib_two_places(need.activations()),
        available_gib = gib_two_places(available),
        "memory of a training step (a lower bound: the activations kept for backward, weights, gradients and \
         optimizer state)"
    );
    let device = match compute.device {
        Device::Cpu => "the machine".to_string(),
        ref gpu => crate::compute::describe(gpu),
    };
    match judge(&need, available, &device, hp.crop_size) {
        Verdict::Fits => Ok(()),
        Verdict::Tight(warning) => {
            tracing::warn!("{warning}");
            Ok(())
        }
        Verdict::DoesNotFit(reason) if disabled() => {
            tracing::warn!("{reason} (SEMSEG_MEMORY_CHECK=off: trying anyway)");
            Ok(())
        }
        Verdict::DoesNotFit(reason) => anyhow::bail!("{reason} (SEMSEG_MEMORY_CHECK=off tries anyway)"),
    }
}

/// For `semseg check`, which opens no device: logs the bound for the job's settings, activations in bf16 when
/// `precision=bf16` (as a GPU runs them), else f32.
pub fn report(config: &ModelConfig, hp: &Hyperparameters, batch: usize) -> Result<()> {
    let dtype = match hp.precision {
        Precision::Bf16 => DType::BF16,
        Precision::Auto | Precision::Fp32 => DType::F32,
    };
    let need = estimate(config, dtype, hp.optimizer, batch, hp.crop_size as usize)?;
    tracing::info!(
        "memory: {}; the training instance's GPU (or its memory, on a CPU instance) needs that much free, and more \
         for backward's gradients and the allocator",
        need.describe(hp.crop_size)
    );
    Ok(())
}

fn disabled() -> bool {
    std::env::var("SEMSEG_MEMORY_CHECK").is_ok_and(|v| matches!(v.trim(), "off" | "0" | "false" | "no"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::{Algorithm, Backbone, OutputStride};

    fn measured(config: &ModelConfig, batch: usize, size: usize) -> usize {
        let varmap = VarMap::new();
        let model =
            SegmentationModel::new(config, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)).expect("model");
        graph_bytes_of_step(&model, config.num_classes, batch, size).expect("step")
    }

    #[test]
    fn the_line_through_two_probes_predicts_a_larger_crop_and_batch() {
        for algorithm in [Algorithm::Fcn, Algorithm::Psp, Algorithm::Deeplab] {
            let config = ModelConfig::new(algorithm, Backbone::Resnet18, 3, OutputStride::Eight, true).expect("cfg");
            let bound = estimate(&config, DType::F32, OptimizerKind::Sgd, 3, 160).expect("estimate");
            let actual = measured(&config, 3, 160) as f64;
            let error = (bound.activations() as f64 - actual).abs() / actual;
            assert!(
                error < 0.02,
                "{algorithm:?}: estimated {} bytes, measured {actual}",
                bound.activations()
            );
        }
    }

    #[test]
    fn parameters_count_weight_gradient_and_optimizer_state() {
        let config = ModelConfig::new(Algorithm::Fcn, Backbone::Resnet18, 3, OutputStride::Eight, true).expect("cfg");
        let varmap = VarMap::new();
        SegmentationModel::new(&config, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)).expect("model");
        let count: usize = weights::trainable_vars(&varmap)
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum();
        let sgd = estimate(&config, DType::F32, OptimizerKind::Sgd, 1, 64).expect("sgd");
        let adam = estimate(&config, DType::F32, OptimizerKind::Adam, 1, 64).expect("adam");
        assert_eq!(sgd.parameters, (count * 3 * 4) as u64);
        assert_eq!(adam.parameters, (count * 4 * 4) as u64);
        let bf16 = estimate(&config, DType::BF16, OptimizerKind::Sgd, 1, 64).expect("bf16");
        let (bf16, f32) = (bf16.activations(), sgd.activations());
        assert!(bf16 * 2 <= f32 + 1 && bf16 * 2 + 2 >= f32);
    }

    #[test]
    fn the_verdict_fails_what_cannot_fit_and_says_what_batch_would() {
        const GIB: u64 = 1 << 30;
        let need = StepMemory {
            batch: 8,
            activations_per_image: 3 * GIB,
            parameters: GIB,
        };
        let Verdict::DoesNotFit(message) = judge(&need, 20 * GIB, "the machine", 1024) else {
            panic!("25 GiB cannot fit in 20")
        };
        assert!(message.contains("crop_size 1024 with batches of 8"), "{message}");
        assert!(message.contains("needs at least 25.0 GiB"), "{message}");
        assert!(message.contains("has 20.0 GiB available"), "{message}");
        assert!(message.contains("lower mini_batch_size to 6 or less"), "{message}");

        let Verdict::DoesNotFit(message) = judge(&need, 2 * GIB, "cuda:0", 1024) else {
            panic!("not even one image fits")
        };
        assert!(message.contains("lower crop_size"), "{message}");

        assert!(matches!(judge(&need, 30 * GIB, "m", 1024), Verdict::Tight(_)));
        assert_eq!(judge(&need, 32 * GIB, "m", 1024), Verdict::Fits);
    }
}

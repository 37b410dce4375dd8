//! Per-pixel cross-entropy that ignores label 255: the mean over counted pixels, and exactly 0 (not NaN) for a
//! batch with no counted pixel.
//!
//! On the CPU it is one op: forward one pass per pixel over its classes (max, log-sum-exp, the target's term),
//! backward one pass writing `softmax − one-hot`, in parallel over pixel blocks. Composed from Candle's ops
//! (log-softmax over the class axis, gather, multiply, sum) it took 357 ms forward and backward for one 21-class
//! 512×512 map on 2 cores (2026-11-28). On CUDA one kernel gives each pixel's loss (summed by Candle) and one its
//! gradient (`elementwise_cuda`); other devices keep the composed ops.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::batch_upload::Upload;
use crate::data::IGNORE_LABEL;
use crate::model::SegOutput;

/// Labels of one batch prepared for the loss: class indices (ignored pixels set to 0) and a 0/1 weight mask.
pub struct Targets {
    /// [N, 1, H, W] u32 class indices.
    indices: Tensor,
    /// [N, 1, H, W] f32, 0 where the label is 255.
    weights: Tensor,
    /// The labels as given, [N, H, W] row-major (255 = ignore), for the CPU op.
    labels: Arc<[u8]>,
    counted: usize,
}

/// The uploads a training job reuses step after step for its batches' targets ([`Targets::upload`]).
pub struct TargetUploads {
    indices: Upload<u32>,
    weights: Upload<f32>,
}

impl Default for TargetUploads {
    fn default() -> Self {
        Self {
            indices: Upload::new("class indices"),
            weights: Upload::new("label weights"),
        }
    }
}

impl Targets {
    /// `labels` is [N, H, W] row-major.
    pub fn new(labels: &[u8], n: usize, height: usize, width: usize, device: &Device) -> Result<Self> {
        let shape = (n, 1, height, width);
        Self::build(labels, |indices, weights| {
            Ok((
                Tensor::from_vec(indices, shape, device)?,
                Tensor::from_vec(weights, shape, device)?,
            ))
        })
    }

    /// [`Self::new`] through a training job's `uploads` (on a GPU, pinned buffers the host does not wait for).
    pub fn upload(
        labels: &[u8],
        (n, height, width): (usize, usize, usize),
        device: &Device,
        uploads: &mut TargetUploads,
    ) -> Result<Self> {
        let shape = (n, 1, height, width);
        Self::build(labels, |indices, weights| {
            Ok((
                uploads.indices.tensor(indices, shape, device)?,
                uploads.weights.tensor(weights, shape, device)?,
            ))
        })
    }

    /// The indices and weights of `labels`, made tensors by `to_device`.
    fn build(labels: &[u8], to_device: impl FnOnce(Vec<u32>, Vec<f32>) -> Result<(Tensor, Tensor)>) -> Result<Self> {
        let indices: Vec<u32> = labels
            .iter()
            .map(|&l| if l == IGNORE_LABEL { 0 } else { u32::from(l) })
            .collect();
        let weights: Vec<f32> = labels
            .iter()
            .map(|&l| if l == IGNORE_LABEL { 0.0 } else { 1.0 })
            .collect();
        let counted = weights.iter().filter(|&&w| w > 0.0).count();
        let (indices, weights) = to_device(indices, weights)?;
        Ok(Self {
            indices,
            weights,
            labels: labels.into(),
            counted,
        })
    }

    pub fn counted(&self) -> usize {
        self.counted
    }
}

/// Weight of the auxiliary head's loss (GluonCV and torchvision use 0.4).
pub const AUX_LOSS_WEIGHT: f64 = 0.4;

/// A training step's loss: the main head's cross-entropy plus [`AUX_LOSS_WEIGHT`] times the auxiliary head's.
pub fn training_loss(output: &SegOutput, targets: &Targets) -> Result<Tensor> {
    let loss = cross_entropy(&output.out, targets)?;
    match &output.aux {
        Some(aux) => loss + (cross_entropy(aux, targets)? * AUX_LOSS_WEIGHT)?,
        None => Ok(loss),
    }
}

/// Mean cross-entropy of `logits` [N, C, H, W] against `targets` over the pixels that are not ignored.
pub fn cross_entropy(logits: &Tensor, targets: &Targets) -> Result<Tensor> {
    let logits = logits.to_dtype(DType::F32)?;
    let classes = logits.dim(1)?;
    if let Some(&bad) = targets
        .labels
        .iter()
        .find(|&&l| l != IGNORE_LABEL && usize::from(l) >= classes)
    {
        candle_core::bail!("cross-entropy: label {bad} is not below the {classes} classes of the logits")
    }
    if logits.device().is_cpu() {
        return logits.contiguous()?.apply_op1(SoftmaxCrossEntropy {
            labels: Arc::clone(&targets.labels),
            counted: targets.counted,
        });
    }
    #[cfg(feature = "cuda")]
    if logits.device().is_cuda() {
        let per_pixel =
            crate::model::ops::elementwise_cuda::pixel_cross_entropy(&logits, &targets.indices, &targets.weights)?;
        return per_pixel.sum_all()? / targets.counted.max(1) as f64;
    }
    let log_probs = candle_nn::ops::log_softmax(&logits, 1)?; // [N, C, H, W]
    let picked = log_probs.gather(&targets.indices, 1)?; // [N, 1, H, W]
    let total = (picked * &targets.weights)?.sum_all()?;
    // An all-ignored batch gives 0 · (…) / 1 = 0 with a zero gradient, never 0/0.
    total.neg()? / targets.counted.max(1) as f64
}

/// Pixels per parallel task of the CPU op.
const PIXEL_BLOCK: usize = 1024;

/// The CPU op: `[N, C, H, W]` f32 logits → the scalar mean loss.
struct SoftmaxCrossEntropy {
    labels: Arc<[u8]>,
    counted: usize,
}

/// The logits of one batch as `[N, C, HW]`, checked against the labels' count.
fn planes<'a>(s: &'a CpuStorage, l: &Layout, labels: &[u8]) -> Result<(&'a [f32], usize, usize)> {
    let CpuStorage::F32(x) = s else {
        candle_core::bail!("cross-entropy: f32 logits expected")
    };
    let x = crate::model::ops::contiguous_slice(x, l, "cross-entropy")?;
    let (n, c, h, w) = l.shape().dims4()?;
    if labels.len() != n * h * w {
        candle_core::bail!("cross-entropy: {} labels for logits {:?}", labels.len(), l.shape())
    }
    // Labels below C were checked by `cross_entropy`.
    Ok((x, c, h * w))
}

/// Calls `f(image, first pixel, pixel count)` for every block of pixels, in parallel.
fn pixel_blocks(n: usize, hw: usize) -> impl ParallelIterator<Item = (usize, usize, usize)> {
    let per_image = hw.div_ceil(PIXEL_BLOCK);
    (0..n * per_image).into_par_iter().map(move |i| {
        let (image, block) = (i / per_image, i % per_image);
        let p0 = block * PIXEL_BLOCK;
        (image, p0, PIXEL_BLOCK.min(hw - p0))
    })
}

/// Per pixel of one block: the logits' maximum and the log of the sum of exp(logit − max).
fn log_sum_exp(x: &[f32], (c, hw): (usize, usize), base: usize, p0: usize, len: usize) -> (Vec<f32>, Vec<f32>) {
    let mut max = x[base + p0..base + p0 + len].to_vec();
    for k in 1..c {
        let row = &x[base + k * hw + p0..base + k * hw + p0 + len];
        for (m, &v) in max.iter_mut().zip(row) {
            *m = m.max(v);
        }
    }
    let mut sum = vec![0f32; len];
    for k in 0..c {
        let row = &x[base + k * hw + p0..base + k * hw + p0 + len];
        for ((s, &v), &m) in sum.iter_mut().zip(row).zip(&max) {
            *s += (v - m).exp();
        }
    }
    let lse = sum.iter().map(|s| s.ln()).collect();
    (max, lse)
}

impl CustomOp1 for SoftmaxCrossEntropy {
    fn name(&self) -> &'static str {
        "semseg-softmax-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, c, hw) = planes(s, l, &self.labels)?;
        let n = l.shape().dims()[0];
        let total: f64 = pixel_blocks(n, hw)
            .map(|(image, p0, len)| {
                let base = image * c * hw;
                let (max, lse) = log_sum_exp(x, (c, hw), base, p0, len);
                let labels = &self.labels[image * hw + p0..image * hw + p0 + len];
                let mut sum = 0f64;
                for (j, &label) in labels.iter().enumerate() {
                    if label != IGNORE_LABEL {
                        let target = x[base + usize::from(label) * hw + p0 + j];
                        sum += f64::from(lse[j] + max[j] - target);
                    }
                }
                sum
            })
            .sum();
        let loss = (total / self.counted.max(1) as f64) as f32;
        Ok((CpuStorage::F32(vec![loss]), Shape::from_dims(&[])))
    }

    fn bwd(&self, logits: &Tensor, _loss: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = grad.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.to_scalar::<f32>()?;
        let op = SoftmaxCrossEntropyBackward {
            labels: Arc::clone(&self.labels),
            scale: g / self.counted.max(1) as f32,
        };
        Ok(Some(logits.apply_op1_no_bwd(&op)?))
    }
}

/// `logits → scale · weight · (softmax − one-hot)`, zero at ignored pixels.
struct SoftmaxCrossEntropyBackward {
    labels: Arc<[u8]>,
    scale: f32,
}

impl CustomOp1 for SoftmaxCrossEntropyBackward {
    fn name(&self) -> &'static str {
        "semseg-softmax-cross-entropy-backward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, c, hw) = planes(s, l, &self.labels)?;
        let n = l.shape().dims()[0];
        let blocks: Vec<(usize, usize, Vec<f32>)> = pixel_blocks(n, hw)
            .map(|(image, p0, len)| {
                let base = image * c * hw;
                let (max, lse) = log_sum_exp(x, (c, hw), base, p0, len);
                let labels = &self.labels[image * hw + p0..image * hw + p0 + len];
                // [C, len]: this block's gradient, class-major as in the logits.
                let mut out = vec![0f32; c * len];
                for k in 0..c {
                    let row = &x[base + k * hw + p0..base + k * hw + p0 + len];
                    let dst = &mut out[k * len..(k + 1) * len];
                    for j in 0..len {
                        if labels[j] == IGNORE_LABEL {
                            continue;
                        }
                        let p = (row[j] - max[j] - lse[j]).exp();
                        let hot = if usize::from(labels[j]) == k { 1.0 } else { 0.0 };
                        dst[j] = self.scale * (p - hot);
                    }
                }
                (image, p0, out)
            })
            .collect();
        let mut dx = vec![0f32; x.len()];
        for (image, p0, out) in blocks {
            let len = out.len() / c;
            for k in 0..c {
                let start = image * c * hw + k * hw + p0;
                dx[start..start + len].copy_from_slice(&out[k * len..(k + 1) * len]);
            }
        }
        Ok((CpuStorage::F32(dx), l.shape().clone()))
    }
}

/// Steps whose losses a GPU job reads back at once.
const GPU_LOSS_READ_EVERY: usize = 16;

/// An epoch's training losses, left on the device and read back in groups. Reading a value back waits for the
/// device to finish everything queued before it: read every step, the CPU could not queue step k + 1 while the GPU
/// ran step k, and the GPU idled at every step's end. On the CPU each loss is read at once (it costs nothing).
pub struct EpochLoss {
    /// Detached scalars (no graph kept), not yet read.
    pending: Vec<Tensor>,
    read_every: usize,
    sum: f64,
    count: usize,
}

impl EpochLoss {
    pub fn new(device: &Device) -> Self {
        Self {
            pending: Vec::new(),
            read_every: if device.is_cpu() { 1 } else { GPU_LOSS_READ_EVERY },
            sum: 0.0,
            count: 0,
        }
    }

    /// Adds a step's loss; when a group is complete, reads it. Returns the first non-finite loss read, if any.
    pub fn push(&mut self, loss: &Tensor) -> Result<Option<f32>> {
        self.pending.push(loss.detach());
        if self.pending.len() >= self.read_every {
            return self.read();
        }
        Ok(None)
    }

    /// Reads what is pending (at the epoch's end). Returns the first non-finite loss, if any.
    pub fn read(&mut self) -> Result<Option<f32>> {
        if self.pending.is_empty() {
            return Ok(None);
        }
        let values = Tensor::stack(&self.pending, 0)?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        self.pending.clear();
        for value in values {
            if !value.is_finite() {
                return Ok(Some(value));
            }
            self.sum += f64::from(value);
            self.count += 1;
        }
        Ok(None)
    }

    /// The mean of the losses read so far (0 before any).
    pub fn mean(&self) -> f64 {
        self.sum / self.count.max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_hand_computed_value_and_ignores_255() {
        let device = Device::Cpu;
        // Two classes, 1×1×1×3 pixels; logits (0, ln 3) → p(class 1) = 3/4.
        let l3 = 3f32.ln();
        let logits = Tensor::from_vec(vec![0.0f32, 0.0, 0.0, l3, l3, l3], (1, 2, 1, 3), &device).unwrap();
        let targets = Targets::new(&[1, 0, 255], 1, 1, 3, &device).unwrap();
        assert_eq!(targets.counted(), 2);
        let loss = cross_entropy(&logits, &targets).unwrap().to_scalar::<f32>().unwrap();
        let expected = (-(0.75f32).ln() - (0.25f32).ln()) / 2.0;
        assert!((loss - expected).abs() < 1e-6, "{loss} vs {expected}");
    }

    #[test]
    fn an_all_ignored_batch_gives_zero_loss_and_gradient_not_nan() {
        let device = Device::Cpu;
        let var = candle_core::Var::from_tensor(&Tensor::ones((1, 3, 2, 2), DType::F32, &device).unwrap()).unwrap();
        let targets = Targets::new(&[255; 4], 1, 2, 2, &device).unwrap();
        let loss = cross_entropy(var.as_tensor(), &targets).unwrap();
        assert_eq!(loss.to_scalar::<f32>().unwrap(), 0.0);
        let grads = loss.backward().unwrap();
        let grad = grads
            .get(&var)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(grad.iter().all(|g| *g == 0.0), "{grad:?}");
    }

    /// The CPU op against the composed ops (the other devices' path) in f64: loss and gradient, with ignored
    /// pixels, several images and a map wider than one pixel block.
    #[test]
    fn cpu_op_matches_the_composed_loss() {
        let (n, c, h, w) = (2, 5, 9, 130);
        let logits = crate::model::ops::gradcheck::seeded(&[n, c, h, w], 3).unwrap() * 4.0;
        let logits = logits.unwrap();
        let labels: Vec<u8> = (0..n * h * w)
            .map(|i| if i % 7 == 3 { 255 } else { (i * 13 % c) as u8 })
            .collect();
        let targets = Targets::new(&labels, n, h, w, &Device::Cpu).unwrap();
        let var = candle_core::Var::from_tensor(&logits.to_dtype(DType::F32).unwrap()).unwrap();
        let loss = cross_entropy(var.as_tensor(), &targets).unwrap();
        let grad = loss
            .backward()
            .unwrap()
            .get(&var)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();

        let x64 = candle_core::Var::from_tensor(&logits).unwrap();
        let indices = targets.indices.to_dtype(DType::U32).unwrap();
        let weights = targets.weights.to_dtype(DType::F64).unwrap();
        let log_probs = candle_nn::ops::log_softmax(x64.as_tensor(), 1).unwrap();
        let want = ((log_probs.gather(&indices, 1).unwrap() * weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .neg()
            .unwrap()
            / targets.counted as f64)
            .unwrap();
        let want_grad = want.backward().unwrap().get(&x64).unwrap().clone();
        let (got, want) = (
            f64::from(loss.to_scalar::<f32>().unwrap()),
            want.to_scalar::<f64>().unwrap(),
        );
        assert!((got - want).abs() < 1e-5 * want.abs(), "loss {got} vs {want}");
        let diff = (grad - want_grad)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap();
        assert!(diff.to_scalar::<f64>().unwrap() < 1e-6);
    }

    #[test]
    fn a_label_beyond_the_classes_is_an_error_naming_it() {
        let logits = Tensor::zeros((1, 3, 1, 2), DType::F32, &Device::Cpu).unwrap();
        let targets = Targets::new(&[1, 7], 1, 1, 2, &Device::Cpu).unwrap();
        let err = cross_entropy(&logits, &targets).unwrap_err().to_string();
        assert!(err.contains("label 7") && err.contains("3 classes"), "{err}");
    }

    #[test]
    fn gradient_is_softmax_minus_one_hot_over_the_count() {
        let device = Device::Cpu;
        let var = candle_core::Var::from_tensor(&Tensor::zeros((1, 2, 1, 2), DType::F32, &device).unwrap()).unwrap();
        let targets = Targets::new(&[0, 255], 1, 1, 2, &device).unwrap();
        let grads = cross_entropy(var.as_tensor(), &targets).unwrap().backward().unwrap();
        let grad = grads
            .get(&var)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // Layout [c0p0, c0p1, c1p0, c1p1]: pixel 0 has softmax (0.5, 0.5) and target 0; pixel 1 is ignored.
        assert_eq!(grad, vec![-0.5, 0.0, 0.5, 0.0]);
    }

    #[test]
    fn the_epoch_loss_averages_what_it_reads_and_stops_at_the_first_non_finite_value() -> Result<()> {
        let device = Device::Cpu;
        let mut epoch = EpochLoss::new(&device);
        for v in [1.0f32, 2.0, 4.5] {
            assert_eq!(epoch.push(&Tensor::new(v, &device)?)?, None);
        }
        assert_eq!(epoch.read()?, None);
        assert!((epoch.mean() - 2.5).abs() < 1e-12);

        // In groups (as on a GPU): nothing is read until the group is complete, then the first NaN is named.
        let mut grouped = EpochLoss {
            read_every: 3,
            ..EpochLoss::new(&device)
        };
        assert_eq!(grouped.push(&Tensor::new(1f32, &device)?)?, None);
        assert_eq!(grouped.push(&Tensor::new(f32::NAN, &device)?)?, None);
        assert_eq!(grouped.mean(), 0.0, "nothing read yet");
        let found = grouped.push(&Tensor::new(f32::INFINITY, &device)?)?;
        assert!(found.is_some_and(f32::is_nan), "{found:?}");

        // The end of an epoch reads a partial group.
        let mut partial = EpochLoss {
            read_every: 16,
            ..EpochLoss::new(&device)
        };
        partial.push(&Tensor::new(3f32, &device)?)?;
        assert_eq!(partial.read()?, None);
        assert_eq!(partial.mean(), 3.0);
        Ok(())
    }

    #[test]
    fn the_epoch_loss_keeps_no_graph() -> Result<()> {
        let device = Device::Cpu;
        let x = candle_core::Var::new(&[1f32, 2.0, 3.0], &device)?;
        let loss = (x.as_tensor() * 2.0)?.sum_all()?;
        let mut epoch = EpochLoss {
            read_every: 16,
            ..EpochLoss::new(&device)
        };
        epoch.push(&loss)?;
        assert!(!loss.sorted_nodes().is_empty());
        assert!(
            epoch.pending[0].sorted_nodes().is_empty(),
            "the pending loss must not hold the step's graph"
        );
        Ok(())
    }
}

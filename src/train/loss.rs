//! Per-pixel cross-entropy that ignores label 255: the mean over counted pixels, and exactly 0 (not NaN) for a
//! batch with no counted pixel.

use candle_core::{DType, Device, Result, Tensor};

use crate::data::IGNORE_LABEL;

/// Labels of one batch prepared for the loss: class indices (ignored pixels set to 0) and a 0/1 weight mask.
pub struct Targets {
    /// [N, 1, H, W] u32 class indices.
    indices: Tensor,
    /// [N, 1, H, W] f32, 0 where the label is 255.
    weights: Tensor,
    counted: usize,
}

impl Targets {
    /// `labels` is [N, H, W] row-major.
    pub fn new(labels: &[u8], n: usize, height: usize, width: usize, device: &Device) -> Result<Self> {
        let indices: Vec<u32> = labels
            .iter()
            .map(|&l| if l == IGNORE_LABEL { 0 } else { u32::from(l) })
            .collect();
        let weights: Vec<f32> = labels
            .iter()
            .map(|&l| if l == IGNORE_LABEL { 0.0 } else { 1.0 })
            .collect();
        let counted = weights.iter().filter(|&&w| w > 0.0).count();
        Ok(Self {
            indices: Tensor::from_vec(indices, (n, 1, height, width), device)?,
            weights: Tensor::from_vec(weights, (n, 1, height, width), device)?,
            counted,
        })
    }

    pub fn counted(&self) -> usize {
        self.counted
    }
}

/// Mean cross-entropy of `logits` [N, C, H, W] against `targets` over the pixels that are not ignored.
pub fn cross_entropy(logits: &Tensor, targets: &Targets) -> Result<Tensor> {
    let log_probs = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, 1)?; // [N, C, H, W]
    let picked = log_probs.gather(&targets.indices, 1)?; // [N, 1, H, W]
    let total = (picked * &targets.weights)?.sum_all()?;
    // An all-ignored batch gives 0 · (…) / 1 = 0 with a zero gradient, never 0/0.
    total.neg()? / targets.counted.max(1) as f64
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
}

//! Validation metrics from a confusion matrix: mIOU (mean over classes that appear in prediction or truth) and
//! pixel accuracy, with 255 ignored, as the built-in algorithm reports them.

use serde::Serialize;

use crate::data::IGNORE_LABEL;

/// Counts of (true label, predicted label) over all scored pixels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfusionMatrix {
    num_classes: usize,
    /// Row-major [truth][prediction].
    counts: Vec<u64>,
}

/// The numbers a validation pass reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scores {
    pub miou: f64,
    pub pixel_accuracy: f64,
    /// IoU per class; `None` for a class absent from both prediction and truth.
    pub class_iou: Vec<Option<f64>>,
}

impl ConfusionMatrix {
    pub fn new(num_classes: usize) -> Self {
        Self { num_classes, counts: vec![0; num_classes * num_classes] }
    }

    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// Add one batch. Pixels labelled 255 are skipped; truth labels ≥ num_classes are too (validation has already
    /// rejected them, this keeps the matrix safe); predictions are always < num_classes.
    pub fn update(&mut self, truth: &[u8], prediction: &[u8]) {
        debug_assert_eq!(truth.len(), prediction.len());
        let n = self.num_classes;
        for (&t, &p) in truth.iter().zip(prediction) {
            if t == IGNORE_LABEL || usize::from(t) >= n || usize::from(p) >= n {
                continue;
            }
            self.counts[usize::from(t) * n + usize::from(p)] += 1;
        }
    }

    pub fn merge(&mut self, other: &ConfusionMatrix) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
    }

    pub fn scores(&self) -> Scores {
        let n = self.num_classes;
        let at = |t: usize, p: usize| self.counts[t * n + p];
        let total: u64 = self.counts.iter().sum();
        let correct: u64 = (0..n).map(|c| at(c, c)).sum();
        let class_iou: Vec<Option<f64>> = (0..n)
            .map(|c| {
                let truth: u64 = (0..n).map(|p| at(c, p)).sum();
                let predicted: u64 = (0..n).map(|t| at(t, c)).sum();
                let union = truth + predicted - at(c, c);
                (union > 0).then(|| at(c, c) as f64 / union as f64)
            })
            .collect();
        let present: Vec<f64> = class_iou.iter().flatten().copied().collect();
        let miou = if present.is_empty() { 0.0 } else { present.iter().sum::<f64>() / present.len() as f64 };
        let pixel_accuracy = if total == 0 { 0.0 } else { correct as f64 / total as f64 };
        Scores { miou, pixel_accuracy, class_iou }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perfect_prediction_scores_one() {
        let mut m = ConfusionMatrix::new(3);
        m.update(&[0, 1, 2, 2], &[0, 1, 2, 2]);
        let s = m.scores();
        assert_eq!((s.miou, s.pixel_accuracy), (1.0, 1.0));
    }

    #[test]
    fn ignored_pixels_do_not_count_and_absent_classes_are_not_averaged() {
        let mut m = ConfusionMatrix::new(4);
        // Class 0: tp 1, fp 1 (a 1 predicted as 0), fn 0 → 1/2. Class 1: tp 1, fn 1 → 1/2. Class 2, 3 absent.
        m.update(&[0, 1, 1, 255, 255], &[0, 1, 0, 3, 2]);
        let s = m.scores();
        assert_eq!(s.class_iou, vec![Some(0.5), Some(0.5), None, None]);
        assert_eq!(s.miou, 0.5);
        assert!((s.pixel_accuracy - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn a_class_only_predicted_counts_with_zero_iou() {
        let mut m = ConfusionMatrix::new(3);
        m.update(&[0, 0], &[0, 2]);
        let s = m.scores();
        assert_eq!(s.class_iou, vec![Some(0.5), None, Some(0.0)]);
        assert_eq!(s.miou, 0.25);
    }

    #[test]
    fn merging_equals_one_big_update() {
        let (truth, pred) = ([0u8, 1, 2, 1, 0, 255], [0u8, 2, 2, 1, 1, 0]);
        let mut whole = ConfusionMatrix::new(3);
        whole.update(&truth, &pred);
        let mut a = ConfusionMatrix::new(3);
        a.update(&truth[..3], &pred[..3]);
        let mut b = ConfusionMatrix::new(3);
        b.update(&truth[3..], &pred[3..]);
        a.merge(&b);
        assert_eq!(a, whole);
    }

    #[test]
    fn nothing_scored_gives_zero_not_nan() {
        let s = ConfusionMatrix::new(2).scores();
        assert_eq!((s.miou, s.pixel_accuracy), (0.0, 0.0));
    }
}

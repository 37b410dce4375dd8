//! Learning-rate schedules: poly (power 0.9), cosine, and step, as the built-in algorithm offers.

use crate::sagemaker::hyperparameters::{Hyperparameters, LrScheduler};

/// poly's exponent (GluonCV and the built-in algorithm use 0.9).
pub const POLY_POWER: f64 = 0.9;

/// The learning rate at any iteration of a job.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub kind: LrScheduler,
    pub base_lr: f64,
    /// Iterations per epoch: ⌈num_training_samples / mini_batch_size⌉ (the hyperparameter, not the channel count,
    /// as the built-in algorithm does).
    pub iterations_per_epoch: u64,
    pub epochs: u32,
    /// step: epochs at which the rate is multiplied by `factor`.
    pub steps: Vec<u32>,
    pub factor: f64,
}

impl Schedule {
    /// The schedule a training job with `hp` follows.
    pub fn for_job(hp: &Hyperparameters) -> Self {
        Self {
            kind: hp.lr_scheduler,
            base_lr: hp.learning_rate,
            iterations_per_epoch: hp.num_training_samples.div_ceil(u64::from(hp.mini_batch_size)),
            epochs: hp.epochs,
            steps: hp.lr_scheduler_step.clone(),
            factor: hp.lr_scheduler_factor,
        }
    }

    pub fn total_iterations(&self) -> u64 {
        self.iterations_per_epoch.max(1) * u64::from(self.epochs)
    }

    /// The rate for iteration `iteration` (counted from 0 over the whole job) of epoch `epoch` (from 0).
    pub fn learning_rate(&self, epoch: u32, iteration: u64) -> f64 {
        let progress = (iteration as f64 / self.total_iterations() as f64).clamp(0.0, 1.0);
        match self.kind {
            LrScheduler::Poly => self.base_lr * (1.0 - progress).powf(POLY_POWER),
            LrScheduler::Cosine => self.base_lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            LrScheduler::Step => {
                let passed = self.steps.iter().filter(|&&s| epoch >= s).count();
                self.base_lr * self.factor.powi(passed as i32)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(kind: LrScheduler) -> Schedule {
        Schedule {
            kind,
            base_lr: 0.1,
            iterations_per_epoch: 10,
            epochs: 4,
            steps: vec![1, 3],
            factor: 0.5,
        }
    }

    #[test]
    fn a_job_steps_through_its_training_samples_in_mini_batches() {
        let raw = [
            ("num_classes", "3"),
            ("num_training_samples", "10"),
            ("mini_batch_size", "4"),
            ("epochs", "5"),
            ("learning_rate", "0.02"),
            ("lr_scheduler", "step"),
            ("lr_scheduler_step", "2,4"),
            ("lr_scheduler_factor", "0.5"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .into();
        let (hp, _) = Hyperparameters::from_strings(&raw).unwrap();
        let s = Schedule::for_job(&hp);
        assert_eq!(s.iterations_per_epoch, 3, "ceil(10 / 4)");
        assert_eq!(s.total_iterations(), 15);
        assert_eq!(
            (s.kind, s.base_lr, s.steps.as_slice(), s.factor),
            (LrScheduler::Step, 0.02, &[2, 4][..], 0.5)
        );
        assert_eq!(s.learning_rate(4, 12), 0.02 * 0.25);
    }

    #[test]
    fn poly_decays_from_base_to_zero() {
        let s = schedule(LrScheduler::Poly);
        assert_eq!(s.learning_rate(0, 0), 0.1);
        assert!((s.learning_rate(2, 20) - 0.1 * 0.5f64.powf(0.9)).abs() < 1e-12);
        assert_eq!(s.learning_rate(3, 40), 0.0);
    }

    #[test]
    fn cosine_is_half_at_the_midpoint() {
        let s = schedule(LrScheduler::Cosine);
        assert_eq!(s.learning_rate(0, 0), 0.1);
        assert!((s.learning_rate(2, 20) - 0.05).abs() < 1e-12);
        assert!(s.learning_rate(3, 40).abs() < 1e-12);
    }

    #[test]
    fn step_multiplies_by_the_factor_at_each_listed_epoch() {
        let s = schedule(LrScheduler::Step);
        let rates: Vec<f64> = (0..4).map(|e| s.learning_rate(e, u64::from(e) * 10)).collect();
        assert_eq!(rates, [0.1, 0.05, 0.05, 0.025]);
    }
}

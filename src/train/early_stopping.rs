//! Early stopping on validation mIOU, with the built-in algorithm's four hyperparameters.

/// Decides after each epoch whether the job should stop.
#[derive(Debug, Clone, PartialEq)]
pub struct EarlyStopping {
    pub enabled: bool,
    pub min_epochs: u32,
    pub patience: u32,
    /// Relative mIOU improvement below which an epoch does not count as better.
    pub tolerance: f64,
    best: Option<f64>,
    epochs_without_improvement: u32,
}

impl EarlyStopping {
    pub fn new(enabled: bool, min_epochs: u32, patience: u32, tolerance: f64) -> Self {
        Self {
            enabled,
            min_epochs,
            patience,
            tolerance,
            best: None,
            epochs_without_improvement: 0,
        }
    }

    /// Record epoch `epoch`'s (counted from 1) score; true when training should stop now.
    pub fn should_stop(&mut self, epoch: u32, miou: f64) -> bool {
        let improved = match self.best {
            None => true,
            Some(best) if best <= 0.0 => miou > best,
            Some(best) => (miou - best) / best > self.tolerance,
        };
        if improved {
            self.epochs_without_improvement = 0;
        } else {
            self.epochs_without_improvement += 1;
        }
        if self.best.is_none_or(|best| miou > best) {
            self.best = Some(miou);
        }
        self.enabled && epoch >= self.min_epochs && self.epochs_without_improvement >= self.patience.max(1)
    }

    /// The best score seen so far (saved in checkpoints).
    pub fn best(&self) -> Option<f64> {
        self.best
    }

    /// Epochs since the score last improved by more than the tolerance (saved in checkpoints).
    pub fn epochs_without_improvement(&self) -> u32 {
        self.epochs_without_improvement
    }

    pub fn restore(&mut self, best: Option<f64>, epochs_without_improvement: u32) {
        self.best = best;
        self.epochs_without_improvement = epochs_without_improvement;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_after_patience_epochs_without_relative_improvement() {
        let mut es = EarlyStopping::new(true, 2, 2, 0.05);
        assert!(!es.should_stop(1, 0.50));
        assert!(!es.should_stop(2, 0.60)); // +20 %: improvement
        assert!(!es.should_stop(3, 0.62)); // +3.3 % < 5 %: 1 epoch without
        assert!(es.should_stop(4, 0.61)); // 2 epochs without
    }

    #[test]
    fn never_stops_before_min_epochs_or_when_disabled() {
        let mut es = EarlyStopping::new(true, 5, 1, 0.0);
        for epoch in 1..5 {
            assert!(!es.should_stop(epoch, 0.3), "stopped at {epoch}");
        }
        assert!(es.should_stop(5, 0.3));
        let mut off = EarlyStopping::new(false, 0, 1, 0.0);
        assert!((1..10).all(|e| !off.should_stop(e, 0.1)));
    }

    #[test]
    fn improvement_resets_the_count() {
        let mut es = EarlyStopping::new(true, 0, 2, 0.0);
        assert!(!es.should_stop(1, 0.5));
        assert!(!es.should_stop(2, 0.4));
        assert!(!es.should_stop(3, 0.6));
        assert!(!es.should_stop(4, 0.6));
        assert!(es.should_stop(5, 0.55));
        assert_eq!((es.best(), es.epochs_without_improvement()), (Some(0.6), 2));
    }
}

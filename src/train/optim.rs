//! The built-in algorithm's optimizers over Candle variables: sgd (momentum), nag, adam, adagrad, rmsprop.
//!
//! candle-nn's SGD has no momentum or weight decay, so all five are written here, following PyTorch's update rules
//! (weight decay added to the gradient as an L2 term). Per-parameter state is kept by parameter name, so a checkpoint
//! can save and restore it.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

use crate::sagemaker::hyperparameters::OptimizerKind;

/// Adam's β₁, β₂ and ε (PyTorch defaults).
const ADAM_BETAS: (f64, f64) = (0.9, 0.999);
const ADAM_EPS: f64 = 1e-8;
const ADAGRAD_EPS: f64 = 1e-10;
const RMSPROP_EPS: f64 = 1e-8;

/// Optimizer settings from the hyperparameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OptimizerConfig {
    pub kind: OptimizerKind,
    /// sgd and nag.
    pub momentum: f64,
    pub weight_decay: f64,
    /// rmsprop: decay of the squared-gradient average (PyTorch's `alpha`).
    pub gamma1: f64,
    /// rmsprop: momentum.
    pub gamma2: f64,
}

/// One optimizer over a fixed set of named parameters.
pub struct Optimizer {
    config: OptimizerConfig,
    params: Vec<(String, Var)>,
    /// Parameter name → state tensors (momentum buffer, moment estimates...), created on first use.
    state: HashMap<String, Vec<Tensor>>,
    /// Steps taken (Adam's bias correction).
    steps: u64,
}

impl Optimizer {
    /// Only floating-point variables are optimised (integer buffers such as counters are skipped).
    pub fn new(config: OptimizerConfig, params: Vec<(String, Var)>) -> Self {
        let params = params.into_iter().filter(|(_, v)| v.dtype().is_float()).collect();
        Self {
            config,
            params,
            state: HashMap::new(),
            steps: 0,
        }
    }

    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Apply one update with learning rate `lr` to every parameter that has a gradient.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.steps += 1;
        for (name, var) in &self.params {
            let Some(grad) = grads.get(var) else { continue };
            let weight = var.as_tensor();
            if super::fused_sgd::applies(&self.config, weight, grad) {
                let state = self.state.entry(name.clone()).or_default();
                super::fused_sgd::step(&self.config, weight, grad, state, lr)?;
                continue;
            }
            // Detached: an expression of the variable itself records an op, so the momentum (or other state)
            // buffer would hold the previous step's buffer, and so on, a chain that grows by a few
            // parameter-sized tensors every step (seen on the GPU: +12 GiB between two epochs).
            let (weight, grad) = (var.as_detached_tensor(), grad.detach());
            let weight = &weight;
            let grad = &grad;
            let grad = if self.config.weight_decay > 0.0 {
                (grad + (weight * self.config.weight_decay)?)?
            } else {
                grad.clone()
            };
            let state = self.state.entry(name.clone()).or_default();
            let update = update_for(&self.config, self.steps, &grad, state, lr)?;
            var.set(&(weight - update)?)?;
        }
        Ok(())
    }

    /// The state tensors, named `<param>.<i>`, for a checkpoint; plus the step count.
    pub fn state_tensors(&self) -> (HashMap<String, Tensor>, u64) {
        let mut named = HashMap::new();
        for (param, tensors) in &self.state {
            for (i, tensor) in tensors.iter().enumerate() {
                named.insert(format!("{param}.{i}"), tensor.clone());
            }
        }
        (named, self.steps)
    }

    /// Restore what [`Self::state_tensors`] saved.
    pub fn load_state(&mut self, named: &HashMap<String, Tensor>, steps: u64) {
        self.state.clear();
        for (param, _) in &self.params {
            let tensors: Vec<Tensor> = (0..)
                .map_while(|i| named.get(&format!("{param}.{i}")).cloned())
                .collect();
            if !tensors.is_empty() {
                self.state.insert(param.clone(), tensors);
            }
        }
        self.steps = steps;
    }
}

/// The amount to subtract from the weight, updating `state` in place.
fn update_for(config: &OptimizerConfig, step: u64, grad: &Tensor, state: &mut Vec<Tensor>, lr: f64) -> Result<Tensor> {
    let zeros = || grad.zeros_like();
    match config.kind {
        OptimizerKind::Sgd | OptimizerKind::Nag => {
            if config.momentum == 0.0 {
                return grad * lr;
            }
            // buf = μ·buf + g (PyTorch starts the buffer at g).
            let buf = match state.first() {
                Some(buf) => ((buf * config.momentum)? + grad)?,
                None => grad.clone(),
            };
            let direction = if config.kind == OptimizerKind::Nag {
                (grad + (&buf * config.momentum)?)?
            } else {
                buf.clone()
            };
            *state = vec![buf];
            direction * lr
        }
        OptimizerKind::Adam => {
            let (b1, b2) = ADAM_BETAS;
            if state.is_empty() {
                *state = vec![zeros()?, zeros()?];
            }
            let m = ((&state[0] * b1)? + (grad * (1.0 - b1))?)?;
            let v = ((&state[1] * b2)? + (grad.sqr()? * (1.0 - b2))?)?;
            let m_hat = (&m / (1.0 - b1.powi(step as i32)))?;
            let v_hat = (&v / (1.0 - b2.powi(step as i32)))?;
            let update = ((m_hat * lr)? / (v_hat.sqrt()? + ADAM_EPS)?)?;
            *state = vec![m, v];
            Ok(update)
        }
        OptimizerKind::Adagrad => {
            let sum = match state.first() {
                Some(sum) => (sum + grad.sqr()?)?,
                None => grad.sqr()?,
            };
            let update = ((grad * lr)? / (sum.sqrt()? + ADAGRAD_EPS)?)?;
            *state = vec![sum];
            Ok(update)
        }
        OptimizerKind::Rmsprop => {
            if state.is_empty() {
                *state = vec![zeros()?, zeros()?];
            }
            let alpha = config.gamma1;
            let square_avg = ((&state[0] * alpha)? + (grad.sqr()? * (1.0 - alpha))?)?;
            let scaled = (grad / (square_avg.sqrt()? + RMSPROP_EPS)?)?;
            let (update, buf) = if config.gamma2 > 0.0 {
                let buf = ((&state[1] * config.gamma2)? + &scaled)?;
                ((&buf * lr)?, buf)
            } else {
                ((&scaled * lr)?, state[1].clone())
            };
            *state = vec![square_avg, buf];
            Ok(update)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn config(kind: OptimizerKind) -> OptimizerConfig {
        OptimizerConfig {
            kind,
            momentum: 0.9,
            weight_decay: 0.0,
            gamma1: 0.9,
            gamma2: 0.0,
        }
    }

    /// Minimise f(w) = w² (gradient 2w) from w = 1 for a few steps and return the trajectory of w.
    fn trajectory(config: OptimizerConfig, lr: f64, steps: usize) -> Vec<f64> {
        let w = Var::from_tensor(&Tensor::new(&[1.0f64], &Device::Cpu).unwrap()).unwrap();
        let mut opt = Optimizer::new(config, vec![("w".into(), w.clone())]);
        (0..steps)
            .map(|_| {
                let loss = w.as_tensor().sqr().unwrap().sum_all().unwrap();
                opt.step(&loss.backward().unwrap(), lr).unwrap();
                w.as_tensor().to_vec1::<f64>().unwrap()[0]
            })
            .collect()
    }

    fn assert_close(actual: &[f64], expected: &[f64]) {
        assert_eq!(actual.len(), expected.len());
        for (a, e) in actual.iter().zip(expected) {
            assert!((a - e).abs() < 1e-9, "{actual:?} != {expected:?}");
        }
    }

    #[test]
    fn sgd_with_momentum_matches_hand_computed_steps() {
        // g1 = 2; buf = 2; w = 1 - 0.1·2 = 0.8. g2 = 1.6; buf = 0.9·2 + 1.6 = 3.4; w = 0.8 - 0.34 = 0.46.
        assert_close(&trajectory(config(OptimizerKind::Sgd), 0.1, 2), &[0.8, 0.46]);
    }

    /// The in-place f32 path (`fused_sgd`) against the composed one (run in f64 here, so not fused).
    #[test]
    fn fused_cpu_sgd_and_nag_match_the_composed_update() {
        for kind in [OptimizerKind::Sgd, OptimizerKind::Nag] {
            for momentum in [0.0, 0.9] {
                let c = OptimizerConfig {
                    weight_decay: 1e-2,
                    momentum,
                    ..config(kind)
                };
                let run = |dtype: DType| -> Vec<f64> {
                    let start = Tensor::new(&[0.5f64, -1.5, 2.0, 0.25], &Device::Cpu).unwrap();
                    let w = Var::from_tensor(&start.to_dtype(dtype).unwrap()).unwrap();
                    let mut opt = Optimizer::new(c, vec![("w".into(), w.clone())]);
                    for _ in 0..3 {
                        let loss = (w.as_tensor().sqr().unwrap() * 1.5).unwrap().sum_all().unwrap();
                        opt.step(&loss.backward().unwrap(), 0.1).unwrap();
                    }
                    w.as_tensor().to_dtype(DType::F64).unwrap().to_vec1().unwrap()
                };
                let (fused, composed) = (run(DType::F32), run(DType::F64));
                for (a, b) in fused.iter().zip(&composed) {
                    assert!(
                        (a - b).abs() < 1e-6,
                        "{kind:?} momentum {momentum}: {fused:?} vs {composed:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn sgd_weight_decay_adds_an_l2_term() {
        let c = OptimizerConfig {
            weight_decay: 0.5,
            momentum: 0.0,
            ..config(OptimizerKind::Sgd)
        };
        // g = 2w + 0.5w = 2.5; w = 1 - 0.1·2.5 = 0.75.
        assert_close(&trajectory(c, 0.1, 1), &[0.75]);
    }

    #[test]
    fn nag_looks_ahead_along_the_momentum() {
        // g1 = 2; buf = 2; dir = 2 + 0.9·2 = 3.8; w = 1 - 0.38 = 0.62.
        // g2 = 1.24; buf = 1.8 + 1.24 = 3.04; dir = 1.24 + 2.736 = 3.976; w = 0.62 - 0.3976 = 0.2224.
        assert_close(&trajectory(config(OptimizerKind::Nag), 0.1, 2), &[0.62, 0.2224]);
    }

    #[test]
    fn adam_matches_hand_computed_steps() {
        // Step 1: m̂ = g, v̂ = g², so the update is lr·g/(|g|+ε) ≈ lr.
        let w = trajectory(config(OptimizerKind::Adam), 0.1, 2);
        assert!((w[0] - (1.0 - 0.1 * 2.0 / (2.0 + 1e-8))).abs() < 1e-12, "{w:?}");
        // Step 2 by hand: g = 2·w1.
        let g1 = 2.0;
        let g2 = 2.0 * w[0];
        let m = 0.9 * 0.1 * g1 + 0.1 * g2;
        let v = 0.999 * 0.001 * g1 * g1 + 0.001 * g2 * g2;
        let m_hat = m / (1.0 - 0.81);
        let v_hat = v / (1.0 - 0.999f64.powi(2));
        let expected = w[0] - 0.1 * m_hat / (v_hat.sqrt() + 1e-8);
        assert!((w[1] - expected).abs() < 1e-12, "{} vs {expected}", w[1]);
    }

    #[test]
    fn adagrad_divides_by_the_root_of_summed_squares() {
        // g1 = 2; sum = 4; w = 1 - 0.1·2/2 = 0.9. g2 = 1.8; sum = 7.24; w = 0.9 - 0.1·1.8/√7.24.
        let expected2 = 0.9 - 0.1 * 1.8 / 7.24f64.sqrt();
        assert_close(&trajectory(config(OptimizerKind::Adagrad), 0.1, 2), &[0.9, expected2]);
    }

    #[test]
    fn rmsprop_uses_gamma1_as_decay_and_gamma2_as_momentum() {
        // No momentum: avg = 0.1·4 = 0.4; w = 1 - 0.01·2/√0.4.
        let w1 = 1.0 - 0.01 * 2.0 / (0.4f64.sqrt() + 1e-8);
        assert_close(&trajectory(config(OptimizerKind::Rmsprop), 0.01, 1), &[w1]);
        // With momentum 0.5 the second step adds half of the first step's scaled gradient.
        let c = OptimizerConfig {
            gamma2: 0.5,
            ..config(OptimizerKind::Rmsprop)
        };
        let w = trajectory(c, 0.01, 2);
        let g2 = 2.0 * w1;
        let avg2 = 0.9 * 0.4 + 0.1 * g2 * g2;
        let buf2 = 0.5 * (2.0 / (0.4f64.sqrt() + 1e-8)) + g2 / (avg2.sqrt() + 1e-8);
        assert_close(&w, &[w1, w1 - 0.01 * buf2]);
    }

    #[test]
    fn every_optimizer_decreases_a_convex_loss() {
        for kind in OptimizerKind::ALL {
            let w = trajectory(config(*kind), 0.05, 20);
            assert!(w[19].abs() < 0.9, "{kind}: {w:?}");
        }
    }

    /// Every composed-path state buffer must be a plain value: one that recorded an op would keep the previous
    /// step's buffer alive, and memory would grow every step (the GPU path, and f64 on the CPU).
    #[test]
    fn optimizer_state_holds_no_graph_of_earlier_steps() {
        for kind in OptimizerKind::ALL {
            let w = Var::from_tensor(&Tensor::new(&[1.0f64, -0.5], &Device::Cpu).unwrap()).unwrap();
            let cfg = OptimizerConfig {
                weight_decay: 1e-4,
                gamma2: 0.9,
                ..config(*kind)
            };
            let mut opt = Optimizer::new(cfg, vec![("w".into(), w.clone())]);
            for _ in 0..3 {
                let loss = w.as_tensor().sqr().unwrap().sum_all().unwrap();
                opt.step(&loss.backward().unwrap(), 0.01).unwrap();
            }
            let (state, _) = opt.state_tensors();
            assert!(!state.is_empty(), "{kind}: no state");
            for (name, tensor) in &state {
                assert!(!tensor.track_op(), "{kind}: state {name} records an op");
            }
        }
    }

    #[test]
    fn state_round_trips_through_a_checkpoint() {
        let w = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0], &Device::Cpu).unwrap()).unwrap();
        let mut opt = Optimizer::new(config(OptimizerKind::Adam), vec![("w".into(), w.clone())]);
        let loss = w.as_tensor().sqr().unwrap().sum_all().unwrap();
        opt.step(&loss.backward().unwrap(), 0.1).unwrap();
        let (state, steps) = opt.state_tensors();
        assert_eq!((state.len(), steps), (2, 1));

        let mut restored = Optimizer::new(config(OptimizerKind::Adam), vec![("w".into(), w.clone())]);
        restored.load_state(&state, steps);
        let (again, steps) = restored.state_tensors();
        assert_eq!(steps, 1);
        for (name, tensor) in &state {
            let diff = (tensor - &again[name]).unwrap().abs().unwrap().sum_all().unwrap();
            assert_eq!(diff.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap(), 0.0);
        }
    }
}

//! Reproducible weight initialisation: a `VarBuilder` backend that creates each new variable in a `VarMap` from its
//! own seeded random stream.
//!
//! Candle draws `Init::Randn` / `Init::Uniform` on the CPU from an unseeded thread RNG, so two trainings with the same
//! `seed` hyperparameter started from different weights. Here variable `name` draws from ChaCha8 seeded with
//! `seed` and stream FNV-1a(`name`): the weights depend only on the seed and the parameter's name, not on the order in
//! which the network's constructors ask for them.

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::NormalOrUniform;
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A `VarBuilder` whose new variables land in `varmap`, initialised reproducibly from `seed`.
pub fn seeded_var_builder(varmap: &VarMap, seed: u64, dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(
        Box::new(SeededVarMap {
            varmap: varmap.clone(),
            seed,
        }),
        dtype,
        device.clone(),
    )
}

struct SeededVarMap {
    varmap: VarMap,
    seed: u64,
}

impl SimpleBackend for SeededVarMap {
    fn get(&self, shape: Shape, name: &str, init: Init, dtype: DType, device: &Device) -> Result<Tensor> {
        let mut data = self.varmap.data().lock().unwrap_or_else(|p| p.into_inner());
        if let Some(existing) = data.get(name) {
            if existing.shape() != &shape {
                candle_core::bail!("shape mismatch on {name}: {shape:?} <> {:?}", existing.shape())
            }
            return Ok(existing.as_tensor().clone());
        }
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(fnv1a(name));
        let values = sample(&init, &shape, &mut rng);
        let tensor = Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?;
        let var = Var::from_tensor(&tensor)?;
        let out = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _device: &Device) -> Result<Tensor> {
        candle_core::bail!("{name}: a seeded VarMap creates variables with a shape; use get")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(name)
    }
}

/// `shape.elem_count()` values drawn as `init` describes (the same distributions as `Init::var`).
fn sample(init: &Init, shape: &Shape, rng: &mut ChaCha8Rng) -> Vec<f64> {
    let n = shape.elem_count();
    let uniform = |rng: &mut ChaCha8Rng, lo: f64, up: f64| (0..n).map(|_| rng.random_range(lo..up)).collect();
    match *init {
        Init::Const(c) => vec![c; n],
        Init::Uniform { lo, up } if lo < up => uniform(rng, lo, up),
        Init::Uniform { lo, .. } => vec![lo; n],
        Init::Randn { mean, stdev } => normal(rng, n, mean, stdev),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
            match dist {
                NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    uniform(rng, -bound, bound)
                }
                NormalOrUniform::Normal => normal(rng, n, 0.0, std),
            }
        }
    }
}

/// Box–Muller normal samples.
fn normal(rng: &mut ChaCha8Rng, n: usize, mean: f64, stdev: f64) -> Vec<f64> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]: ln is finite
        let u2: f64 = rng.random();
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = std::f64::consts::TAU * u2;
        out.push(mean + stdev * r * theta.cos());
        out.push(mean + stdev * r * theta.sin());
    }
    out.truncate(n);
    out
}

/// 64-bit FNV-1a: a hash that is stable across Rust versions and platforms.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Algorithm, Backbone, ModelConfig, OutputStride, SegmentationModel};

    fn build(seed: u64) -> VarMap {
        let varmap = VarMap::new();
        let config = ModelConfig::new(Algorithm::Fcn, Backbone::Resnet18, 3, OutputStride::Eight, true).unwrap();
        SegmentationModel::new(&config, seeded_var_builder(&varmap, seed, DType::F32, &Device::Cpu)).unwrap();
        varmap
    }

    fn values(varmap: &VarMap, name: &str) -> Vec<f32> {
        let data = varmap.data().lock().unwrap();
        data[name].as_tensor().flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn the_same_seed_gives_the_same_weights_and_another_seed_other_weights() {
        let (a, b, c) = (build(7), build(7), build(8));
        let names: Vec<String> = a.data().lock().unwrap().keys().cloned().collect();
        assert!(names.len() > 50);
        for name in &names {
            assert_eq!(values(&a, name), values(&b, name), "{name}");
        }
        assert_ne!(values(&a, "backbone.conv1.weight"), values(&c, "backbone.conv1.weight"));
    }

    #[test]
    fn draws_follow_the_requested_distributions() {
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, 1, DType::F32, &Device::Cpu);
        let normal: Vec<f32> = vb
            .get_with_hints(20_000, "n", Init::Randn { mean: 1.0, stdev: 0.5 })
            .unwrap()
            .to_vec1()
            .unwrap();
        let mean = normal.iter().sum::<f32>() / normal.len() as f32;
        let var = normal.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / normal.len() as f32;
        assert!((mean - 1.0).abs() < 0.02, "mean {mean}");
        assert!((var.sqrt() - 0.5).abs() < 0.02, "std {}", var.sqrt());

        let uniform: Vec<f32> = vb
            .get_with_hints(20_000, "u", Init::Uniform { lo: -0.25, up: 0.75 })
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(uniform.iter().all(|v| (-0.25..0.75).contains(v)));
        let mean = uniform.iter().sum::<f32>() / uniform.len() as f32;
        assert!((mean - 0.25).abs() < 0.02, "mean {mean}");

        let ones: Vec<f32> = vb.get_with_hints(3, "c", Init::Const(1.0)).unwrap().to_vec1().unwrap();
        assert_eq!(ones, [1.0; 3]);
        // A second request returns the same variable, and a different shape is refused.
        assert_eq!(
            vb.get_with_hints(3, "c", Init::Const(5.0))
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            [1.0; 3]
        );
        assert!(vb.get_with_hints(4, "c", Init::Const(1.0)).is_err());
    }
}

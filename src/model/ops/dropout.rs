//! `nn.Dropout(p)` in training as one op whose mask is never stored.
//!
//! Element `i` of a call with key `k` is kept when `u = (SplitMix64(k + (i + 1)·γ) >> 40) · 2⁻²⁴`, a uniform in
//! [0, 1) with 24 bits, is at least `p`, and then scaled by 1/(1 − p); otherwise it is 0. The mask is a function of
//! (key, index) alone, so:
//! - backward applies the same mask to the gradient, made again from the key: nothing full-size is kept for it
//!   (Candle's composed dropout keeps an f32 mask until backward, PyTorch a byte one);
//! - the CPU op and the CUDA kernel (`elementwise_cuda`) compute the same bits, so a step drops the same units on
//!   either device (`device-check` compares them);
//! - no random-number generator is kept or reseeded on the device. The GPU path used to recreate cuRAND's
//!   generator every training step to seed it: its state set up again, and the old one's device memory freed
//!   (`cudaFree` synchronises the device). What that cost was never measured.
//!
//! Keys. [`seed_step`] fixes the current step's key on this thread from the job's seed and the step's number, and
//! each dropout call of the step takes the next key in turn: a step's masks depend only on (seed, step), so a
//! resumed job drops the same units as an uninterrupted one. Without a seeded step, keys are random.

use std::cell::Cell;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::contiguous_slice;

/// SplitMix64's increment (the golden ratio in 64 bits).
pub const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function (Steele, Lea and Flood 2014; the finaliser of `java.util.SplittableRandom`).
#[inline]
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The uniform in [0, 1) that decides element `i` of the mask with `key` (exact in f32: 24 bits).
#[inline]
pub fn uniform(key: u64, i: u64) -> f32 {
    (mix(key.wrapping_add(i.wrapping_add(1).wrapping_mul(GOLDEN))) >> 40) as f32 * (1.0 / (1u32 << 24) as f32)
}

thread_local! {
    /// The seeded step's key and the number of dropout calls made in it so far.
    static STEP: Cell<Option<(u64, u64)>> = const { Cell::new(None) };
}

/// Distinguishes dropout's keys from other streams drawn from the job's seed ("dropout!").
const SALT: u64 = 0x6472_6f70_6f75_7421;

/// Fixes the keys of training `step`'s dropout calls on this thread from the job's `seed`.
pub fn seed_step(seed: u64, step: u64) {
    let key = mix(mix(seed ^ SALT).wrapping_add(step.wrapping_add(1).wrapping_mul(GOLDEN)));
    STEP.with(|s| s.set(Some((key, 0))));
}

/// The next dropout call's key: from the seeded step, else random.
fn next_key() -> u64 {
    STEP.with(|s| match s.get() {
        Some((key, calls)) => {
            s.set(Some((key, calls + 1)));
            mix(key.wrapping_add(calls.wrapping_add(1).wrapping_mul(GOLDEN)))
        }
        None => rand::random(),
    })
}

/// Training-mode dropout of `x` (f32, f64, or bf16 on CUDA) with probability `p` in (0, 1): each element zeroed or
/// scaled by 1/(1 − p), differentiable. `p` outside (0, 1) is the caller's to handle.
pub fn dropout(x: &Tensor, p: f32) -> Result<Tensor> {
    if !(p > 0.0 && p < 1.0) {
        candle_core::bail!("dropout: probability {p} is not in (0, 1)")
    }
    x.contiguous()?.apply_op1(Dropout { key: next_key(), p })
}

/// The op: `x ↦ x ⊙ mask(key, p)`; it is linear, so its backward is itself applied to the gradient.
#[derive(Clone, Copy, Debug)]
pub struct Dropout {
    pub key: u64,
    pub p: f32,
}

impl Dropout {
    pub fn scale(&self) -> f32 {
        1.0 / (1.0 - self.p)
    }
}

/// Elements per parallel task.
const STRIPE: usize = 1 << 14;

fn apply_slice<T: WithDType>(x: &[T], op: Dropout) -> Vec<T> {
    let scale = f64::from(op.scale());
    let mut out = super::output_buffer(x.len());
    out.par_chunks_mut(STRIPE)
        .zip(x.par_chunks(STRIPE))
        .enumerate()
        .for_each(|(chunk, (out, x))| {
            let start = (chunk * STRIPE) as u64;
            for (i, (o, &v)) in out.iter_mut().zip(x).enumerate() {
                // The product of two f32 is exact in f64, so rounding it to T is T's own rounded product.
                *o = if uniform(op.key, start + i as u64) >= op.p {
                    T::from_f64(v.to_f64() * scale)
                } else {
                    T::zero()
                };
            }
        });
    out
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "semseg-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(x) => CpuStorage::F32(apply_slice(contiguous_slice(x, l, "dropout")?, *self)),
            CpuStorage::F64(x) => CpuStorage::F64(apply_slice(contiguous_slice(x, l, "dropout")?, *self)),
            CpuStorage::BF16(x) => CpuStorage::BF16(apply_slice(contiguous_slice(x, l, "dropout")?, *self)),
            _ => candle_core::bail!("dropout: f32, f64 or bf16 input expected"),
        };
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::cuda_backend::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::cuda_backend::CudaStorage, Shape)> {
        Ok((super::elementwise_cuda::dropout(s, l, *self)?, l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.to_dtype(arg.dtype())?.contiguous()?;
        Ok(Some(grad.apply_op1_no_bwd(self)?))
    }
}

/// The dtypes the op takes on `x`'s device.
pub fn supports(x: &Tensor) -> bool {
    match x.device() {
        candle_core::Device::Cpu => matches!(x.dtype(), DType::F32 | DType::F64 | DType::BF16),
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(_) => matches!(x.dtype(), DType::F32 | DType::BF16),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn splitmix64_matches_its_reference_outputs() {
        // SplitMix64 seeded with 0: the state advances by γ and each output is mix(state) (reference values from
        // the algorithm's published C code).
        let outputs: Vec<u64> = (1..=3).map(|i: u64| mix(i.wrapping_mul(GOLDEN))).collect();
        assert_eq!(
            outputs,
            [0xE220_A839_7B1D_CDAF, 0x6E78_9E6A_A1B9_65F4, 0x06C4_5D18_8009_454F]
        );
    }

    #[test]
    fn the_mask_keeps_about_one_minus_p_and_scales_what_it_keeps() -> Result<()> {
        let x = Tensor::ones((4, 64, 16, 16), DType::F32, &Device::Cpu)?;
        for p in [0.1f32, 0.5] {
            let y = x.apply_op1(Dropout { key: 7, p })?.flatten_all()?.to_vec1::<f32>()?;
            let kept = y.iter().filter(|&&v| v != 0.0).count() as f64 / y.len() as f64;
            // 65536 Bernoulli draws: 4 standard deviations is under 0.8 points.
            assert!((kept - (1.0 - f64::from(p))).abs() < 0.008, "p {p}: kept {kept}");
            assert!(y.iter().all(|&v| v == 0.0 || v == 1.0 / (1.0 - p)));
        }
        Ok(())
    }

    #[test]
    fn element_i_depends_on_its_key_and_index_only() -> Result<()> {
        // The same key gives the same mask whatever the shape or the stripe an element falls in.
        let op = Dropout { key: 42, p: 0.5 };
        let n = 3 * STRIPE + 5;
        let x = Tensor::arange(1f32, n as f32 + 1.0, &Device::Cpu)?;
        let y = x.apply_op1(op)?.to_vec1::<f32>()?;
        for (i, &v) in y.iter().enumerate() {
            let want = if uniform(42, i as u64) >= 0.5 {
                (i + 1) as f32 * 2.0
            } else {
                0.0
            };
            assert_eq!(v, want, "element {i}");
        }
        let other = x.apply_op1(Dropout { key: 43, p: 0.5 })?.to_vec1::<f32>()?;
        assert_ne!(y, other);
        Ok(())
    }

    #[test]
    fn the_gradient_is_the_same_mask_and_scale() -> Result<()> {
        let x = candle_core::Var::from_tensor(&Tensor::arange(0f32, 4096.0, &Device::Cpu)?.reshape((4, 1024))?)?;
        let weights = Tensor::arange(0f32, 4096.0, &Device::Cpu)?
            .reshape((4, 1024))?
            .affine(0.5, 3.0)?;
        let y = x.as_tensor().contiguous()?.apply_op1(Dropout { key: 9, p: 0.25 })?;
        let grads = (y.clone() * &weights)?.sum_all()?.backward()?;
        let g = grads
            .get(x.as_tensor())
            .expect("x's gradient")
            .flatten_all()?
            .to_vec1::<f32>()?;
        let w = weights.flatten_all()?.to_vec1::<f32>()?;
        for (i, (&g, &w)) in g.iter().zip(&w).enumerate() {
            let want = if uniform(9, i as u64) >= 0.25 {
                w * (1.0 / 0.75)
            } else {
                0.0
            };
            assert_eq!(g, want, "element {i}");
        }
        Ok(())
    }

    #[test]
    fn a_seeded_step_repeats_its_calls_keys_and_steps_differ() {
        let keys = |seed, step| {
            seed_step(seed, step);
            [next_key(), next_key(), next_key()]
        };
        let a = keys(1, 10);
        assert_eq!(a, keys(1, 10));
        assert_ne!(a[0], a[1]);
        assert_ne!(a[1], a[2]);
        assert_ne!(a, keys(1, 11));
        assert_ne!(a, keys(2, 10));
    }

    #[test]
    fn bf16_and_f64_follow_the_same_mask() -> Result<()> {
        let x = Tensor::arange(1f32, 2049.0, &Device::Cpu)?;
        let op = Dropout { key: 5, p: 0.5 };
        let f32_mask: Vec<bool> = x.apply_op1(op)?.to_vec1::<f32>()?.iter().map(|&v| v != 0.0).collect();
        for dtype in [DType::F64, DType::BF16] {
            let y = x
                .to_dtype(dtype)?
                .apply_op1(op)?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?;
            let mask: Vec<bool> = y.iter().map(|&v| v != 0.0).collect();
            assert_eq!(mask, f32_mask, "{dtype:?}");
        }
        Ok(())
    }

    #[test]
    fn probabilities_outside_the_open_interval_are_refused() -> Result<()> {
        let x = Tensor::ones(8, DType::F32, &Device::Cpu)?;
        for p in [0.0f32, 1.0, -0.5, f32::NAN] {
            assert!(dropout(&x, p).is_err(), "{p}");
        }
        Ok(())
    }
}

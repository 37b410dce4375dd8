//! Training-mode BatchNorm2d on the CPU as one fused op (on CUDA, `batch_norm_cuda`; [`batch_norm_train`]
//! dispatches). Composed from Candle's ops it is about ten autograd nodes,
//! each materialising a full-size activation (sub, sqr, mul, add and their broadcast-sum backwards over strided
//! axes); fused, the forward is two passes over the input (statistics, then the affine map) and the backward two
//! (per-channel sums, then the input gradient), in parallel over channels / planes.
//!
//! Forward: `y = (x − μ_c)·s_c·γ_c + β_c` with `s_c = 1/√(σ²_c + ε)`, μ and the biased σ² over B·H·W.
//! Backward (N = B·H·W, x̂ = (x − μ)·s): `∂β = Σ dy`, `∂γ = Σ dy·x̂`, `∂x = γ·s·(dy − ∂β/N − x̂·∂γ/N)`.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::contiguous_slice;

/// Per-channel statistics of one training batch.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchStats {
    pub mean: Vec<f64>,
    /// Biased (divided by N), as used for normalising.
    pub var: Vec<f64>,
    /// N = B·H·W, the count behind each statistic.
    pub count: usize,
}

/// Whether [`batch_norm_train`] handles this input: on the CPU f32 or f64 with parameters of the same dtype; on CUDA
/// (with the `cuda` feature) f32 or bf16 with f32 parameters (`batch_norm_cuda`).
pub fn supports(x: &Tensor, weight: &Tensor) -> bool {
    if x.device().is_cpu() {
        return matches!(x.dtype(), DType::F32 | DType::F64) && weight.dtype() == x.dtype();
    }
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return matches!(x.dtype(), DType::F32 | DType::BF16) && weight.dtype() == DType::F32;
    }
    false
}

/// `x` `[B, C, H, W]`, `weight`/`bias` `[C]` → (`y` `[B, C, H, W]`, differentiable with respect to all three; the
/// batch mean `[C]`; the biased batch variance `[C]`), the statistics detached and on x's device: f64 on the CPU
/// (exactly what the kernel computed), f32 on CUDA (left on the GPU: no synchronisation per layer).
///
/// With `relu`, the output is `max(y, 0)` in the same pass, and backward masks the gradient by the output's sign
/// in its own parallel kernel: Candle's separate ReLU costs a pass forward and five backward (zeros, compare, cast,
/// multiply, add).
pub fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return super::batch_norm_cuda::batch_norm_train(x, weight, bias, eps, relu);
    }
    let (y, stats) = batch_norm_train_cpu(x, (weight, bias), eps, (relu, false))?;
    Ok((y, stats_tensor(&stats.mean, x)?, stats_tensor(&stats.var, x)?))
}

/// `relu(bn(x) + residual)` in training, as one op: a bottleneck's last BatchNorm, shortcut add and ReLU. `x` and
/// `residual` `[B, C, H, W]` of one dtype, `weight`/`bias` `[C]` → (y, batch mean, biased batch variance) as
/// [`batch_norm_train`]. Composed, the BatchNorm's own output was one more full-size tensor that the add's node
/// kept until backward ended; backward needs only `x` and `y`. Falls back to the composed ops where the fused ones
/// do not run ([`supports`], shapes that differ).
pub fn batch_norm_add_relu_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    residual: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    if residual.shape() != x.shape() || residual.dtype() != x.dtype() || !supports(x, weight) {
        let (y, mean, var) = batch_norm_train(x, weight, bias, eps, false)?;
        return Ok((super::add_relu::add_relu(&y, residual)?, mean, var));
    }
    // One [2C] parameter operand (the op takes three): its gradient splits back into γ's and β's.
    let params = Tensor::cat(&[weight.contiguous()?, bias.contiguous()?], 0)?;
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return super::batch_norm_cuda::batch_norm_add_relu_train(x, residual, &params, eps);
    }
    let (y, stats) = batch_norm_train_cpu(x, (residual, &params), eps, (true, true))?;
    Ok((y, stats_tensor(&stats.mean, x)?, stats_tensor(&stats.var, x)?))
}

/// A `[C]` statistic on x's device.
fn stats_tensor(values: &[f64], x: &Tensor) -> Result<Tensor> {
    Tensor::from_slice(values, values.len(), x.device())
}

/// The CPU op on (x, weight, bias), or with `residual` on (x, residual, [γ; β]), with its statistics as computed.
fn batch_norm_train_cpu(
    x: &Tensor,
    (second, third): (&Tensor, &Tensor),
    eps: f64,
    (relu, residual): (bool, bool),
) -> Result<(Tensor, BatchStats)> {
    let stats = Arc::new(Mutex::new(None));
    let op = BatchNormTrain {
        eps,
        relu,
        residual,
        stats: Arc::clone(&stats),
    };
    let y = x
        .contiguous()?
        .apply_op3(&second.contiguous()?, &third.contiguous()?, op)?;
    let stats = lock(&stats)
        .clone()
        .ok_or_else(|| candle_core::Error::Msg("batch norm: the forward pass left no statistics".into()))?;
    Ok((y, stats))
}

fn lock(m: &Mutex<Option<BatchStats>>) -> std::sync::MutexGuard<'_, Option<BatchStats>> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Independent partial sums per pass: one f64 addition chain waits on each addition's latency (4 cycles a value);
/// 16 chains overlap and vectorise. The BatchNorm passes were most of a training step's time outside the
/// convolutions (DeepLabV3-ResNet-50, batch 2, crop 256, 2 Zen 4 threads).
const LANES: usize = 16;

/// Σ f(v) over `xs`, in f64.
#[inline(always)]
fn lane_sum<T: WithDType>(xs: &[T], f: impl Fn(f64) -> f64) -> f64 {
    let mut acc = [0f64; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (a, v) in acc.iter_mut().zip(chunk) {
            *a += f(v.to_f64());
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|v| f(v.to_f64())).sum();
    acc.iter().sum::<f64>() + tail
}

/// (Σ g, Σ g·v) over `gs` and `vs`, in f64.
#[inline(always)]
fn lane_sums_with<T: WithDType>(gs: &[T], vs: &[T]) -> (f64, f64) {
    let (mut s, mut sx) = ([0f64; LANES], [0f64; LANES]);
    let (mut g_chunks, mut v_chunks) = (gs.chunks_exact(LANES), vs.chunks_exact(LANES));
    for (g, v) in (&mut g_chunks).zip(&mut v_chunks) {
        for i in 0..LANES {
            let g = g[i].to_f64();
            s[i] += g;
            sx[i] += g * v[i].to_f64();
        }
    }
    let (mut ts, mut tsx) = (0.0, 0.0);
    for (g, v) in g_chunks.remainder().iter().zip(v_chunks.remainder()) {
        ts += g.to_f64();
        tsx += g.to_f64() * v.to_f64();
    }
    (s.iter().sum::<f64>() + ts, sx.iter().sum::<f64>() + tsx)
}

/// Mean and biased variance of every channel, two-pass for accuracy.
fn channel_stats<T: WithDType>(x: &[T], (b, c, hw): (usize, usize, usize)) -> BatchStats {
    let count = b * hw;
    let planes = |ch: usize| (0..b).map(move |i| &x[(i * c + ch) * hw..][..hw]);
    let (mean, var) = (0..c)
        .into_par_iter()
        .map(|ch| {
            let sum: f64 = planes(ch).map(|p| lane_sum(p, |v| v)).sum();
            let mean = sum / count as f64;
            let sq: f64 = planes(ch).map(|p| lane_sum(p, |v| (v - mean) * (v - mean))).sum();
            (mean, sq / count as f64)
        })
        .unzip();
    BatchStats { mean, var, count }
}

/// `(x, weight, bias) → relu?(bn(x))`, or with `residual`, `(x, residual, [γ; β]) → relu(bn(x) + residual)`.
struct BatchNormTrain {
    eps: f64,
    relu: bool,
    residual: bool,
    /// Written by the forward pass, read by the caller (running statistics) and by the backward pass.
    stats: Arc<Mutex<Option<BatchStats>>>,
}

fn dims(l: &Layout) -> Result<(usize, usize, usize)> {
    let (b, c, h, w) = l.shape().dims4()?;
    Ok((b, c, h * w))
}

/// `y = relu?((x − μ)·s·γ + β + residual)` with the batch's statistics.
fn forward<T: WithDType>(
    x: &[T],
    (weight, bias): (&[T], &[T]),
    residual: Option<&[T]>,
    shape: (usize, usize, usize),
    eps: f64,
    relu: bool,
) -> (Vec<T>, BatchStats) {
    let (_, c, hw) = shape;
    let stats = channel_stats(x, shape);
    // In the element type: (x − μ)·s + β rather than x·s + (β − μ·s), so that f32 loses nothing to cancellation
    // where the mean is large against the spread.
    let affine: Vec<(T, T, T)> = (0..c)
        .map(|ch| {
            let scale = weight[ch].to_f64() / (stats.var[ch] + eps).sqrt();
            (T::from_f64(stats.mean[ch]), T::from_f64(scale), bias[ch])
        })
        .collect();
    let mut y = super::output_buffer(x.len());
    let finish = move |y: T| {
        // Also maps NaN to 0, as `max(0)` did.
        let clamp = relu && y.partial_cmp(&T::zero()) != Some(std::cmp::Ordering::Greater);
        if clamp {
            T::zero()
        } else {
            y
        }
    };
    y.par_chunks_mut(hw)
        .zip(x.par_chunks(hw))
        .enumerate()
        .for_each(|(plane, (out, input))| {
            let (mean, scale, shift) = affine[plane % c];
            match residual {
                Some(r) => {
                    let r = &r[plane * hw..][..hw];
                    for ((o, &v), &r) in out.iter_mut().zip(input).zip(r) {
                        *o = finish((v - mean) * scale + shift + r);
                    }
                }
                None => {
                    for (o, &v) in out.iter_mut().zip(input) {
                        *o = finish((v - mean) * scale + shift);
                    }
                }
            }
        });
    (y, stats)
}

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        if self.residual {
            "semseg-batch-norm-add-relu-train"
        } else {
            "semseg-batch-norm-train"
        }
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let shape = dims(xl)?;
        let c = shape.1;
        // (weight, bias), or with a residual (residual, [γ; β]).
        let fits = match self.residual {
            true => l2.shape() == xl.shape() && l3.shape().elem_count() == 2 * c,
            false => l2.shape().elem_count() == c && l3.shape().elem_count() == c,
        };
        if !fits {
            candle_core::bail!(
                "batch norm: input {:?} (C = {c}) with {} {:?} and {:?}",
                xl.shape(),
                if self.residual {
                    "residual and [2C] parameters"
                } else {
                    "[C] weight and bias"
                },
                l2.shape(),
                l3.shape()
            )
        }
        fn run<T: WithDType>(
            op: &BatchNormTrain,
            (x, second, third): (&[T], &[T], &[T]),
            shape: (usize, usize, usize),
        ) -> (Vec<T>, BatchStats) {
            match op.residual {
                true => forward(x, third.split_at(shape.1), Some(second), shape, op.eps, op.relu),
                false => forward(x, (second, third), None, shape, op.eps, op.relu),
            }
        }
        const WHAT: &str = "batch norm";
        let (y, stats) = match (xs, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(a), CpuStorage::F32(b)) => {
                let operands = (
                    contiguous_slice(x, xl, WHAT)?,
                    contiguous_slice(a, l2, WHAT)?,
                    contiguous_slice(b, l3, WHAT)?,
                );
                let (y, stats) = run(self, operands, shape);
                (CpuStorage::F32(y), stats)
            }
            (CpuStorage::F64(x), CpuStorage::F64(a), CpuStorage::F64(b)) => {
                let operands = (
                    contiguous_slice(x, xl, WHAT)?,
                    contiguous_slice(a, l2, WHAT)?,
                    contiguous_slice(b, l3, WHAT)?,
                );
                let (y, stats) = run(self, operands, shape);
                (CpuStorage::F64(y), stats)
            }
            _ => candle_core::bail!("batch norm: input and parameters (and residual) must all be f32 or all f64"),
        };
        *lock(&self.stats) = Some(stats);
        Ok((y, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        second: &Tensor,
        third: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let stats = lock(&self.stats)
            .clone()
            .ok_or_else(|| candle_core::Error::Msg("batch norm: backward before forward".into()))?;
        let mut grad = grad.contiguous()?;
        if self.relu {
            // Through the ReLU first: no gradient where the output was clamped to zero.
            grad = grad.apply_op2_no_bwd(&res.contiguous()?, &ReluMask)?;
        }
        if self.residual {
            // The residual's gradient is the masked one; γ and β share the third operand.
            let weight = third.narrow(0, 0, stats.mean.len())?;
            let (dx, dgamma, dbeta) = normalisation_grads(&stats, self.eps, x, &weight, &grad)?;
            return Ok((Some(dx), Some(grad), Some(Tensor::cat(&[dgamma, dbeta], 0)?)));
        }
        let (dx, dgamma, dbeta) = normalisation_grads(&stats, self.eps, x, second, &grad)?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

/// Backward of the normalisation `(x − μ)·s·γ + β` alone, for `grad` its output's gradient: (∂x, ∂γ, ∂β).
fn normalisation_grads(
    stats: &BatchStats,
    eps: f64,
    x: &Tensor,
    weight: &Tensor,
    grad: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let inv_std: Vec<f64> = stats.var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    // [2, C]: Σ dy and Σ dy·x̂ per channel.
    let sums = grad
        .apply_op2_no_bwd(
            x,
            &GradSums {
                mean: stats.mean.clone(),
                inv_std: inv_std.clone(),
            },
        )?
        .to_dtype(DType::F64)?
        .to_vec2::<f64>()?;
    let (sum_dy, sum_dy_xhat) = (&sums[0], &sums[1]);
    let gamma = weight.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let n = stats.count as f64;
    // ∂x = α·dy + β·(x − μ) + γ₀ per channel (the formula above, expanded).
    let coefficients: Vec<[f64; 4]> = (0..gamma.len())
        .map(|ch| {
            let k = gamma[ch] * inv_std[ch];
            let beta = -k * sum_dy_xhat[ch] * inv_std[ch] / n;
            [k, beta, -k * sum_dy[ch] / n, stats.mean[ch]]
        })
        .collect();
    let dx = grad.apply_op2_no_bwd(x, &InputGrad { coefficients })?;
    let channels = gamma.len();
    let to_param = |v: &[f64]| Tensor::from_slice(v, channels, weight.device())?.to_dtype(weight.dtype());
    Ok((dx, to_param(sum_dy_xhat)?, to_param(sum_dy)?))
}

/// A backward kernel over (dy, x), both `[B, C, H, W]` contiguous; the two ops below share the dtype dispatch.
trait GradKernel {
    fn run<T: WithDType>(&self, dy: &[T], x: &[T], shape: (usize, usize, usize)) -> Vec<T>;
}

fn run_grad_kernel(
    k: &impl GradKernel,
    gs: &CpuStorage,
    gl: &Layout,
    xs: &CpuStorage,
    xl: &Layout,
) -> Result<CpuStorage> {
    let shape = dims(xl)?;
    // The kernels zip the gradient with the input and write one output element per pair.
    if gl.shape() != xl.shape() {
        candle_core::bail!(
            "batch norm backward: gradient {:?} and input {:?} differ in shape",
            gl.shape(),
            xl.shape()
        )
    }
    Ok(match (gs, xs) {
        (CpuStorage::F32(g), CpuStorage::F32(x)) => CpuStorage::F32(k.run(
            contiguous_slice(g, gl, "batch norm backward")?,
            contiguous_slice(x, xl, "batch norm backward")?,
            shape,
        )),
        (CpuStorage::F64(g), CpuStorage::F64(x)) => CpuStorage::F64(k.run(
            contiguous_slice(g, gl, "batch norm backward")?,
            contiguous_slice(x, xl, "batch norm backward")?,
            shape,
        )),
        _ => candle_core::bail!("batch norm backward: gradient and input must both be f32 or f64"),
    })
}

/// (dy, x) → `[2, C]`: Σ dy and Σ dy·x̂ per channel.
struct GradSums {
    mean: Vec<f64>,
    inv_std: Vec<f64>,
}

impl GradKernel for GradSums {
    fn run<T: WithDType>(&self, dy: &[T], x: &[T], (b, c, hw): (usize, usize, usize)) -> Vec<T> {
        let per_channel: Vec<(f64, f64)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let (mut s, mut sx) = (0.0, 0.0);
                for i in 0..b {
                    let at = (i * c + ch) * hw;
                    let (ps, psx) = lane_sums_with(&dy[at..at + hw], &x[at..at + hw]);
                    s += ps;
                    sx += psx;
                }
                // Σ dy·(x − μ)·s = s·(Σ dy·x − μ·Σ dy)
                (s, self.inv_std[ch] * (sx - self.mean[ch] * s))
            })
            .collect();
        per_channel
            .iter()
            .map(|p| T::from_f64(p.0))
            .chain(per_channel.iter().map(|p| T::from_f64(p.1)))
            .collect()
    }
}

impl CustomOp2 for GradSums {
    fn name(&self) -> &'static str {
        "semseg-batch-norm-grad-sums"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = run_grad_kernel(self, gs, gl, xs, xl)?;
        Ok((out, Shape::from((2, dims(xl)?.1))))
    }
}

/// (dy, x) → ∂x = α_c·dy + β_c·(x − μ_c) + γ_c, in the element type: centred first, so that f32 loses nothing
/// to cancellation where the mean is large against the spread.
struct InputGrad {
    /// [α, β, γ, μ] per channel.
    coefficients: Vec<[f64; 4]>,
}

impl GradKernel for InputGrad {
    fn run<T: WithDType>(&self, dy: &[T], x: &[T], (_, c, hw): (usize, usize, usize)) -> Vec<T> {
        let mut dx = super::output_buffer(x.len());
        dx.par_chunks_mut(hw)
            .zip(dy.par_chunks(hw).zip(x.par_chunks(hw)))
            .enumerate()
            .for_each(|(plane, (out, (g, v)))| {
                let [a, b, c0, mean] = self.coefficients[plane % c].map(T::from_f64);
                for ((o, &g), &v) in out.iter_mut().zip(g).zip(v) {
                    *o = a * g + b * (v - mean) + c0;
                }
            });
        dx
    }
}

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "semseg-batch-norm-input-grad"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = run_grad_kernel(self, gs, gl, xs, xl)?;
        Ok((out, xl.shape().clone()))
    }
}

/// (dy, y) → dy where y > 0, else 0: the ReLU's backward, in parallel.
pub(crate) struct ReluMask;

impl GradKernel for ReluMask {
    fn run<T: WithDType>(&self, dy: &[T], y: &[T], _shape: (usize, usize, usize)) -> Vec<T> {
        let mut out = super::output_buffer(dy.len());
        const STRIPE: usize = 1 << 14;
        out.par_chunks_mut(STRIPE)
            .zip(dy.par_chunks(STRIPE).zip(y.par_chunks(STRIPE)))
            .for_each(|(o, (dy, y))| {
                // A select, not a branch on the sign: half the branches mispredicted, and the loop did not
                // vectorise.
                for ((o, &d), &v) in o.iter_mut().zip(dy).zip(y) {
                    *o = if v > T::zero() { d } else { T::zero() };
                }
            });
        out
    }
}

impl CustomOp2 for ReluMask {
    fn name(&self) -> &'static str {
        "semseg-relu-mask"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout, ys: &CpuStorage, yl: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((run_grad_kernel(self, gs, gl, ys, yl)?, yl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::gradcheck::{check_gradients, seeded};

    /// The backward kernels write one output element per (gradient, input) pair into a buffer that is not zeroed
    /// first: a gradient of another shape is refused, not zipped short.
    #[test]
    fn backward_kernels_refuse_a_gradient_of_another_shape() -> Result<()> {
        let x = seeded(&[2, 3, 4, 1], 1)?;
        let dy = seeded(&[2, 3, 2, 1], 2)?;
        let err = dy.apply_op2_no_bwd(&x, &ReluMask).unwrap_err().to_string();
        assert!(err.contains("differ in shape"), "{err}");
        Ok(())
    }

    /// The composed reference: what `BatchNorm2d` computed before this op.
    fn composed(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
        let n = (x.dim(0)? * x.dim(2)? * x.dim(3)?) as f64;
        let c = x.dim(1)?;
        let mean = x.sum_keepdim(3)?.sum_keepdim(2)?.sum_keepdim(0)?.affine(1.0 / n, 0.0)?;
        let centred = x.broadcast_sub(&mean)?;
        let var = centred
            .sqr()?
            .sum_keepdim(3)?
            .sum_keepdim(2)?
            .sum_keepdim(0)?
            .affine(1.0 / n, 0.0)?;
        let inv = (var + eps)?.sqrt()?.recip()?;
        centred
            .broadcast_mul(&inv.broadcast_mul(&w.reshape((1, c, 1, 1))?)?)?
            .broadcast_add(&b.reshape((1, c, 1, 1))?)
    }

    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        for relu in [false, true] {
            check_gradients(&[&[2, 3, 4, 5], &[3], &[3]], |t| {
                Ok(batch_norm_train(&t[0], &t[1], &t[2], 1e-5, relu)?.0)
            })?;
        }
        Ok(())
    }

    #[test]
    fn add_relu_variant_gradients_match_finite_differences() -> Result<()> {
        check_gradients(&[&[2, 3, 4, 5], &[3], &[3], &[2, 3, 4, 5]], |t| {
            Ok(batch_norm_add_relu_train(&t[0], &t[1], &t[2], 1e-5, &t[3])?.0)
        })
    }

    /// `relu(bn(x) + r)` fused: the same output, statistics and four gradients as the BatchNorm op followed by the
    /// add + ReLU op, and a graph that holds x and r but not the BatchNorm's own output.
    #[test]
    fn add_relu_variant_matches_the_two_ops_and_keeps_less() -> Result<()> {
        let x = seeded(&[2, 4, 5, 6], 11)?.affine(2.0, 0.3)?.to_dtype(DType::F32)?;
        let r = seeded(&[2, 4, 5, 6], 12)?.to_dtype(DType::F32)?;
        let w = seeded(&[4], 13)?.to_dtype(DType::F32)?;
        let b = seeded(&[4], 14)?.to_dtype(DType::F32)?;
        let weighting = seeded(&[2, 4, 5, 6], 15)?.to_dtype(DType::F32)?;
        let vars: Vec<candle_core::Var> = [&x, &r, &w, &b]
            .iter()
            .map(|t| candle_core::Var::from_tensor(t))
            .collect::<Result<_>>()?;
        let [xv, rv, wv, bv] = [0, 1, 2, 3].map(|i| vars[i].as_tensor());
        // Downstream of other ops, as in a network.
        let (xi, ri) = (xv.affine(1.0, 0.0)?, rv.affine(1.0, 0.0)?);
        let (fused, mean, var) = batch_norm_add_relu_train(&xi, wv, bv, 1e-5, &ri)?;
        let (bn, mean_ref, var_ref) = batch_norm_train(&xi, wv, bv, 1e-5, false)?;
        let two_ops = super::super::add_relu::add_relu(&bn, &ri)?;
        let max_diff = |a: &Tensor, b: &Tensor| -> Result<f32> { (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar() };
        assert_eq!(max_diff(&fused, &two_ops)?, 0.0);
        assert_eq!(mean.to_vec1::<f64>()?, mean_ref.to_vec1::<f64>()?);
        assert_eq!(var.to_vec1::<f64>()?, var_ref.to_vec1::<f64>()?);
        let g_fused = (&fused * &weighting)?.sum_all()?.backward()?;
        let g_two = (&two_ops * &weighting)?.sum_all()?.backward()?;
        for v in &vars {
            let (a, b) = (
                g_fused.get(v.as_tensor()).expect("fused grad"),
                g_two.get(v.as_tensor()).expect("grad"),
            );
            assert!(max_diff(a, b)? < 1e-6, "{:?}: {}", v.dims(), max_diff(a, b)?);
        }
        let held = |t: &Tensor| -> usize {
            t.sorted_nodes()
                .iter()
                .filter(|n| !n.is_variable() && n.elem_count() == x.elem_count())
                .count()
        };
        // x's and r's copies, and the output; the two ops also keep the BatchNorm's output.
        assert_eq!(held(&fused), 3);
        assert_eq!(held(&two_ops), 4);
        Ok(())
    }

    /// f32 against f64 on planes of several lane blocks plus a tail, with a mean 1000 times the spread: the f32
    /// kernels centre before they scale, so nothing is lost to cancellation.
    #[test]
    fn f32_matches_f64_where_the_mean_dwarfs_the_spread() -> Result<()> {
        let x64 = seeded(&[2, 3, 37, 41], 5)?.affine(1.0, 1000.0)?;
        let (w64, b64, r64) = (seeded(&[3], 6)?, seeded(&[3], 7)?, seeded(&[2, 3, 37, 41], 8)?);
        let f32s = |t: &Tensor| t.to_dtype(DType::F32);
        for relu in [false, true] {
            let grads = |x: &Tensor, w: &Tensor, b: &Tensor, r: &Tensor| -> Result<(Tensor, Tensor)> {
                let x = candle_core::Var::from_tensor(x)?;
                let y = batch_norm_train(x.as_tensor(), w, b, 1e-5, relu)?.0;
                let dx = (&y * r)?
                    .sum_all()?
                    .backward()?
                    .get(x.as_tensor())
                    .expect("input grad")
                    .clone();
                Ok((y.to_dtype(DType::F64)?, dx.to_dtype(DType::F64)?))
            };
            let (y64, dx64) = grads(&x64, &w64, &b64, &r64)?;
            let (y32, dx32) = grads(&f32s(&x64)?, &f32s(&w64)?, &f32s(&b64)?, &f32s(&r64)?)?;
            let rel = |a: &Tensor, b: &Tensor| -> Result<f64> {
                Ok(((a - b)?.sqr()?.sum_all()?.to_scalar::<f64>()? / b.sqr()?.sum_all()?.to_scalar::<f64>()?).sqrt())
            };
            // The f32 input itself is 1000 ± 1 rounded to 6e-5 of the spread.
            assert!(rel(&y32, &y64)? < 1e-4, "relu {relu}: forward {}", rel(&y32, &y64)?);
            assert!(
                rel(&dx32, &dx64)? < 1e-3,
                "relu {relu}: input gradient {}",
                rel(&dx32, &dx64)?
            );
        }
        Ok(())
    }

    #[test]
    fn forward_backward_and_statistics_match_the_composed_ops() -> Result<()> {
        let x = seeded(&[3, 4, 5, 6], 1)?.affine(3.0, 0.7)?.to_dtype(DType::F32)?;
        let w = seeded(&[4], 2)?.to_dtype(DType::F32)?;
        let b = seeded(&[4], 3)?.to_dtype(DType::F32)?;
        let r = seeded(&[3, 4, 5, 6], 4)?.to_dtype(DType::F32)?;
        for relu in [false, true] {
            let vars: Vec<candle_core::Var> = [&x, &w, &b]
                .iter()
                .map(|t| candle_core::Var::from_tensor(t))
                .collect::<Result<_>>()?;
            let (fused, _, _) = batch_norm_train(
                vars[0].as_tensor(),
                vars[1].as_tensor(),
                vars[2].as_tensor(),
                1e-5,
                relu,
            )?;
            let mut reference = composed(vars[0].as_tensor(), vars[1].as_tensor(), vars[2].as_tensor(), 1e-5)?;
            if relu {
                reference = reference.relu()?;
            }
            let max_diff =
                |a: &Tensor, b: &Tensor| -> Result<f32> { (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar() };
            assert!(max_diff(&fused, &reference)? < 1e-5, "relu {relu}");
            let g_fused = (&fused * &r)?.sum_all()?.backward()?;
            let g_ref = (&reference * &r)?.sum_all()?.backward()?;
            for v in &vars {
                let (a, b) = (
                    g_fused.get(v.as_tensor()).expect("fused grad"),
                    g_ref.get(v.as_tensor()).expect("grad"),
                );
                assert!(max_diff(a, b)? < 1e-4, "relu {relu}: {:?}", v.dims());
            }
        }
        let (_, batch_mean, batch_var) = batch_norm_train(&x, &w, &b, 1e-5, false)?;
        let mean = x
            .mean_keepdim(3)?
            .mean_keepdim(2)?
            .mean_keepdim(0)?
            .flatten_all()?
            .to_dtype(DType::F64)?;
        let var = x
            .broadcast_sub(&mean.to_dtype(DType::F32)?.reshape((1, 4, 1, 1))?)?
            .sqr()?
            .mean_keepdim(3)?
            .mean_keepdim(2)?
            .mean_keepdim(0)?
            .flatten_all()?
            .to_dtype(DType::F64)?;
        assert_eq!((batch_mean.dtype(), batch_mean.dims()), (DType::F64, &[4][..]));
        for (got, want) in batch_mean.to_vec1::<f64>()?.iter().zip(mean.to_vec1::<f64>()?) {
            assert!((got - want).abs() < 1e-5);
        }
        for (got, want) in batch_var.to_vec1::<f64>()?.iter().zip(var.to_vec1::<f64>()?) {
            assert!((got - want).abs() < 1e-4 * want.max(1.0), "{got} vs {want}");
        }
        let (_, stats) = batch_norm_train_cpu(&x, (&w, &b), 1e-5, (false, false))?;
        assert_eq!(stats.count, 3 * 5 * 6);
        Ok(())
    }
}

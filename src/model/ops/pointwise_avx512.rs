//! 1×1 stride-1 convolutions on our own AVX-512 micro-kernel, with the epilogue (bias, residual, ReLU) applied in
//! registers: `out[Cout, n] = relu?(W[Cout, Cin] · x[Cin, n] + residual + bias)`.
//!
//! On the gemm crate the product runs near the cores' rate, but its epilogue is a separate pass over each task's
//! output block (`Cout × 256` values, up to 2 MiB), which has left L2 by then: on an Intel Xeon with AVX-512
//! (2026-12-06, `bench_conv --plain` against the default bias + ReLU) the pass added 16% to a 512 → 2048
//! convolution at 64² and 14% to a 256 → 1024 one, 27% with a residual at 128². Here each `MR × NR` tile of the
//! output is stored once, its residual, bias and ReLU applied while it is in registers:
//! - the weight is packed once per convolution into panels of [`MR`] output channels (`[panel][Cin][MR]`);
//! - each task takes a block of columns (pixels) and, k block by k block ([`KC`] input channels), packs them into
//!   64-byte aligned panels of [`NR`] pixels (`[panel][KC][NR]`), which every weight panel then passes over;
//! - the micro-kernel keeps `MR × NR` sums in 24 registers over a k block, adding the block's sums onto the
//!   output's partial ones after the first block, and applies the epilogue after the last.
//!
//! Each output value is its sum over `Cin` in order, then `+ residual + bias`, as [`super::epilogue`] adds them;
//! the gemm crate sums in another order, so results differ from its in the last bits.
//!
//! Measured against the gemm crate with its pass (`bench_conv`, same minutes, Intel Xeon model 167, 2 threads):
//! 256 → 1024 at 64² with a residual 8.6 → 7.6 ms, 512 → 2048 32.4 → 30.6, 64 → 256 at 128² 3.1 → 2.6; the
//! 2048-channel inputs without a residual ran 3% slower and stay on the gemm crate ([`suits`]). Whole networks,
//! three alternating rounds: DeepLabV3-ResNet-50 at 512² 863 / 866 / 879 → 839 / 838 / 850 ms, FCN 708 / 715 /
//! 729 → 713 / 687 / 690, PSPNet 851 / 891 / 880 → 847 / 828 / 858.
//!
//! The block sizes were chosen by measurement on that CPU (2 MiB L2 a core): [`BLOCK_BYTES`] 1 → 4 MiB and
//! [`KC`] 256 → 512 took 512 → 2048 from 40.6 to 31.8 ms and 1024 → 2048 from 74.8 to 63.3; aligning the packed
//! panels to 64 bytes 33.3 → 29.1 ms (a vector load that splits a cache line costs two).

use std::sync::OnceLock;

use rayon::prelude::*;

use super::conv_cpu::at_least;
use super::epilogue::Epilogue;

/// Output channels of the micro-kernel's tile (broadcast from the packed weight).
const MR: usize = 6;
/// Pixels of the micro-kernel's tile: four vectors of 16 f32.
const NR: usize = 64;
/// Bytes of one task's output block (`Cout × columns`), which sets the columns per task. Larger than L2: the partial
/// sums between k blocks then come from L3, but each weight panel serves more pixels (measured best of 1, 2 and 4 MiB).
const BLOCK_BYTES: usize = 4 << 20;
/// At most this many pixel panels a task, so that small outputs still split into tasks.
const MAX_PANELS_PER_TASK: usize = 8;
/// Input channels per k block: a pixel panel's slice (`KC × NR`, 128 KiB) streams from L2, the weight panel's
/// (`KC × MR`, 12 KiB) stays in L1 across the block's pixel panels.
const KC: usize = 512;

/// Whether this CPU runs the kernel (AVX-512F, checked once at run time).
pub(crate) fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx512f")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// A row-major `[Cout, Cin]` weight as `[panel][Cin][MR]`, zero in the rows beyond `Cout`.
pub(crate) struct PackedWeight {
    values: Vec<f32>,
    cout: usize,
    cin: usize,
}

impl PackedWeight {
    /// Packs `weight` (`[cout, cin]`, row-major), panels in parallel.
    pub(crate) fn new(weight: &[f32], cout: usize, cin: usize) -> Self {
        assert!(
            weight.len() >= cout * cin,
            "PackedWeight: {} values, not {cout} × {cin}",
            weight.len()
        );
        let panels = cout.div_ceil(MR);
        let mut values = vec![0f32; panels * cin * MR];
        values
            .par_chunks_exact_mut(cin * MR)
            .enumerate()
            .for_each(|(p, panel)| {
                for r in 0..MR.min(cout - p * MR) {
                    let row = &weight[(p * MR + r) * cin..][..cin];
                    for (c, &w) in row.iter().enumerate() {
                        panel[c * MR + r] = w;
                    }
                }
            });
        Self { values, cout, cin }
    }

    fn panel(&self, p: usize) -> &[f32] {
        &self.values[p * self.cin * MR..][..self.cin * MR]
    }
}

/// Whether a 1×1 convolution with `cin` input channels and this epilogue runs here rather than on the gemm crate:
/// where there is an epilogue to fuse (an inference model's folded convolutions; without one, as in training's
/// forward and input gradients, the gemm crate's product alone ran 1.5% faster on DeepLabV3-ResNet-50's training
/// step), except the 2048-channel inputs without a residual, where the gemm crate was 3% faster.
pub(crate) fn suits(cin: usize, epilogue: &Epilogue) -> bool {
    available() && cin > 0 && !epilogue.is_identity() && (cin < 2048 || epilogue.residual.is_some())
}

/// Pixels per task: up to [`BLOCK_BYTES`] of output (`Cout × columns`), at most [`MAX_PANELS_PER_TASK`] panels.
pub(crate) fn columns_per_task(cout: usize) -> usize {
    ((BLOCK_BYTES / 4 / cout.max(1)) / NR).clamp(1, MAX_PANELS_PER_TASK) * NR
}

thread_local! {
    static PACKED_X: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Columns `cols` of `out` (`[Cout, n]`, rows `n` apart) from `x` (`[Cin, n]`), the epilogue applied, on this
/// thread.
///
/// # Safety
/// The CPU must have AVX-512F ([`available`]); `x` must hold `Cin × n` values and `out` `Cout × n`; `cols` must lie
/// in `0..n`; no other thread may touch these columns of `out`.
pub(crate) unsafe fn columns(
    w: &PackedWeight,
    x: *const f32,
    out: *mut f32,
    n: usize,
    cols: std::ops::Range<usize>,
    epilogue: &Epilogue,
) {
    let (cout, cin) = (w.cout, w.cin);
    let width = cols.len();
    if width == 0 || cout == 0 {
        return;
    }
    let pixel_panels = width.div_ceil(NR);
    let kc_max = KC.min(cin);
    let k_blocks = cin.div_ceil(kc_max);
    let mut packed = PACKED_X.take();
    // 64-byte aligned where the allocation allows (it always does), so that no vector load of a panel splits a
    // cache line.
    let buf = at_least(&mut packed, pixel_panels * kc_max * NR + 16);
    let skip = buf.as_ptr().align_offset(64).min(16);
    let xp = &mut buf[skip..];
    for kb in 0..k_blocks {
        let (k0, kc) = (kb * kc_max, (cin - kb * kc_max).min(kc_max));
        for c in 0..kc {
            let row = std::slice::from_raw_parts(x.add((k0 + c) * n + cols.start), width);
            for (i, chunk) in row.chunks(NR).enumerate() {
                let dst = &mut xp[(i * kc + c) * NR..][..NR];
                if chunk.len() == NR {
                    x86::copy_panel_row(chunk.as_ptr(), dst.as_mut_ptr());
                } else {
                    dst[..chunk.len()].copy_from_slice(chunk);
                    dst[chunk.len()..].fill(0.0);
                }
            }
        }
        let (first, last) = (kb == 0, kb + 1 == k_blocks);
        for p in 0..cout.div_ceil(MR) {
            let wp = &w.panel(p)[k0 * MR..][..kc * MR];
            let rows = (cout - p * MR).min(MR);
            let mut bias = [0f32; MR];
            if let Some(b) = epilogue.bias {
                bias[..rows].copy_from_slice(&b[p * MR..p * MR + rows]);
            }
            for i in 0..pixel_panels {
                let col = cols.start + i * NR;
                let tile_width = (width - i * NR).min(NR);
                let at = p * MR * n + col;
                let finish = last.then(|| (&bias, epilogue.residual.map(|r| r.as_ptr().add(at)), epilogue.relu));
                x86::tile(
                    kc,
                    (xp.as_ptr().add(i * kc * NR), wp.as_ptr()),
                    (out.add(at), n, rows, tile_width),
                    first,
                    finish,
                );
            }
        }
    }
    PACKED_X.set(packed);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{MR, NR};

    /// One row of a pixel panel: `NR` values from `src` to `dst` (one call rather than `memcpy`'s per row: the
    /// copies were 10% of a 2048 → 512 convolution's samples).
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `src` must hold `NR` values and `dst` room for them.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn copy_panel_row(src: *const f32, dst: *mut f32) {
        for q in 0..NR / 16 {
            _mm512_storeu_ps(dst.add(16 * q), _mm512_loadu_ps(src.add(16 * q)));
        }
    }

    /// One `rows × width` tile (at most `MR × NR`) of the output at `dst` (rows `ld` apart) over one k block of
    /// `kc`: the packed weight panel `w` (`[kc][MR]`) times the packed pixel panel `x` (`[kc][NR]`), added onto the
    /// partial sums in `dst` unless `first`; with `finish` (the last block), plus the residual (rows `ld` apart)
    /// and the bias, then the ReLU.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; the panels must hold `kc` rows; `dst` and `residual` must cover the tile.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile(
        kc: usize,
        (x, w): (*const f32, *const f32),
        (dst, ld, rows, width): (*mut f32, usize, usize, usize),
        first: bool,
        finish: Option<(&[f32; MR], Option<*const f32>, bool)>,
    ) {
        let mut masks = [0 as __mmask16; 4];
        for (q, m) in masks.iter_mut().enumerate() {
            let lanes = width.saturating_sub(16 * q).min(16);
            *m = ((1u32 << lanes) - 1) as __mmask16;
        }
        let mut acc = [[_mm512_setzero_ps(); 4]; MR];
        if !first {
            for (r, acc) in acc.iter_mut().enumerate().take(rows) {
                for (q, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_maskz_loadu_ps(masks[q], dst.add(r * ld + 16 * q));
                }
            }
        }
        let (mut x, mut w) = (x, w);
        #[inline(always)]
        unsafe fn step(acc: &mut [[__m512; 4]; MR], x: *const f32, w: *const f32) {
            let x0 = _mm512_loadu_ps(x);
            let x1 = _mm512_loadu_ps(x.add(16));
            let x2 = _mm512_loadu_ps(x.add(32));
            let x3 = _mm512_loadu_ps(x.add(48));
            for (r, acc) in acc.iter_mut().enumerate() {
                let wv = _mm512_set1_ps(*w.add(r));
                acc[0] = _mm512_fmadd_ps(wv, x0, acc[0]);
                acc[1] = _mm512_fmadd_ps(wv, x1, acc[1]);
                acc[2] = _mm512_fmadd_ps(wv, x2, acc[2]);
                acc[3] = _mm512_fmadd_ps(wv, x3, acc[3]);
            }
        }
        // Four k at a time, the pixel panel's rows 16 k ahead fetched into L1 (a prefetch past the panel's end is
        // harmless: it never faults).
        for _ in 0..kc / 4 {
            for q in 0..4 {
                _mm_prefetch::<_MM_HINT_T0>(x.wrapping_add(16 * NR + 16 * q) as *const i8);
            }
            step(&mut acc, x, w);
            step(&mut acc, x.add(NR), w.add(MR));
            step(&mut acc, x.add(2 * NR), w.add(2 * MR));
            step(&mut acc, x.add(3 * NR), w.add(3 * MR));
            x = x.add(4 * NR);
            w = w.add(4 * MR);
        }
        for _ in 0..kc % 4 {
            step(&mut acc, x, w);
            x = x.add(NR);
            w = w.add(MR);
        }
        for (r, acc) in acc.iter().enumerate().take(rows) {
            for (q, &v) in acc.iter().enumerate() {
                let mut v = v;
                if let Some((bias, residual, relu)) = finish {
                    if let Some(res) = residual {
                        v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(masks[q], res.add(r * ld + 16 * q)));
                    }
                    v = _mm512_add_ps(v, _mm512_set1_ps(bias[r]));
                    if relu {
                        v = _mm512_max_ps(v, _mm512_setzero_ps());
                    }
                }
                _mm512_mask_storeu_ps(dst.add(r * ld + 16 * q), masks[q], v);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    use super::MR;

    /// Never called: [`super::available`] is false off x86_64.
    pub(super) unsafe fn copy_panel_row(_: *const f32, _: *mut f32) {
        unreachable!("pointwise_avx512 runs only on x86_64")
    }

    /// Never called: [`super::available`] is false off x86_64.
    pub(super) unsafe fn tile(
        _: usize,
        _: (*const f32, *const f32),
        _: (*mut f32, usize, usize, usize),
        _: bool,
        _: Option<(&[f32; MR], Option<*const f32>, bool)>,
    ) {
        unreachable!("pointwise_avx512 runs only on x86_64")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::conv_cpu::tests::seeded;

    /// `relu?(W · x + residual + bias)` in f64.
    fn reference(w: &[f32], x: &[f32], (cout, cin, n): (usize, usize, usize), e: &Epilogue) -> Vec<f64> {
        let mut out = vec![0f64; cout * n];
        for o in 0..cout {
            for p in 0..n {
                let mut sum: f64 = (0..cin).map(|c| w[o * cin + c] as f64 * x[c * n + p] as f64).sum();
                sum += e.residual.map_or(0.0, |r| r[o * n + p] as f64);
                sum += e.bias.map_or(0.0, |b| b[o] as f64);
                out[o * n + p] = if e.relu { sum.max(0.0) } else { sum };
            }
        }
        out
    }

    #[test]
    fn every_edge_matches_the_definition_and_only_the_given_columns_are_written() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512F, so the kernel never runs here");
            return;
        }
        // (cin, cout, n): one k block and a short one; several blocks with a remainder that is not a multiple of
        // the unrolled 4; output channels beyond whole panels; pixel panels with tails; a single pixel.
        for (cin, cout, n) in [(3, 5, 7), (64, 12, 130), (1030, 13, 150), (517, 6, 64), (40, 7, 1)] {
            let w = seeded(cout * cin, 1);
            let x = seeded(cin * n, 2);
            let residual = seeded(cout * n, 3);
            let bias = seeded(cout, 4);
            let packed = PackedWeight::new(&w, cout, cin);
            for (with_bias, with_residual, relu) in [(false, false, false), (true, false, true), (true, true, true)] {
                let e = Epilogue {
                    bias: with_bias.then_some(&bias[..]),
                    residual: with_residual.then_some(&residual[..]),
                    relu,
                };
                let want = reference(&w, &x, (cout, cin, n), &e);
                // Columns in two tasks' ranges, the first ending inside a pixel panel; one column left unwritten.
                let split = (n / 2).max(1).min(n);
                let mut out = vec![f32::NAN; cout * n];
                // SAFETY: AVX-512F is present; `x` is [cin, n], `out` [cout, n]; the ranges lie in 0..n.
                unsafe {
                    columns(&packed, x.as_ptr(), out.as_mut_ptr(), n, 0..split, &e);
                    if n > 1 {
                        columns(&packed, x.as_ptr(), out.as_mut_ptr(), n, split..n - 1, &e);
                    }
                }
                for o in 0..cout {
                    for p in 0..n {
                        let got = out[o * n + p];
                        if n > 1 && p == n - 1 {
                            assert!(
                                got.is_nan(),
                                "column {p} outside the ranges was written ({cin}, {cout}, {n})"
                            );
                            continue;
                        }
                        let want = want[o * n + p];
                        assert!(
                            (got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()) * (cin as f64).sqrt(),
                            "({cin}, {cout}, {n}) {e:?}: out[{o}, {p}] = {got}, want {want}"
                        );
                        if relu {
                            assert!(got >= 0.0);
                        }
                    }
                }
            }
        }
    }
}

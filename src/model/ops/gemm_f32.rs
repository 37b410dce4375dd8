//! f32 matrix products on our own AVX2/FMA micro-kernel, for CPUs without AVX-512 (AMD before Zen 4, Intel
//! client CPUs, Haswell to Broadwell servers), where the gemm crate's AVX2 kernel reads its right-hand operand
//! unpacked, at strides, and ran a 1×1 convolution's product at about half of the cores' FMA peak.
//!
//! `dst[m, n] += lhs[m, k] · rhs[k, n]`, blocked as BLIS does, with k in blocks of [`KC`]:
//! - `lhs` (a convolution's weight) is packed once per convolution into micro-panels of [`MR`] rows
//!   (`[k block][panel][k][MR]`, [`PackedLhs`]), shared by every task;
//! - each call packs its `rhs` k block into micro-panels of [`NR`] columns (`[panel][k][NR]`), kept in L2 while
//!   the `lhs` panels of [`MC`] rows stream by, each `rhs` panel in L1 across them;
//! - the micro-kernel keeps an `MR × NR` tile of the result in 12 registers over a k block and adds it into `dst`.
//!
//! The sums run in a different order from the gemm crate's, so results differ from it in the last bits.

use std::sync::OnceLock;

use super::conv_cpu::at_least;

/// Rows of the micro-kernel's tile: 6 broadcasts × 2 vectors = 12 accumulators, 2 `rhs` vectors and a broadcast
/// in the 16 registers.
const MR: usize = 6;
/// Columns of the micro-kernel's tile: two vectors of 8 f32.
const NR: usize = 16;
/// k per block: an `rhs` micro-panel (`KC × NR`, 16 KiB) stays in L1 while the `lhs` panels stream by.
const KC: usize = 256;
/// Rows of `lhs` per pass over the `rhs` panels: `MC × KC` (72 KiB) stays in L2.
const MC: usize = 12 * MR;

/// Whether products run on this module's kernel (checked once, at run time): the CPU has AVX2 and FMA and no
/// AVX-512, where the gemm crate's own AVX-512 kernels are used.
pub(crate) fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            kernel_supported() && !is_x86_feature_detected!("avx512f")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Whether this CPU can run the micro-kernel at all (AVX2 and FMA).
fn kernel_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A row-major `[m, k]` left operand packed as `[k block][row panel][k][MR]`, zero in the rows beyond `m`.
pub(crate) struct PackedLhs {
    values: Vec<f32>,
    m: usize,
    k: usize,
}

impl PackedLhs {
    /// Packs `lhs` (`[m, k]`, contiguous rows).
    pub(crate) fn new(lhs: &[f32], m: usize, k: usize) -> Self {
        assert!(
            lhs.len() >= m * k,
            "PackedLhs: lhs holds {} values, not {m} × {k}",
            lhs.len()
        );
        // SAFETY: `lhs` holds m rows of k values, k apart (asserted above).
        unsafe { Self::from_strided(lhs.as_ptr(), (k, 1), m, k, Vec::new()) }
    }

    /// Packs `[m, k]` at `lhs`, rows `rs` apart and columns `cs` apart, into `values` (grown as needed: a caller
    /// that packs on every call hands back the last one's buffer, see [`PackedLhs::into_values`]).
    ///
    /// # Safety
    /// `lhs` must cover the matrix with those strides.
    unsafe fn from_strided(
        lhs: *const f32,
        (rs, cs): (usize, usize),
        m: usize,
        k: usize,
        mut values: Vec<f32>,
    ) -> Self {
        let panels = m.div_ceil(MR);
        // Every value up to panels · MR · k is written below, the padding rows included.
        at_least(&mut values, panels * MR * k);
        for kb in 0..k.div_ceil(KC) {
            let (k0, kc) = (kb * KC, (k - kb * KC).min(KC));
            for p in 0..panels {
                let out = &mut values[Self::offset(panels, kb, p, kc)..][..kc * MR];
                let rows = (m - p * MR).min(MR);
                let first = lhs.add(p * MR * rs + k0 * cs);
                // Whole panels of contiguous rows (a convolution's weight) by register transposes; of a
                // column-major lhs (a transposed weight, in the input gradient) each k's MR rows are one run; the
                // rest value by value.
                let done = if cs == 1 && rows == MR {
                    x86::pack_rows(first, rs, kc, out)
                } else if rs == 1 && rows == MR {
                    for q in 0..kc {
                        out[q * MR..(q + 1) * MR].copy_from_slice(std::slice::from_raw_parts(first.add(q * cs), MR));
                    }
                    kc
                } else {
                    0
                };
                for r in 0..rows {
                    let row = first.add(r * rs);
                    for q in done..kc {
                        out[q * MR + r] = *row.add(q * cs);
                    }
                }
                for r in rows..MR {
                    (0..kc).for_each(|q| out[q * MR + r] = 0.0);
                }
            }
        }
        Self { values, m, k }
    }

    /// The buffer, for the next [`PackedLhs::from_strided`].
    fn into_values(self) -> Vec<f32> {
        self.values
    }

    /// Where panel `p` of k block `kb` (of `kc` values of k) starts.
    fn offset(panels: usize, kb: usize, p: usize, kc: usize) -> usize {
        kb * KC * panels * MR + p * kc * MR
    }

    fn panel(&self, kb: usize, p: usize, kc: usize) -> &[f32] {
        &self.values[Self::offset(self.m.div_ceil(MR), kb, p, kc)..][..kc * MR]
    }
}

thread_local! {
    /// The packed `rhs` block of the last call on this thread, kept so that a call does not allocate it.
    static PACKED_RHS: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    /// The packed `lhs` of the last [`gemm`] on this thread: tap-wise and backward convolutions run many products
    /// per layer, and allocating and zeroing a fresh one for each cost about 3% of FCN's time.
    static PACKED_LHS: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// `dst[m, n] += lhs[m, k] · rhs[k, n]` on this thread, `rhs` rows `rhs_rs` apart and `dst` rows `dst_rs` apart
/// (unit column strides); with `relu`, `dst = max(0, dst + lhs · rhs)`, applied as each tile is finished (a separate
/// pass over the output cost 5% of a 1×1 convolution).
///
/// # Safety
/// The CPU must have AVX2 and FMA (as where [`available`]); `rhs` must cover `k` rows of `n` values and `dst` `m`
/// rows of `n` values with those strides, and `dst` must not overlap `rhs`.
pub(crate) unsafe fn gemm_add(
    lhs: &PackedLhs,
    (rhs, rhs_rs): (*const f32, usize),
    (dst, dst_rs): (*mut f32, usize),
    n: usize,
    relu: bool,
) {
    if lhs.k == 0 && relu {
        for r in 0..lhs.m {
            for c in 0..n {
                let d = &mut *dst.add(r * dst_rs + c);
                *d = d.max(0.0);
            }
        }
    }
    add_block(lhs, 0..lhs.m.div_ceil(MR), (rhs, rhs_rs, 1), (dst, dst_rs), n, relu);
}

/// Row panels `panels` of `dst += lhs · rhs` over `n` columns on this thread: `rhs` (`[k, n]`, any strides) and
/// `dst` (the first row of panel `panels.start`, rows `dst_rs` apart, unit column stride) start at the block's
/// first column. With `relu`, as [`gemm_add`].
///
/// # Safety
/// As [`gemm_add`], for the rows of `panels`.
unsafe fn add_block(
    lhs: &PackedLhs,
    panels: std::ops::Range<usize>,
    (rhs, rhs_rs, rhs_cs): (*const f32, usize, usize),
    (dst, dst_rs): (*mut f32, usize),
    n: usize,
    relu: bool,
) {
    let (m, k) = (lhs.m, lhs.k);
    if m == 0 || n == 0 || k == 0 || panels.is_empty() {
        return;
    }
    let col_panels = n.div_ceil(NR);
    let mut packed = PACKED_RHS.take();
    let k_blocks = k.div_ceil(KC);
    for kb in 0..k_blocks {
        let (k0, kc) = (kb * KC, (k - kb * KC).min(KC));
        let relu = relu && kb + 1 == k_blocks;
        // What the buffer holds is left over from earlier calls: pack_rhs writes every value, padding included.
        let b = at_least(&mut packed, col_panels * kc * NR);
        pack_rhs(rhs.add(k0 * rhs_rs), (rhs_rs, rhs_cs), kc, n, b);
        for first in panels.clone().step_by(MC / MR) {
            let block = first..(first + MC / MR).min(panels.end);
            for cp in 0..col_panels {
                let bp = &b[cp * kc * NR..][..kc * NR];
                let width = (n - cp * NR).min(NR);
                for p in block.clone() {
                    let ap = lhs.panel(kb, p, kc);
                    let rows = (m - p * MR).min(MR);
                    let origin = dst.add((p - panels.start) * MR * dst_rs + cp * NR);
                    if rows == MR && width == NR {
                        x86::tile(kc, ap.as_ptr(), bp.as_ptr(), origin, dst_rs, relu);
                    } else {
                        let mut tile = [0f32; MR * NR];
                        x86::tile(kc, ap.as_ptr(), bp.as_ptr(), tile.as_mut_ptr(), NR, false);
                        for r in 0..rows {
                            for c in 0..width {
                                let d = &mut *origin.add(r * dst_rs + c);
                                *d += tile[r * NR + c];
                                if relu {
                                    *d = d.max(0.0);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    PACKED_RHS.set(packed);
}

/// Columns per task of a parallel [`gemm`]: the task's packed `rhs` k block (`KC × NC`, 256 KiB) stays in L2.
const NC: usize = 256;

/// `dst[m, n] (+)= lhs[m, k] · rhs[k, n]` with any (row, column) strides, the gemm crate's contract: `lhs` packed
/// once per call, the work split over rayon's threads with `parallel`.
///
/// # Safety
/// The CPU must have AVX2 and FMA (as where [`available`]); every pointer must cover its matrix with its strides;
/// `dst` must not overlap `lhs` or `rhs`.
pub(crate) unsafe fn gemm(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs, dst_cs): (*mut f32, usize, usize),
    (lhs, lhs_rs, lhs_cs): (*const f32, usize, usize),
    (rhs, rhs_rs, rhs_cs): (*const f32, usize, usize),
    accumulate: bool,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if !accumulate {
        for r in 0..m {
            for c in 0..n {
                *dst.add(r * dst_rs + c * dst_cs) = 0.0;
            }
        }
    }
    if k == 0 {
        return;
    }
    let lhs = PackedLhs::from_strided(lhs, (lhs_rs, lhs_cs), m, k, PACKED_LHS.take());
    let panels = m.div_ceil(MR);
    let (dst_at, rhs_at) = (dst as usize, rhs as usize);
    super::gemm_blocks::for_each_block(panels, n.div_ceil(NC), parallel, |rows, ct| {
        let cols = ct * NC..((ct + 1) * NC).min(n);
        // SAFETY: tasks write disjoint (row panel, column) blocks of dst; the offsets stay inside the matrices.
        unsafe {
            let rhs = ((rhs_at as *const f32).add(cols.start * rhs_cs), rhs_rs, rhs_cs);
            let origin = (dst_at as *mut f32).add(rows.start * MR * dst_rs + cols.start * dst_cs);
            if dst_cs == 1 {
                return add_block(&lhs, rows, rhs, (origin, dst_rs), cols.len(), false);
            }
            // Strided columns (a weight gradient's transposed result): into a local block, then added.
            let valid_rows = (m - rows.start * MR).min(rows.len() * MR);
            let mut local = vec![0f32; valid_rows * cols.len()];
            add_block(&lhs, rows, rhs, (local.as_mut_ptr(), cols.len()), cols.len(), false);
            for r in 0..valid_rows {
                for c in 0..cols.len() {
                    *origin.add(r * dst_rs + c * dst_cs) += local[r * cols.len() + c];
                }
            }
        }
    });
    PACKED_LHS.set(lhs.into_values());
}

/// `kc` rows of `rhs` (`n` values each; rows `rs` apart, columns `cs` apart) as `[panel][kc][NR]`, zero beyond `n`.
///
/// # Safety
/// `rhs` must cover `kc` rows of `n` values with those strides; `out` holds `n.div_ceil(NR) · kc · NR` values.
unsafe fn pack_rhs(rhs: *const f32, (rs, cs): (usize, usize), kc: usize, n: usize, out: &mut [f32]) {
    let full = n / NR;
    let tail = n - full * NR;
    if cs == 1 {
        for r in 0..kc {
            let row = std::slice::from_raw_parts(rhs.add(r * rs), n);
            for cp in 0..full {
                out[(cp * kc + r) * NR..][..NR].copy_from_slice(&row[cp * NR..][..NR]);
            }
            if tail > 0 {
                let dst = &mut out[(full * kc + r) * NR..][..NR];
                dst[..tail].copy_from_slice(&row[full * NR..]);
                dst[tail..].fill(0.0);
            }
        }
        return;
    }
    // Column by column (no caller in the convolutions: `conv_cpu::gemm_strided` sends only row-major ones here).
    for cp in 0..n.div_ceil(NR) {
        let panel = &mut out[cp * kc * NR..][..kc * NR];
        let width = (n - cp * NR).min(NR);
        for c in 0..NR {
            if c >= width {
                (0..kc).for_each(|r| panel[r * NR + c] = 0.0);
                continue;
            }
            let column = rhs.add((cp * NR + c) * cs);
            for r in 0..kc {
                panel[r * NR + c] = *column.add(r * rs);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{MR, NR};
    use crate::model::ops::winograd::x86::transpose_8;

    /// Values `0..kc / 8 · 8` of a packed `[kc][MR]` panel from `MR` rows of contiguous values, `rs` apart: 8 × 8
    /// blocks (two of them zero) transposed in registers, each k's 6 values stored as 4 + 2. Returns how many
    /// values of k it packed.
    ///
    /// # Safety
    /// The CPU must have AVX2; `lhs` must cover `MR` rows of `kc` values, `rs` apart.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn pack_rows(lhs: *const f32, rs: usize, kc: usize, panel: &mut [f32]) -> usize {
        let ks = kc / 8 * 8;
        assert!(panel.len() >= ks * MR);
        for q0 in (0..ks).step_by(8) {
            let mut r = [_mm256_setzero_ps(); 8];
            for (i, r) in r.iter_mut().enumerate().take(MR) {
                *r = _mm256_loadu_ps(lhs.add(i * rs + q0));
            }
            for (q, t) in transpose_8(r).iter().enumerate() {
                let at = panel.as_mut_ptr().add((q0 + q) * MR);
                _mm_storeu_ps(at, _mm256_castps256_ps128(*t));
                _mm_storel_pd(at.add(4) as *mut f64, _mm_castps_pd(_mm256_extractf128_ps::<1>(*t)));
            }
        }
        ks
    }

    /// `c[MR, NR] += a · b` over `kc` values of k (then `max(0, ·)` with `relu`): `a` a packed `[kc][MR]` panel,
    /// `b` a packed `[kc][NR]` panel, `c` rows `ldc` apart.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; the panels must hold `kc` rows and `c` must cover the tile.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, relu: bool) {
        // The tile's rows of `c` are far apart (a convolution's output planes) and come back once per k block:
        // fetched now, they arrive while the k loop runs instead of stalling the adds at its end.
        for r in 0..MR {
            let p = c.add(r * ldc) as *const i8;
            _mm_prefetch::<_MM_HINT_T0>(p);
            _mm_prefetch::<_MM_HINT_T0>(p.add(4 * NR - 4));
        }
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        let (mut a, mut b) = (a, b);
        for _ in 0..kc {
            let b0 = _mm256_loadu_ps(b);
            let b1 = _mm256_loadu_ps(b.add(8));
            for (r, acc) in acc.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*a.add(r));
                acc[0] = _mm256_fmadd_ps(av, b0, acc[0]);
                acc[1] = _mm256_fmadd_ps(av, b1, acc[1]);
            }
            a = a.add(MR);
            b = b.add(NR);
        }
        for (r, acc) in acc.iter().enumerate() {
            let p = c.add(r * ldc);
            let mut lo = _mm256_add_ps(_mm256_loadu_ps(p), acc[0]);
            let mut hi = _mm256_add_ps(_mm256_loadu_ps(p.add(8)), acc[1]);
            if relu {
                // maxps returns its second operand where either is NaN: 0, as `f32::max(x, 0.0)` does.
                lo = _mm256_max_ps(lo, _mm256_setzero_ps());
                hi = _mm256_max_ps(hi, _mm256_setzero_ps());
            }
            _mm256_storeu_ps(p, lo);
            _mm256_storeu_ps(p.add(8), hi);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    /// Never called: [`super::available`] is false off x86_64.
    pub(super) unsafe fn pack_rows(_: *const f32, _: usize, _: usize, _: &mut [f32]) -> usize {
        unreachable!("gemm_f32 runs only on x86_64")
    }

    /// Never called: [`super::available`] is false off x86_64.
    pub(super) unsafe fn tile(_: usize, _: *const f32, _: *const f32, _: *mut f32, _: usize, _: bool) {
        unreachable!("gemm_f32 runs only on x86_64")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeded(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    }

    /// Every edge: rows not a multiple of MR, columns not of NR, k over several blocks with a short last one,
    /// `rhs` and `dst` rows longer than the columns used (a column block of a larger matrix).
    #[test]
    fn adds_the_product_on_every_edge() {
        if !kernel_supported() {
            eprintln!("skipped: this CPU has no AVX2/FMA");
            return;
        }
        for (m, n, k) in [
            (6, 16, 1),
            (1, 1, 1),
            (7, 17, 3),
            (64, 128, 256),
            (13, 40, 600),
            (100, 33, 257),
        ] {
            let (rhs_rs, dst_rs) = (n + 5, n + 3);
            let lhs = seeded(m * k, 1);
            let rhs = seeded(k * rhs_rs, 2);
            let start = seeded(m * dst_rs, 3);
            let relu = m % 2 == 1;
            let mut dst = start.clone();
            let packed = PackedLhs::new(&lhs, m, k);
            // SAFETY: the CPU has AVX2 and FMA; the buffers cover the matrices with these strides.
            unsafe { gemm_add(&packed, (rhs.as_ptr(), rhs_rs), (dst.as_mut_ptr(), dst_rs), n, relu) };
            for r in 0..m {
                for c in 0..dst_rs {
                    let got = dst[r * dst_rs + c];
                    if c >= n {
                        assert_eq!(got, start[r * dst_rs + c], "({m}, {n}, {k}): wrote past column {n}");
                        continue;
                    }
                    let want: f64 = start[r * dst_rs + c] as f64
                        + (0..k)
                            .map(|q| lhs[r * k + q] as f64 * rhs[q * rhs_rs + c] as f64)
                            .sum::<f64>();
                    let want = if relu { want.max(0.0) } else { want };
                    assert!(
                        (got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()) * (k as f64).sqrt(),
                        "({m}, {n}, {k}) at ({r}, {c}): {got} against {want}"
                    );
                }
            }
        }
    }

    /// The general entry: transposed (column-major) operands and result, overwrite and accumulate, split over the
    /// threads by columns and by rows.
    #[test]
    fn general_products_match_the_definition() {
        if !kernel_supported() {
            eprintln!("skipped: this CPU has no AVX2/FMA");
            return;
        }
        let shapes = [(1, 1, 1), (6, 16, 256), (7, 300, 5), (70, 20, 300), (130, 600, 40)];
        for (i, &(m, n, k)) in shapes.iter().enumerate() {
            // Row-major [m, k], [k, n], [m, n]; each stored column-major; only lhs column-major (an input
            // gradient's transposed weight).
            let layouts = [
                ((k, 1), (n, 1), (n, 1)),
                ((1, m), (1, k), (1, m)),
                ((1, m), (n, 1), (n, 1)),
            ];
            for (layout, &(l, r, d)) in layouts.iter().enumerate() {
                for (accumulate, parallel) in [(false, false), (true, true), (false, true)] {
                    let lhs = seeded(m * k, 10 + i as u64);
                    let rhs = seeded(k * n, 20 + i as u64);
                    let start = seeded(m * n, 30 + i as u64);
                    let mut dst = start.clone();
                    // SAFETY: the CPU has AVX2 and FMA; each buffer holds its matrix with these strides.
                    unsafe {
                        gemm(
                            (m, n, k),
                            (dst.as_mut_ptr(), d.0, d.1),
                            (lhs.as_ptr(), l.0, l.1),
                            (rhs.as_ptr(), r.0, r.1),
                            accumulate,
                            parallel,
                        )
                    };
                    for row in 0..m {
                        for col in 0..n {
                            let at = row * d.0 + col * d.1;
                            let sum: f64 = (0..k)
                                .map(|q| lhs[row * l.0 + q * l.1] as f64 * rhs[q * r.0 + col * r.1] as f64)
                                .sum();
                            let want = sum + if accumulate { start[at] as f64 } else { 0.0 };
                            let got = dst[at] as f64;
                            assert!(
                                (got - want).abs() <= 1e-5 * (1.0 + want.abs()) * (k as f64).sqrt(),
                                "({m}, {n}, {k}) layout {layout}, accumulate {accumulate}: ({row}, {col}) \
                                 {got} against {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}

//! Matrix products with bf16 inputs and f32 accumulation, for `precision=bf16` on CPUs with AVX512-BF16 (AMD Zen 4
//! and later, Intel Cooper Lake / Sapphire Rapids and later). One `vdpbf16ps` does 32 multiply-adds where an f32
//! FMA does 16, so the convolutions' products run up to twice as fast as in f32.
//!
//! `dst[m, n] (+)= lhs[m, k] · rhs[k, n]`, any (row, column) strides. The inputs are rounded to bf16 (nearest
//! even) as they are packed; each product of two bf16 numbers is exact in f32 and the sums are f32, so the result is
//! the f32 product of the rounded inputs up to the order of additions, as PyTorch's CPU autocast computes it.
//!
//! Blocked as BLIS does, with k in blocks of [`KC`]:
//! - `lhs` (the weight, in a convolution) is packed once per call into micro-panels of [`MR`] rows: for each pair
//!   of k, the rows' pairs side by side (`[pair][MR]` of `u32`, the lower half the even k);
//! - `rhs` is packed once per call into micro-panels of [`NR`] columns (`[pair][NR]`), by column block and k block;
//! - the micro-kernel keeps an `MR × NR` tile of the result in 28 registers over a k block and adds it into `dst`.
//!
//! On CPUs with AMX (Intel Sapphire Rapids and later: C7i, M7i, R7i instances) the micro-kernel is AMX's
//! `tdpbf16ps` instead: a 32 × 32 tile of the result in four tile registers, `lhs` packed row by row (`[MR][pair]`,
//! as AMX loads it). There `vdpbf16ps` is no faster than f32 FMAs (one port), so without AMX `precision=bf16` ran
//! slower than fp32 on these CPUs.
//!
//! Without AVX512-BF16 the same blocking runs on a portable micro-kernel (for the tests; `precision=bf16` falls
//! back to fp32 on such CPUs, see [`crate::model::precision::resolve`]).

use std::sync::OnceLock;

use rayon::prelude::*;

/// Rows of the AVX512-BF16 micro-kernel's tile (28 accumulators, 2 `rhs` vectors and a broadcast fill the 32
/// registers).
const MR: usize = 14;
/// Rows of the AMX micro-kernel's tile: two tiles of 16 rows.
const MR_AMX: usize = 32;
/// The largest of the kernels' row counts.
const MR_MAX: usize = MR_AMX;
/// Columns of the micro-kernel's tile: two vectors of 16 f32.
const NR: usize = 32;
/// k per block (even): an `rhs` micro-panel (`KC × NR` bf16, 32 KiB) stays in L1/L2 while `lhs` panels stream by
/// (512 ran 5–10% faster than 256 and than 1024 on a Zen 4).
const KC: usize = 512;
/// k per block for AMX: an `lhs` panel and an `rhs` panel (16 KiB each) both stay in L1, so the tile loads hit it
/// (3072³ on one Emerald Rapids core: 316 GFLOP/s against 220 with 512, and 277 with 128).
const KC_AMX: usize = 256;
/// Columns per task: the task's `rhs` block (`KC × NC` bf16, 512 KiB) stays in L2.
const NC: usize = 512;

/// Whether this CPU has the instructions the fast micro-kernel needs (checked once, at run time).
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// `x` rounded to bf16 (nearest, ties to even), as its 16 bits. NaNs stay (quiet) NaNs.
pub(crate) fn bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    let round = 0x7fff + ((bits >> 16) & 1);
    ((bits + round) >> 16) as u16
}

/// The f32 value of bf16 bits.
pub(crate) fn bf16_value(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// Two k-neighbours as one packed pair: `lo` (even k) in the lower half.
fn pair(lo: f32, hi: f32) -> u32 {
    u32::from(bf16_bits(lo)) | (u32::from(bf16_bits(hi)) << 16)
}

/// A matrix operand: base pointer and (row, column) strides in elements.
#[derive(Clone, Copy)]
struct Operand {
    ptr: usize,
    rs: usize,
    cs: usize,
}

impl Operand {
    /// # Safety
    /// `(r, c)` must lie inside the matrix the operand was made from.
    unsafe fn at(&self, r: usize, c: usize) -> f32 {
        *(self.ptr as *const f32).add(r * self.rs + c * self.cs)
    }
}

/// Whether this CPU has AMX with bf16 tiles (beside [`available`]'s instructions) and the kernel lets this process
/// use the tile registers (checked once; `SEMSEG_CPU_AMX=0` turns AMX off, to compare the kernels).
pub fn amx_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        if std::env::var("SEMSEG_CPU_AMX").is_ok_and(|v| v == "0") {
            return false;
        }
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            available() && x86::amx_permitted()
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        {
            false
        }
    })
}

/// The micro-kernel bf16 products run on here, for the log: `amx`, `avx512-bf16` or `portable`.
pub fn kernel_name() -> &'static str {
    match Kernel::best() {
        Kernel::Amx => "amx",
        Kernel::Avx512Bf16 => "avx512-bf16",
        Kernel::Portable => "portable",
    }
}

/// Which micro-kernel runs the tiles.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Kernel {
    /// AMX's `tdpbf16ps` (needs [`amx_available`]).
    Amx,
    /// `vdpbf16ps` (needs [`available`]).
    Avx512Bf16,
    /// Plain Rust with the same arithmetic (tests, and CPUs without AVX512-BF16).
    Portable,
}

impl Kernel {
    pub(crate) fn best() -> Self {
        if amx_available() {
            Self::Amx
        } else if available() {
            Self::Avx512Bf16
        } else {
            Self::Portable
        }
    }

    /// Rows of the result per micro-kernel tile (and per packed `lhs` panel).
    fn mr(self) -> usize {
        match self {
            Kernel::Amx => MR_AMX,
            Kernel::Avx512Bf16 | Kernel::Portable => MR,
        }
    }

    /// Where pair `q` of row `r` lies in a packed `lhs` panel: `[pair][MR]` for the vector kernels, `[MR][pair]`
    /// (each row's pairs contiguous, as AMX loads a tile) for AMX.
    fn lhs_at(self, r: usize, q: usize) -> usize {
        match self {
            Kernel::Amx => r * (KC_AMX / 2) + q,
            Kernel::Avx512Bf16 | Kernel::Portable => q * MR + r,
        }
    }

    /// k per block.
    fn kc(self) -> usize {
        match self {
            Kernel::Amx => KC_AMX,
            Kernel::Avx512Bf16 | Kernel::Portable => KC,
        }
    }

    /// Values of a packed `rhs` panel (`kc / 2` pairs × `NR` columns).
    fn rhs_panel_len(self) -> usize {
        self.kc() / 2 * NR
    }

    /// Distance between a row's consecutive pairs in a packed `lhs` panel.
    fn lhs_pair_stride(self) -> usize {
        self.lhs_at(0, 1) - self.lhs_at(0, 0)
    }

    /// Whether the packing may use AVX512-BF16's conversions.
    fn converts_with_avx512(self) -> bool {
        matches!(self, Kernel::Amx | Kernel::Avx512Bf16)
    }
}

/// `dst[m, n] (+)= lhs[m, k] · rhs[k, n]` with bf16-rounded inputs and f32 sums; operands as
/// `(pointer, row stride, column stride)`. `parallel` splits the work over rayon's threads.
///
/// # Safety
/// Every pointer must cover its matrix with the given strides; `dst` must not overlap `lhs` or `rhs`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_bf16(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs, dst_cs): (*mut f32, usize, usize),
    (lhs, lhs_rs, lhs_cs): (*const f32, usize, usize),
    (rhs, rhs_rs, rhs_cs): (*const f32, usize, usize),
    accumulate: bool,
    parallel: bool,
    kernel: Kernel,
) {
    if m == 0 || n == 0 {
        return;
    }
    let dst = Operand {
        ptr: dst as usize,
        rs: dst_rs,
        cs: dst_cs,
    };
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                for c in 0..n {
                    *(dst.ptr as *mut f32).add(r * dst.rs + c * dst.cs) = 0.0;
                }
            }
        }
        return;
    }
    let lhs = Operand {
        ptr: lhs as usize,
        rs: lhs_rs,
        cs: lhs_cs,
    };
    let rhs = Operand {
        ptr: rhs as usize,
        rs: rhs_rs,
        cs: rhs_cs,
    };
    // This thread's packing buffers, taken for the call (a nested call on this thread, from a task stolen while
    // waiting, finds them empty and grows its own).
    let (mut lhs_buffer, rhs_buffer) = (PACKED_LHS.take(), PACKED_RHS.take());
    let packed_lhs = pack_lhs(m, k, lhs, parallel, kernel, &mut lhs_buffer);
    let packed_rhs = PackedRhs::new(k, n, rhs, parallel, kernel, rhs_buffer);
    let panels = m.div_ceil(kernel.mr());

    let job = Job {
        m,
        k,
        dst,
        packed_lhs,
        packed_rhs: &packed_rhs,
        accumulate,
        kernel,
    };
    super::gemm_blocks::for_each_block(panels, n.div_ceil(NC), parallel, |rows, ct| job.run(rows, ct));
    PACKED_LHS.set(lhs_buffer);
    PACKED_RHS.set(packed_rhs.values);
}

thread_local! {
    /// Packed operands of the last call on this thread, kept so that a call does not allocate (and zero) them:
    /// that cost as much as the AMX products of a convolution's small matrices.
    static PACKED_LHS: std::cell::Cell<Vec<u32>> = const { std::cell::Cell::new(Vec::new()) };
    static PACKED_RHS: std::cell::Cell<Vec<u32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The first `len` values of `buffer`, grown if needed: what they hold is left over, so the packers write every
/// value, padding included.
fn reuse(buffer: &mut Vec<u32>, len: usize) -> &mut [u32] {
    if buffer.len() < len {
        buffer.resize(len, 0);
    }
    &mut buffer[..len]
}

/// `rhs` packed once per call (every task reads it; none re-packs it) as `[column block of NC][k block][panel]
/// [pair][NR]` bf16 pairs, zero beyond `k` and `n`.
struct PackedRhs {
    values: Vec<u32>,
    k_blocks: usize,
    n: usize,
    panel_len: usize,
}

impl PackedRhs {
    /// Packs into `buffer` (reused; grown if needed).
    fn new(k: usize, n: usize, rhs: Operand, parallel: bool, kernel: Kernel, buffer: Vec<u32>) -> Self {
        let kc = kernel.kc();
        let k_blocks = k.div_ceil(kc);
        let panel_len = kernel.rhs_panel_len();
        let mut packed = Self {
            values: buffer,
            k_blocks,
            n,
            panel_len,
        };
        let col_blocks = n.div_ceil(NC);
        let base = reuse(&mut packed.values, k_blocks * n.div_ceil(NR) * panel_len).as_mut_ptr() as usize;
        let fill = |i: usize| {
            let (ct, kb) = (i / k_blocks, i % k_blocks);
            let range = packed.block(ct, kb);
            // SAFETY: the (column block, k block) ranges are disjoint and inside `values`.
            let out = unsafe { std::slice::from_raw_parts_mut((base as *mut u32).add(range.start), range.len()) };
            let k0 = kb * kc;
            if k - k0 < kc {
                out.fill(0); // pairs beyond k (pack_rhs writes the columns beyond n)
            }
            pack_rhs(rhs, k0, (k - k0).min(kc), ct * NC..((ct + 1) * NC).min(n), out, kernel);
        };
        if parallel && col_blocks * k_blocks > 1 {
            (0..col_blocks * k_blocks).into_par_iter().for_each(fill);
        } else {
            (0..col_blocks * k_blocks).for_each(fill);
        }
        packed
    }

    /// Where column block `ct`'s k block `kb` lies in `values` (its panels side by side).
    fn block(&self, ct: usize, kb: usize) -> std::ops::Range<usize> {
        let panels = (self.n - ct * NC).min(NC).div_ceil(NR);
        let start = (ct * (NC / NR) * self.k_blocks + kb * panels) * self.panel_len;
        start..start + panels * self.panel_len
    }
}

/// `c[m, n] = a[m, k] · b[k, n]` (row-major, contiguous) with bf16-rounded inputs and f32 sums, on rayon's threads
/// and the fastest kernel this CPU has. For benchmarks (`examples/bench_peak`).
pub fn matmul_bf16(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    assert!(
        a.len() >= m * k && b.len() >= k * n && c.len() >= m * n,
        "matmul_bf16: operand lengths"
    );
    // SAFETY: the lengths are checked above; c is borrowed mutably, a and b shared, so they do not overlap.
    unsafe {
        gemm_bf16(
            (m, n, k),
            (c.as_mut_ptr(), n, 1),
            (a.as_ptr(), k, 1),
            (b.as_ptr(), n, 1),
            false,
            true,
            Kernel::best(),
        )
    }
}

/// `lhs` as `[k block][panel]` panels of `kc / 2 × mr` bf16 pairs laid out as [`Kernel::lhs_at`] says, zero beyond
/// `m` and `k`.
fn pack_lhs(m: usize, k: usize, lhs: Operand, parallel: bool, kernel: Kernel, buffer: &mut Vec<u32>) -> &[u32] {
    let (mr, kc) = (kernel.mr(), kernel.kc());
    let panels = m.div_ceil(mr);
    let blocks = k.div_ceil(kc);
    let panel_len = kc / 2 * mr;
    let packed = reuse(buffer, blocks * panels * panel_len);
    let fill = |(i, out): (usize, &mut [u32])| {
        let (block, panel) = (i / panels, i % panels);
        let k0 = block * kc;
        let kc = (k - k0).min(kc);
        let rows = (m - panel * mr).min(mr);
        if rows < mr || kc < kernel.kc() {
            out.fill(0); // rows beyond m, pairs beyond k
        }
        if lhs.cs == 1 {
            // Row by row along k (contiguous).
            for r in 0..rows {
                // SAFETY: the row's kc values from k0 are inside lhs; the panel holds pairs · mr values.
                unsafe {
                    let src = (lhs.ptr as *const f32).add((panel * mr + r) * lhs.rs + k0);
                    contiguous_pairs(
                        src,
                        kc,
                        &mut out[kernel.lhs_at(r, 0)..],
                        kernel.lhs_pair_stride(),
                        kernel,
                    );
                }
            }
            return;
        }
        for q in 0..kc.div_ceil(2) {
            let (ka, kb) = (k0 + 2 * q, k0 + 2 * q + 1);
            for r in 0..rows {
                let row = panel * mr + r;
                // SAFETY: row < m and ka, kb < k are inside lhs.
                let (lo, hi) = unsafe { (lhs.at(row, ka), if kb < k { lhs.at(row, kb) } else { 0.0 }) };
                out[kernel.lhs_at(r, q)] = pair(lo, hi);
            }
        }
    };
    if parallel && packed.len() > 1 << 16 {
        packed.par_chunks_mut(panel_len).enumerate().for_each(fill);
    } else {
        packed.chunks_mut(panel_len).enumerate().for_each(fill);
    }
    packed
}

/// `len` contiguous values from `src` as pairs of k-neighbours, pair `q` at `out[q · stride]` (a zero pads an odd
/// end).
///
/// # Safety
/// `src` must hold `len` values; `out` must reach index `(len.div_ceil(2) − 1) · stride`.
unsafe fn contiguous_pairs(src: *const f32, len: usize, out: &mut [u32], stride: usize, kernel: Kernel) {
    let mut q = 0;
    #[cfg(target_arch = "x86_64")]
    if kernel.converts_with_avx512() {
        let mut pairs = [0u32; 16];
        while 2 * q + 32 <= len {
            x86::convert_32(src.add(2 * q), pairs.as_mut_ptr());
            for (j, &p) in pairs.iter().enumerate() {
                out[(q + j) * stride] = p;
            }
            q += 16;
        }
    }
    let _ = kernel;
    while 2 * q < len {
        let hi = if 2 * q + 1 < len { *src.add(2 * q + 1) } else { 0.0 };
        out[q * stride] = pair(*src.add(2 * q), hi);
        q += 1;
    }
}

/// One call's shared state; each task runs a block of row panels × a block of columns.
struct Job<'a> {
    m: usize,
    k: usize,
    dst: Operand,
    packed_lhs: &'a [u32],
    packed_rhs: &'a PackedRhs,
    accumulate: bool,
    kernel: Kernel,
}

impl Job<'_> {
    /// Row panels `panels` × column block `ct` of the result.
    fn run(&self, panels: std::ops::Range<usize>, ct: usize) {
        let mr = self.kernel.mr();
        let cols = ct * NC..((ct + 1) * NC).min(self.packed_rhs.n);
        let row0 = panels.start * mr;
        let rows = (self.m - row0).min(panels.len() * mr);
        if self.dst.cs == 1 {
            let origin = Operand {
                ptr: (self.dst.ptr as *mut f32).wrapping_add(row0 * self.dst.rs + cols.start) as usize,
                ..self.dst
            };
            return self.run_into(panels, ct, origin, (rows, cols.len()), !self.accumulate);
        }
        // Strided columns (a tap of a weight gradient): the whole block into a contiguous buffer of full tiles
        // over every k block, then one strided pass into dst.
        let width = cols.len().div_ceil(NR) * NR;
        let mut buffer = vec![0f32; panels.len() * mr * width];
        let local = Operand {
            ptr: buffer.as_mut_ptr() as usize,
            rs: width,
            cs: 1,
        };
        self.run_into(panels.clone(), ct, local, (panels.len() * mr, width), true);
        for r in 0..rows {
            for c in 0..cols.len() {
                let v = buffer[r * width + c];
                // SAFETY: (row0 + r, cols.start + c) is inside dst.
                let d = unsafe {
                    &mut *(self.dst.ptr as *mut f32).add((row0 + r) * self.dst.rs + (cols.start + c) * self.dst.cs)
                };
                *d = if self.accumulate { *d + v } else { v };
            }
        }
    }

    /// The block into `target` (its origin at the block's first row and column; unit column stride), of which
    /// `(rows, cols)` are valid; `overwrite` replaces what the target holds instead of adding to it.
    fn run_into(
        &self,
        panels: std::ops::Range<usize>,
        ct: usize,
        target: Operand,
        (rows, cols): (usize, usize),
        overwrite: bool,
    ) {
        let mr = self.kernel.mr();
        let all_panels = self.m.div_ceil(mr);
        let col_panels = cols.div_ceil(NR);
        let mut tile = [0f32; MR_MAX * NR];
        #[cfg(target_arch = "x86_64")]
        let _tiles = (self.kernel == Kernel::Amx).then(|| {
            // SAFETY: Kernel::Amx is only chosen where amx_available() (this process may use the tiles).
            unsafe { x86::AmxTiles::configure() }
        });
        let (kc, panel_len) = (self.kernel.kc(), self.packed_rhs.panel_len);
        for block in 0..self.k.div_ceil(kc) {
            let k0 = block * kc;
            let pairs = (self.k - k0).min(kc).div_ceil(2);
            let packed_rhs = &self.packed_rhs.values[self.packed_rhs.block(ct, block)];
            let first = block == 0 && overwrite;
            for (i, panel) in panels.clone().enumerate() {
                let a = &self.packed_lhs[(block * all_panels + panel) * kc / 2 * mr..][..kc / 2 * mr];
                let tile_rows = rows.saturating_sub(i * mr).min(mr);
                for cp in 0..col_panels {
                    let b = &packed_rhs[cp * panel_len..][..panel_len];
                    let width = (cols - cp * NR).min(NR);
                    let origin = (target.ptr as *mut f32).wrapping_add(i * mr * target.rs + cp * NR);
                    if tile_rows == mr && width == NR {
                        // SAFETY: the full tile lies inside the target (rows and columns checked above).
                        unsafe { tile_kernel(self.kernel, pairs, a, b, origin, target.rs, !first) };
                    } else {
                        // Edge tile: through a local tile, then added element by element.
                        // SAFETY: `tile` is MR × NR with row stride NR.
                        unsafe { tile_kernel(self.kernel, pairs, a, b, tile.as_mut_ptr(), NR, false) };
                        for r in 0..tile_rows {
                            for c in 0..width {
                                // SAFETY: (r, c) of this tile is inside the target's valid part.
                                let d = unsafe { &mut *origin.add(r * target.rs + c) };
                                let v = tile[r * NR + c];
                                *d = if first { v } else { *d + v };
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Rows `k0..k0 + kc` and columns `cols` of `rhs` as `[panel][pair][NR]` bf16 pairs, zero beyond them. Row pair by
/// row pair, each read left to right across all panels (the rows are far apart; their columns are contiguous).
fn pack_rhs(rhs: Operand, k0: usize, kc: usize, cols: std::ops::Range<usize>, out: &mut [u32], kernel: Kernel) {
    let pairs = kc.div_ceil(2);
    let panels = cols.len().div_ceil(NR);
    if rhs.rs == 1 && rhs.cs != 1 {
        // Stored transposed (k contiguous, as a weight gradient's operand is): column by column along k.
        for cp in 0..panels {
            let c0 = cols.start + cp * NR;
            let width = (cols.end - c0).min(NR);
            let panel = &mut out[cp * kernel.rhs_panel_len()..][..kernel.rhs_panel_len()];
            for c in 0..NR {
                if c < width {
                    // SAFETY: column c0 + c's kc values from k0 are inside rhs; the panel holds pairs · NR values.
                    unsafe {
                        contiguous_pairs(
                            (rhs.ptr as *const f32).add(k0 + (c0 + c) * rhs.cs),
                            kc,
                            &mut panel[c..],
                            NR,
                            kernel,
                        )
                    };
                } else {
                    (0..pairs).for_each(|q| panel[q * NR + c] = 0);
                }
            }
        }
        return;
    }
    for q in 0..pairs {
        let ka = k0 + 2 * q;
        let has_hi = 2 * q + 1 < kc;
        for cp in 0..panels {
            let c0 = cols.start + cp * NR;
            let width = (cols.end - c0).min(NR);
            let row = &mut out[cp * kernel.rhs_panel_len() + q * NR..][..NR];
            #[cfg(target_arch = "x86_64")]
            if kernel.converts_with_avx512() && width == NR && rhs.cs == 1 && has_hi {
                // SAFETY: the CPU has the instructions (Kernel::Amx or Avx512Bf16); rows ka and ka + 1 hold NR columns
                // from c0.
                unsafe {
                    let lo = (rhs.ptr as *const f32).add(ka * rhs.rs + c0);
                    x86::interleave_rows(lo, lo.add(rhs.rs), row.as_mut_ptr());
                }
                continue;
            }
            let _ = kernel;
            for (c, v) in row.iter_mut().enumerate() {
                *v = if c < width {
                    // SAFETY: ka (and ka + 1 when has_hi) < k and c0 + c < n.
                    unsafe { pair(rhs.at(ka, c0 + c), if has_hi { rhs.at(ka + 1, c0 + c) } else { 0.0 }) }
                } else {
                    0
                };
            }
        }
    }
}

/// `c[mr, NR] (+)= a · b` over `pairs` pairs of k; `c`'s rows `c_rs` apart, columns contiguous; `a` and `b` are
/// whole packed panels (zero beyond `pairs`: AMX reads them in steps of 16 pairs).
///
/// # Safety
/// `c` must cover the tile; `a` and `b` must hold `kc / 2 · mr` and `kc / 2 · NR` values; with [`Kernel::Amx`],
/// the tiles must be configured ([`x86::AmxTiles`]).
unsafe fn tile_kernel(kernel: Kernel, pairs: usize, a: &[u32], b: &[u32], c: *mut f32, c_rs: usize, load: bool) {
    let half = kernel.kc() / 2;
    debug_assert!(a.len() >= half * kernel.mr() && b.len() >= half * NR && pairs <= half);
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Amx => x86::amx_kernel(pairs, a.as_ptr(), b.as_ptr(), c, c_rs, load),
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Bf16 => x86::kernel(pairs, a.as_ptr(), b.as_ptr(), c, c_rs, load),
        #[cfg(not(target_arch = "x86_64"))]
        Kernel::Amx | Kernel::Avx512Bf16 => unreachable!("AMX and AVX512-BF16 are x86-64 only"),
        Kernel::Portable => portable_kernel(pairs, a, b, c, c_rs, load),
    }
}

/// The micro-kernel's arithmetic in plain Rust: each pair's two exact products summed in f32, then accumulated.
unsafe fn portable_kernel(pairs: usize, a: &[u32], b: &[u32], c: *mut f32, c_rs: usize, load: bool) {
    for r in 0..MR {
        let row = c.add(r * c_rs);
        for j in 0..NR {
            let mut acc = if load { *row.add(j) } else { 0.0 };
            for q in 0..pairs {
                let (x, y) = (a[q * MR + r], b[q * NR + j]);
                let lo = bf16_value(x as u16) * bf16_value(y as u16);
                let hi = bf16_value((x >> 16) as u16) * bf16_value((y >> 16) as u16);
                acc += lo + hi;
            }
            *row.add(j) = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;
    use std::arch::x86_64::*;

    use super::{KC_AMX, MR, NR};

    /// Whether the CPU has AMX-TILE and AMX-BF16 and Linux grants this process the tile data state
    /// (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, required once per process before the first tile
    /// instruction; a kernel without AMX support refuses it).
    #[cfg(target_os = "linux")]
    pub(super) fn amx_permitted() -> bool {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // Leaf 7 exists on every x86-64 CPU with AVX-512 (checked by the caller first).
        let leaf7 = __cpuid_count(7, 0);
        let (amx_bf16, amx_tile) = ((leaf7.edx >> 22) & 1 == 1, (leaf7.edx >> 24) & 1 == 1);
        // SAFETY: arch_prctl with these arguments only changes this process's permitted xsave features.
        amx_bf16
            && amx_tile
            && unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) } == 0
    }

    /// The tile registers configured for [`amx_kernel`] (every tile 16 rows × 64 bytes) until dropped, when they are
    /// released (so the thread's context switches stop saving 8 KiB of tile state).
    pub(super) struct AmxTiles;

    impl AmxTiles {
        /// # Safety
        /// The CPU must have AMX and the process must be permitted to use it ([`amx_permitted`]).
        pub(super) unsafe fn configure() -> Self {
            #[repr(C, align(64))]
            struct Config([u8; 64]);
            let mut config = Config([0; 64]);
            config.0[0] = 1; // palette 1
            for t in 0..8 {
                config.0[16 + 2 * t] = 64; // bytes per row
                config.0[48 + t] = 16; // rows
            }
            asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly));
            AmxTiles
        }
    }

    impl Drop for AmxTiles {
        fn drop(&mut self) {
            // SAFETY: the tiles were configured by `configure`.
            unsafe { asm!("tilerelease", options(nostack, nomem)) };
        }
    }

    /// The `32 × NR` tile (`NR` = 32) as four 16 × 16 tiles of f32 in tmm0–3; per 16 pairs of k, two `lhs` tiles
    /// (tmm4–5: rows 0–15 and 16–31, their pairs contiguous, `KC_AMX / 2` apart) and two `rhs` tiles (tmm6–7: columns
    /// 0–15 and 16–31 of the `[pair][NR]` panel), and four `tdpbf16ps`. Pairs beyond `pairs` up to the next 16 are
    /// zero in both panels.
    ///
    /// # Safety
    /// As [`super::tile_kernel`]; the tiles configured by [`AmxTiles::configure`].
    pub(super) unsafe fn amx_kernel(pairs: usize, a: *const u32, b: *const u32, c: *mut f32, c_rs: usize, load: bool) {
        const A_STRIDE: usize = KC_AMX / 2 * 4; // bytes between an lhs panel's rows
        const B_STRIDE: usize = NR * 4; // bytes between an rhs panel's pairs
        let c_stride = c_rs * 4;
        let (c0, c1, c2, c3) = (c, c.add(16), c.add(16 * c_rs), c.add(16 * c_rs + 16));
        if load {
            asm!(
                "tileloadd tmm0, [{c0} + {s}*1]",
                "tileloadd tmm1, [{c1} + {s}*1]",
                "tileloadd tmm2, [{c2} + {s}*1]",
                "tileloadd tmm3, [{c3} + {s}*1]",
                c0 = in(reg) c0, c1 = in(reg) c1, c2 = in(reg) c2, c3 = in(reg) c3, s = in(reg) c_stride,
                options(nostack, readonly),
            );
        } else {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
        }
        for step in 0..pairs.div_ceil(16) {
            let (a0, b0) = (a.add(16 * step), b.add(16 * step * NR));
            asm!(
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tileloadd tmm5, [{a1} + {sa}*1]",
                "tileloadd tmm6, [{b0} + {sb}*1]",
                "tileloadd tmm7, [{b1} + {sb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0, a1 = in(reg) a0.add(16 * (KC_AMX / 2)), sa = in(reg) A_STRIDE,
                b0 = in(reg) b0, b1 = in(reg) b0.add(16), sb = in(reg) B_STRIDE,
                options(nostack, readonly),
            );
        }
        asm!(
            "tilestored [{c0} + {s}*1], tmm0",
            "tilestored [{c1} + {s}*1], tmm1",
            "tilestored [{c2} + {s}*1], tmm2",
            "tilestored [{c3} + {s}*1], tmm3",
            c0 = in(reg) c0, c1 = in(reg) c1, c2 = in(reg) c2, c3 = in(reg) c3, s = in(reg) c_stride,
            options(nostack),
        );
    }

    /// Two rows of 32 f32 (`lo` at even k, `hi` at odd k) as 32 bf16 pairs.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn interleave_rows(lo: *const f32, hi: *const f32, out: *mut u32) {
        // Word i of the converted vector: lo[i] for i < 16, hi[i − 16] above; pairs take (lo[j], hi[j]).
        let order = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17,
            1, 16, 0,
        );
        for half in 0..2 {
            let l = _mm512_loadu_ps(lo.add(16 * half));
            let h = _mm512_loadu_ps(hi.add(16 * half));
            let both: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(h, l));
            _mm512_storeu_si512(out.add(16 * half) as *mut _, _mm512_permutexvar_epi16(order, both));
        }
    }

    /// 32 contiguous f32 as 16 bf16 pairs (the bf16 values in the same order).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn convert_32(src: *const f32, out: *mut u32) {
        let lo = _mm512_loadu_ps(src);
        let hi = _mm512_loadu_ps(src.add(16));
        _mm512_storeu_si512(
            out as *mut _,
            std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo)),
        );
    }

    /// The `MR × NR` tile in 28 zmm accumulators; per pair of k: two `rhs` loads, `MR` broadcasts, 28 `vdpbf16ps`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn kernel(pairs: usize, a: *const u32, b: *const u32, c: *mut f32, c_rs: usize, load: bool) {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        if load {
            for (r, row) in acc.iter_mut().enumerate() {
                row[0] = _mm512_loadu_ps(c.add(r * c_rs));
                row[1] = _mm512_loadu_ps(c.add(r * c_rs + 16));
            }
        }
        for q in 0..pairs {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(q * NR) as *const _));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(q * NR + 16) as *const _));
            let a = a.add(q * MR);
            for (r, row) in acc.iter_mut().enumerate() {
                let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(r) as i32));
                row[0] = _mm512_dpbf16_ps(row[0], x, b0);
                row[1] = _mm512_dpbf16_ps(row[1], x, b1);
            }
        }
        for (r, row) in acc.iter().enumerate() {
            _mm512_storeu_ps(c.add(r * c_rs), row[0]);
            _mm512_storeu_ps(c.add(r * c_rs + 16), row[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::conv_cpu::tests::seeded;
    use super::*;

    fn round(v: &[f32]) -> Vec<f64> {
        v.iter().map(|&x| f64::from(bf16_value(bf16_bits(x)))).collect()
    }

    #[test]
    fn rounds_to_nearest_even_like_the_hardware() {
        assert_eq!(bf16_bits(1.0), 0x3f80);
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties to even (1.0).
        assert_eq!(bf16_bits(1.0 + 2f32.powi(-8)), 0x3f80);
        // 1 + 3·2^-8 lies halfway between 1 + 2^-7 and 1 + 2^-6: ties to even (1 + 2^-6).
        assert_eq!(bf16_value(bf16_bits(1.0 + 3.0 * 2f32.powi(-8))), 1.0 + 2f32.powi(-6));
        assert_eq!(bf16_value(bf16_bits(-2.5)), -2.5);
        assert_eq!(bf16_bits(f32::INFINITY), 0x7f80);
        assert!(bf16_value(bf16_bits(f32::NAN)).is_nan());
        assert_eq!(
            bf16_value(bf16_bits(f32::MAX)),
            f32::INFINITY,
            "rounds up past the largest bf16"
        );
    }

    /// Runs one product on `kernel` and compares it with the f64 product of the bf16-rounded inputs. `transposed`
    /// stores both operands transposed (k contiguous, as a weight gradient's are) and writes every other column of
    /// a wider `dst` (as a tap of a weight gradient is written).
    fn check(kernel: Kernel, (m, n, k): (usize, usize, usize), transposed: bool, accumulate: bool, parallel: bool) {
        let a = seeded(m * k, 1 + m as u64);
        let b = seeded(k * n, 2 + n as u64);
        let transpose = |v: &[f32], rows: usize, cols: usize| {
            let mut t = vec![0f32; v.len()];
            for i in 0..rows {
                for j in 0..cols {
                    t[j * rows + i] = v[i * cols + j];
                }
            }
            t
        };
        let ((a_stored, lhs_rs, lhs_cs), (b_stored, rhs_rs, rhs_cs), dst_cs) = if transposed {
            ((transpose(&a, m, k), 1, m), (transpose(&b, k, n), 1, k), 2)
        } else {
            ((a.clone(), k, 1), (b.clone(), n, 1), 1)
        };
        let start = seeded(m * n * dst_cs, 3);
        let mut got = start.clone();
        // SAFETY: every matrix is allocated with the strides given.
        unsafe {
            gemm_bf16(
                (m, n, k),
                (got.as_mut_ptr(), n * dst_cs, dst_cs),
                (a_stored.as_ptr(), lhs_rs, lhs_cs),
                (b_stored.as_ptr(), rhs_rs, rhs_cs),
                accumulate,
                parallel,
                kernel,
            )
        };
        let (ar, br) = (round(&a), round(&b));
        let mut worst = 0f64;
        for i in 0..m {
            for j in 0..n {
                let at = i * n * dst_cs + j * dst_cs;
                let (mut want, mut scale) = (0f64, 0f64);
                for p in 0..k {
                    want += ar[i * k + p] * br[p * n + j];
                    scale += (ar[i * k + p] * br[p * n + j]).abs();
                }
                if accumulate {
                    want += f64::from(start[at]);
                    scale += f64::from(start[at]).abs();
                }
                worst = worst.max((f64::from(got[at]) - want).abs() / scale.max(1e-30));
            }
        }
        // Columns between dst's strided ones are untouched.
        if dst_cs > 1 {
            assert!(
                (0..m * n).all(|i| got[2 * i + 1] == start[2 * i + 1]),
                "a column outside dst was written"
            );
        }
        // Only the f32 sums' rounding is left: a few ulps of the sum of magnitudes.
        assert!(
            worst < 1e-6,
            "{kernel:?} {m}×{n}×{k} transposed={transposed}: worst {worst:e}"
        );
    }

    const SHAPES: [(usize, usize, usize); 6] = [
        (1, 1, 1),
        (14, 32, 2),
        (15, 33, 3),
        (29, 70, 257),
        (64, 1100, 576),
        (3, 520, 513),
    ];

    #[test]
    fn portable_kernel_matches_the_rounded_product_on_every_edge() {
        for shape in SHAPES {
            for (transposed, accumulate, parallel) in [(false, false, false), (true, true, true), (false, true, true)] {
                check(Kernel::Portable, shape, transposed, accumulate, parallel);
            }
        }
    }

    #[test]
    fn avx512_bf16_kernel_matches_the_rounded_product_on_every_edge() {
        if !available() {
            eprintln!("this CPU has no AVX512-BF16: only the portable kernel is checked");
            return;
        }
        for shape in SHAPES {
            for (transposed, accumulate, parallel) in [(false, false, false), (true, true, true), (false, true, true)] {
                check(Kernel::Avx512Bf16, shape, transposed, accumulate, parallel);
            }
        }
    }

    #[test]
    fn amx_kernel_matches_the_rounded_product_on_every_edge() {
        if !amx_available() {
            eprintln!("this CPU (or kernel) has no AMX: the AMX kernel is not checked");
            return;
        }
        for shape in SHAPES.into_iter().chain([(32, 32, 32), (33, 64, 1040), (100, 70, 30)]) {
            for (transposed, accumulate, parallel) in [(false, false, false), (true, true, true), (false, true, true)] {
                check(Kernel::Amx, shape, transposed, accumulate, parallel);
            }
        }
    }

    #[test]
    fn an_empty_inner_dimension_clears_or_keeps_dst() {
        for (accumulate, want) in [(true, 5.0), (false, 0.0)] {
            let mut d = vec![5f32; 6];
            // SAFETY: d is 2×3; lhs and rhs are never read when k = 0.
            unsafe {
                gemm_bf16(
                    (2, 3, 0),
                    (d.as_mut_ptr(), 3, 1),
                    ([].as_ptr(), 0, 1),
                    ([].as_ptr(), 3, 1),
                    accumulate,
                    false,
                    Kernel::Portable,
                );
            }
            assert_eq!(d, vec![want; 6], "accumulate={accumulate}");
        }
    }
}

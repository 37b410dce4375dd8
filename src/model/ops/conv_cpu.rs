//! The CPU convolution (f32, NCHW, groups = 1), for inference and for the training forward pass.
//!
//! Where Candle's CPU convolution spends its time around the matrix product (a single-threaded im2col into a
//! `[L, C·k²]` buffer, a transposing copy of the product back to NCHW, then separate single-threaded passes for the
//! bias, the residual add and the ReLU), this one:
//! - writes the product straight into the NCHW output, which already holds the bias (and the residual), so the gemm
//!   crate's `dst := dst + W·cols` applies both for free; the ReLU is one parallel pass at the end;
//! - skips im2col for 1×1 stride-1 convolutions (the input already is the column matrix) and builds the others'
//!   columns in parallel, a chunk of input channels at a time, so the buffer stays small (`COLUMN_BUDGET`) while
//!   each product still covers a whole tile of pixels;
//! - skips the taps that read only zero padding (for DeepLabV3's ASPP, dilations 12/24/36 on a 64×64 map, that
//!   removes 23–61% of the multiplications). Stride-1 convolutions do it tap by tap, one large product per tap over
//!   its valid pixels ([`super::tapwise`]). Strided ones group output rows (and columns) into bands that see the
//!   same range of kernel rows (columns); each band × band block multiplies only by its valid taps: blocks whose
//!   taps are all valid run as one product with the weight as stored (`[Cout, Cin·k²]`), the others one product
//!   per valid tap, reading that tap's `[Cout, Cin]` slice of the weight in place (column stride k²).
//!
//! Convolutions with few columns a pixel (the stem, the strided ones) run one tile of output rows per task instead
//! ([`super::row_tiles`]): columns, product and epilogue while the tile is in cache.
//!
//! The kernel of [`super::conv::conv2d_fused`] (inference) and, image by image, of the forward pass (and the
//! "same" convolutions' input gradient) of [`super::conv::conv2d`]'s training op.

use std::ops::Range;

use gemm::{gemm, Parallelism};
use rayon::prelude::*;

/// The column buffer's size, in floats, above which a block is split into tiles of output rows (8 MiB).
pub(crate) const COLUMN_BUDGET: usize = 2 << 20;

/// Skip padded taps only when that saves at least this share of the multiplications: a per-tap product is less
/// efficient than one product over all taps, so a 3×3 conv with padding 1 on a large map runs as one block.
const MIN_SKIPPED_SHARE: f64 = 0.05;

/// Geometry of one convolution: input `[Cin, H, W]` → output `[Cout, oh, ow]` per image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub k: usize,
    pub stride: usize,
    pub padding: usize,
    pub dilation: usize,
    pub oh: usize,
    pub ow: usize,
}

impl ConvGeometry {
    /// `None` when the kernel's span does not fit the padded input or a size is zero.
    pub fn new(
        (cin, h, w): (usize, usize, usize),
        (cout, k): (usize, usize),
        stride: usize,
        padding: usize,
        dilation: usize,
    ) -> Option<Self> {
        if cin == 0 || cout == 0 || k == 0 || stride == 0 || dilation == 0 {
            return None;
        }
        let span = dilation * (k - 1) + 1;
        let oh = (h + 2 * padding).checked_sub(span)? / stride + 1;
        let ow = (w + 2 * padding).checked_sub(span)? / stride + 1;
        Some(Self {
            cin,
            h,
            w,
            cout,
            k,
            stride,
            padding,
            dilation,
            oh,
            ow,
        })
    }

    pub fn input_len(&self) -> usize {
        self.cin * self.h * self.w
    }

    pub fn output_len(&self) -> usize {
        self.cout * self.oh * self.ow
    }

    pub fn weight_len(&self) -> usize {
        self.cout * self.cin * self.k * self.k
    }

    /// Input index along an axis of `size` that output index `o` reads through tap `t`, if inside.
    pub(crate) fn source(&self, o: usize, t: usize, size: usize) -> Option<usize> {
        let i = (o * self.stride + t * self.dilation) as isize - self.padding as isize;
        (i >= 0 && (i as usize) < size).then_some(i as usize)
    }

    /// Consecutive output indices along an axis that see the same range of valid taps (a range, since the source
    /// index grows with the tap), each with that range.
    fn bands(&self, outputs: usize, size: usize) -> Vec<(Range<usize>, Range<usize>)> {
        let mut bands: Vec<(Range<usize>, Range<usize>)> = Vec::new();
        for o in 0..outputs {
            let valid: Vec<usize> = (0..self.k).filter(|&t| self.source(o, t, size).is_some()).collect();
            let taps = match (valid.first(), valid.last()) {
                (Some(&a), Some(&b)) => a..b + 1,
                _ => 0..0,
            };
            match bands.last_mut() {
                Some((outs, t)) if *t == taps => outs.end = o + 1,
                _ => bands.push((o..o + 1, taps)),
            }
        }
        bands
    }
}

/// A rectangle of output pixels and the kernel taps (`rows × cols`) that are valid for every pixel in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Block {
    pub(crate) out_rows: Range<usize>,
    pub(crate) out_cols: Range<usize>,
    pub(crate) tap_rows: Range<usize>,
    pub(crate) tap_cols: Range<usize>,
    /// Taps may fall outside the input here (read as zero): the single-block plan.
    pub(crate) checked: bool,
}

impl Block {
    /// The taps used here, row-major.
    pub(crate) fn taps(&self) -> Vec<(usize, usize)> {
        self.tap_rows
            .clone()
            .flat_map(|ky| self.tap_cols.clone().map(move |kx| (ky, kx)))
            .collect()
    }

    /// Multiply-accumulates per (input, output) channel pair.
    fn macs(&self) -> usize {
        self.out_rows.len() * self.out_cols.len() * self.tap_rows.len() * self.tap_cols.len()
    }
}

/// The blocks a convolution runs as: one checked block, or the band × band blocks when skipping pays.
pub(crate) fn plan(g: &ConvGeometry) -> Vec<Block> {
    let whole = Block {
        out_rows: 0..g.oh,
        out_cols: 0..g.ow,
        tap_rows: 0..g.k,
        tap_cols: 0..g.k,
        checked: g.padding > 0,
    };
    if g.k == 1 || g.padding == 0 {
        return vec![whole];
    }
    let (rows, cols) = (g.bands(g.oh, g.h), g.bands(g.ow, g.w));
    let mut blocks = Vec::with_capacity(rows.len() * cols.len());
    let mut macs = 0usize;
    for (out_rows, tap_rows) in &rows {
        for (out_cols, tap_cols) in &cols {
            macs += out_rows.len() * out_cols.len() * tap_rows.len() * tap_cols.len();
            blocks.push(Block {
                out_rows: out_rows.clone(),
                out_cols: out_cols.clone(),
                tap_rows: tap_rows.clone(),
                tap_cols: tap_cols.clone(),
                checked: false,
            });
        }
    }
    let full = g.oh * g.ow * g.k * g.k;
    if (full - macs) as f64 >= MIN_SKIPPED_SHARE * full as f64 {
        blocks
    } else {
        vec![whole]
    }
}

pub use super::epilogue::Epilogue;
pub use super::winograd::KeptWeights;

/// The first `n` elements of `buf`, grown if needed; what they hold is left over from earlier use.
pub(crate) fn at_least(buf: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if buf.len() < n {
        buf.resize(n, 0.0);
    }
    &mut buf[..n]
}

fn parallelism() -> Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// Reusable buffers, so a network's convolutions do not allocate their columns each time.
#[derive(Default)]
pub struct Scratch {
    columns: Vec<f32>,
    product: Vec<f32>,
    winograd: super::winograd::Buffers,
    tapwise: super::tapwise::Buffers,
    /// For [`super::small_maps`], which runs a whole batch.
    pub(crate) small_maps: super::small_maps::Buffers,
}

/// One image: `x` `[Cin, H, W]`, `weight` `[Cout, Cin, k, k]` → `out` `[Cout, oh, ow]`. `kept`: what may be kept
/// across calls for this weight, if it never changes (Winograd's transformed weights). Every element of `out` is
/// written before it is read, so what it held before does not matter ([`super::output_buffer`]).
pub fn conv2d_image(
    g: &ConvGeometry,
    x: &[f32],
    (weight, kept): (&[f32], Option<&KeptWeights>),
    epilogue: Epilogue,
    out: &mut [f32],
    scratch: &mut Scratch,
) {
    assert_eq!(x.len(), g.input_len(), "conv2d_image: input length");
    assert_eq!(weight.len(), g.weight_len(), "conv2d_image: weight length");
    assert_eq!(out.len(), g.output_len(), "conv2d_image: output length");
    let plane = g.oh * g.ow;
    if let Some(b) = epilogue.bias {
        assert_eq!(b.len(), g.cout, "conv2d_image: bias length");
    }
    if let Some(r) = epilogue.residual {
        assert_eq!(r.len(), out.len(), "conv2d_image: residual length");
    }

    if g.k == 1 && g.stride == 1 && g.padding == 0 && !crate::model::precision::bf16_products() {
        return pointwise(g, x, (weight, kept), epilogue, out);
    }

    let blocks = plan(g);
    let direct_macs: usize = blocks.iter().map(Block::macs).sum();
    let winograd = super::winograd::plan(g, direct_macs);
    // (1×1 stride-1 products, in bf16, read the input as their columns in place.)
    if winograd.is_none() && !(g.k == 1 && g.stride == 1) {
        if let Some(rows) = super::row_tiles::rows_per_task(g, &blocks) {
            return super::row_tiles::conv2d(g, &blocks[0], rows, (x, weight), epilogue, out);
        }
    }

    // out = bias + residual: the products below add onto it.
    out.par_chunks_mut(plane)
        .enumerate()
        .for_each(|(co, o)| epilogue.start(co, plane, 0, o));

    if g.k == 1 && g.stride == 1 && g.padding == 0 {
        // SAFETY: `weight` is [cout, cin], `x` is [cin, plane] (oh = h, ow = w here), `out` is [cout, plane]; the
        // lengths are asserted above.
        unsafe {
            product(
                g.cout,
                plane,
                g.cin,
                out.as_mut_ptr(),
                plane,
                weight.as_ptr(),
                g.cin,
                1,
                x.as_ptr(),
                plane,
                true,
            )
        };
    } else {
        if let Some(plan) = winograd {
            super::winograd::conv2d_add(g, &plan, (x, weight, kept), out, &mut scratch.winograd);
        } else if g.stride == 1 && blocks.len() > 1 {
            // Skipping the padded taps pays: one large product per tap rather than many small ones per block.
            super::tapwise::conv2d_add(g, x, weight, out, &mut scratch.tapwise);
        } else {
            for block in blocks {
                run_block(g, &block, x, weight, out, scratch);
            }
        }
    }

    if epilogue.relu {
        out.par_chunks_mut(plane).for_each(super::epilogue::relu);
    }
}

/// Bytes of one pointwise task's output block: it stays in L2 between the bias fill, the product and the ReLU.
const POINTWISE_BLOCK_BYTES: usize = 1 << 20;

/// A 1×1 stride-1 convolution (`out[Cout, hw] = W[Cout, Cin] · x[Cin, hw]`, the input is the column matrix). On
/// AVX-512 CPUs, mostly on [`super::pointwise_avx512`] (the epilogue in the kernel's registers); otherwise in
/// column blocks, each one task from start to end: its part of `out` written by a single-threaded product, then
/// the bias, residual and ReLU added in one pass while the block is still in cache (on gemm_f32, filled with the
/// bias and residual before the product, the ReLU applied as its tiles finish). Separate passes
/// over the whole output (fill, product, ReLU) cost a quarter of a ResNet bottleneck's small 1×1 convs (64 → 256
/// channels at 128²: 4.3 ms, of which the gemm kernel 2.8).
fn pointwise(
    g: &ConvGeometry,
    x: &[f32],
    (weight, kept): (&[f32], Option<&KeptWeights>),
    epilogue: Epilogue,
    out: &mut [f32],
) {
    let n = g.h * g.w;
    let threads = rayon::current_num_threads();
    if super::pointwise_avx512::suits(g.cin, &epilogue) {
        return pointwise_avx512(g, x, (weight, kept), epilogue, out);
    }
    let for_cache = (g.cout * n * 4).div_ceil(POINTWISE_BLOCK_BYTES);
    let tasks = (4 * threads)
        .max(for_cache)
        .min(n.div_ceil(MIN_COLUMNS_PER_TASK))
        .max(1);
    let per_task = n.div_ceil(tasks).next_multiple_of(16);
    let (out_at, x_at) = (out.as_mut_ptr() as usize, x.as_ptr() as usize);
    // On AVX2 CPUs the weight is packed once here for every task's product (the gemm crate would pack it per task).
    let packed = super::gemm_f32::available().then(|| super::gemm_f32::PackedLhs::new(weight, g.cout, g.cin));
    (0..n.div_ceil(per_task)).into_par_iter().for_each(|t| {
        let cols = t * per_task..((t + 1) * per_task).min(n);
        // SAFETY: tasks touch disjoint column ranges of `out` ([cout, n], asserted by the caller); each row's part
        // is in bounds.
        let row = |co: usize| unsafe {
            std::slice::from_raw_parts_mut((out_at as *mut f32).add(co * n + cols.start), cols.len())
        };
        if let Some(packed) = &packed {
            for co in 0..g.cout {
                epilogue.start(co, n, cols.start, row(co));
            }
            // SAFETY: `x` is [cin, n], this block's columns from cols.start; `out`'s block as above; `packed`
            // exists only where the CPU has AVX2 and FMA. The ReLU is applied as the tiles finish.
            unsafe {
                super::gemm_f32::gemm_add(
                    packed,
                    ((x_at as *const f32).add(cols.start), n),
                    ((out_at as *mut f32).add(cols.start), n),
                    cols.len(),
                    epilogue.relu,
                )
            };
            return;
        }
        // The product first, written rather than added (nothing to read), then the bias, residual and ReLU in
        // one pass: a start pass before it cost as much again as the finish.
        // SAFETY: `weight` is [cout, cin]; `x` is [cin, n], this block's columns from cols.start; `out`'s block
        // as above.
        unsafe {
            gemm_strided(
                (g.cout, cols.len(), g.cin),
                ((out_at as *mut f32).add(cols.start), n, 1),
                (weight.as_ptr(), g.cin, 1),
                ((x_at as *const f32).add(cols.start), n, 1),
                false,
                Parallelism::None,
            )
        };
        if !epilogue.is_identity() {
            for co in 0..g.cout {
                epilogue.finish(co, n, cols.start, row(co));
            }
        }
    });
}

/// [`pointwise`] on [`super::pointwise_avx512`]'s kernel: column blocks, each one task, the weight packed once
/// for all of them (or kept packed across calls, with `kept`).
fn pointwise_avx512(
    g: &ConvGeometry,
    x: &[f32],
    (weight, kept): (&[f32], Option<&KeptWeights>),
    epilogue: Epilogue,
    out: &mut [f32],
) {
    let n = g.h * g.w;
    // At least four tasks a thread, so that a thread slowed by other work does not hold up the convolution.
    let per_task = super::pointwise_avx512::columns_per_task(g.cout)
        .min(n.div_ceil(4 * rayon::current_num_threads()).next_multiple_of(64))
        .max(64);
    let packed_now;
    let packed = match kept.and_then(|k| k.pointwise(weight, g.cout, g.cin)) {
        Some(kept) => kept,
        None => {
            packed_now = super::pointwise_avx512::PackedWeight::new(weight, g.cout, g.cin);
            &packed_now
        }
    };
    let (out_at, x_at) = (out.as_mut_ptr() as usize, x.as_ptr() as usize);
    (0..n.div_ceil(per_task)).into_par_iter().for_each(|t| {
        let cols = t * per_task..((t + 1) * per_task).min(n);
        // SAFETY: the caller checked AVX-512F (`suits`); `x` is [cin, n] and `out` [cout, n] (asserted by
        // `conv2d_image`); tasks write disjoint column ranges.
        unsafe { super::pointwise_avx512::columns(packed, x_at as *const f32, out_at as *mut f32, n, cols, &epilogue) };
    });
}

/// `dst[m, n] (+)= lhs[m, k] · rhs[k, n]`, all row-major with unit column stride except `lhs` (`lhs_cs`).
///
/// # Safety
/// Every pointer must cover its matrix: `dst` rows `dst_rs` apart, `lhs` rows `lhs_rs` apart with columns
/// `lhs_cs` apart, `rhs` rows `rhs_rs` apart.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn product(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    lhs: *const f32,
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: *const f32,
    rhs_rs: usize,
    accumulate: bool,
) {
    product_strided(
        m,
        n,
        k,
        (dst, dst_rs, 1),
        (lhs, lhs_rs, lhs_cs),
        (rhs, rhs_rs, 1),
        accumulate,
    )
}

/// The gemm crate's `dst (+)= lhs · rhs` with (row, column) strides, on `parallelism`; with bf16 products
/// installed ([`crate::model::precision::bf16_products`]), [`super::gemm_bf16`]'s; on CPUs with AVX2 and no
/// AVX-512, for a row-major `rhs`, [`super::gemm_f32`]'s.
///
/// Single-threaded with `Parallelism::None`, for callers that run many independent products in parallel.
///
/// # Safety
/// As [`product_strided`].
pub(crate) unsafe fn gemm_strided(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs, dst_cs): (*mut f32, usize, usize),
    (lhs, lhs_rs, lhs_cs): (*const f32, usize, usize),
    (rhs, rhs_rs, rhs_cs): (*const f32, usize, usize),
    accumulate: bool,
    parallelism: Parallelism,
) {
    if crate::model::precision::bf16_products() {
        return super::gemm_bf16::gemm_bf16(
            (m, n, k),
            (dst, dst_rs, dst_cs),
            (lhs, lhs_rs, lhs_cs),
            (rhs, rhs_rs, rhs_cs),
            accumulate,
            !matches!(parallelism, Parallelism::None),
            super::gemm_bf16::Kernel::best(),
        );
    }
    // Only for a row-major `rhs` (im2col columns, input planes). Winograd's column-major `V` stays on the gemm
    // crate, whose kernel broadcasts `rhs` values in place: packed here (8 × 8 register transposes, `lhs` too) its
    // products ran no faster on Zen 3, single layers and whole networks alike.
    if rhs_cs == 1 && super::gemm_f32::available() {
        return super::gemm_f32::gemm(
            (m, n, k),
            (dst, dst_rs, dst_cs),
            (lhs, lhs_rs, lhs_cs),
            (rhs, rhs_rs, rhs_cs),
            accumulate,
            !matches!(parallelism, Parallelism::None),
        );
    }
    gemm(
        m,
        n,
        k,
        dst,
        dst_cs as isize,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        parallelism,
    )
}

/// Columns of the product per task when it is split over its columns (below this, gemm's own parallelism).
const MIN_COLUMNS_PER_TASK: usize = 256;

/// `dst[m, n] (+)= lhs[m, k] · rhs[k, n]` with any (row, column) strides; a transposed operand is a swapped pair.
///
/// With several threads, a product of many columns is split into column blocks, each a single-threaded gemm on its
/// own thread: gemm's own parallel split runs products with few rows far below the cores' rate (a ResNet
/// bottleneck's `[64, 256] · [256, 128²]`: 22 GFLOP/s against 73 split by columns, on 2 threads), and the split is
/// as fast as gemm's for large square products.
///
/// # Safety
/// Every pointer must cover its matrix with the given (row, column) strides.
pub(crate) unsafe fn product_strided(
    m: usize,
    n: usize,
    k: usize,
    (dst, dst_rs, dst_cs): (*mut f32, usize, usize),
    (lhs, lhs_rs, lhs_cs): (*const f32, usize, usize),
    (rhs, rhs_rs, rhs_cs): (*const f32, usize, usize),
    accumulate: bool,
) {
    // Pointers are not Send: the closures carry addresses. Column blocks write disjoint columns of dst.
    let lhs = lhs as usize;
    let gemm_on = |n: usize, dst: *mut f32, rhs: *const f32, parallelism| {
        gemm_strided(
            (m, n, k),
            (dst, dst_rs, dst_cs),
            (lhs as *const f32, lhs_rs, lhs_cs),
            (rhs, rhs_rs, rhs_cs),
            accumulate,
            parallelism,
        )
    };
    let threads = rayon::current_num_threads();
    // The bf16 products and gemm_f32's split their work themselves and pack `lhs` once for all of it (split here,
    // each column block packed it again: a 1×1 conv's input gradient, `Wᵀ · dY`, ran at 44 GFLOP/s, 66 packed
    // once, on Zen 1).
    let splits_itself = crate::model::precision::bf16_products() || (rhs_cs == 1 && super::gemm_f32::available());
    if threads < 2 || n < 2 * MIN_COLUMNS_PER_TASK || splits_itself {
        return gemm_on(n, dst, rhs, parallelism());
    }
    // Four blocks per thread, so a thread slowed by other work does not hold up the product.
    let tasks = (4 * threads).min(n / MIN_COLUMNS_PER_TASK);
    let per_task = n.div_ceil(tasks).next_multiple_of(16);
    let (dst, rhs) = (dst as usize, rhs as usize);
    (0..n.div_ceil(per_task)).into_par_iter().for_each(|t| {
        let n0 = t * per_task;
        let cols = per_task.min(n - n0);
        let dst = (dst as *mut f32).add(n0 * dst_cs);
        let rhs = (rhs as *const f32).add(n0 * rhs_cs);
        gemm_on(cols, dst, rhs, Parallelism::None);
    });
}

/// Input channels per chunk so that a chunk's columns over `pixels` stay near [`COLUMN_BUDGET`].
pub(crate) fn channels_per_chunk(g: &ConvGeometry, pixels: usize) -> usize {
    (COLUMN_BUDGET / (pixels * g.k * g.k).max(1)).clamp(1, g.cin)
}

/// Largest number of output pixels one product covers; bigger blocks are split into tiles of whole output rows.
const MAX_TILE_PIXELS: usize = 16 << 10;

/// Runs one block: tiles of output rows, each accumulated over chunks of input channels, so the column buffer stays
/// within [`COLUMN_BUDGET`] while every product still spans many pixels (each chunk of the weight is packed once per
/// tile, not once per handful of pixels).
fn run_block(g: &ConvGeometry, block: &Block, x: &[f32], weight: &[f32], out: &mut [f32], scratch: &mut Scratch) {
    let (k, plane) = (g.k, g.oh * g.ow);
    let all_taps = block.tap_rows.len() == k && block.tap_cols.len() == k;
    let taps: Vec<(usize, usize)> = block
        .tap_rows
        .clone()
        .flat_map(|ky| block.tap_cols.clone().map(move |kx| (ky, kx)))
        .collect();
    let width = block.out_cols.len();
    if taps.is_empty() || width == 0 || block.out_rows.is_empty() {
        return; // every tap reads padding: the output is the epilogue alone
    }
    let full_width = width == g.ow;
    let tile_rows = (MAX_TILE_PIXELS / width).clamp(1, block.out_rows.len());
    // A chunk is `channels` input channels of every tap (all-taps blocks, rows in the weight's (c, ky, kx) order) or
    // of one tap (other blocks).
    let taps_per_chunk = if all_taps { taps.len() } else { 1 };
    let mut r0 = block.out_rows.start;
    while r0 < block.out_rows.end {
        let r1 = (r0 + tile_rows).min(block.out_rows.end);
        let npix = (r1 - r0) * width;
        let channels = (COLUMN_BUDGET / (npix * taps_per_chunk)).clamp(1, g.cin);
        // The product goes straight into `out` when the tile is whole output rows; otherwise into a buffer that is
        // then added on.
        let (dst, dst_rs, onto_out) = if full_width {
            (out[r0 * g.ow..].as_mut_ptr(), plane, true)
        } else {
            // No zeroing: the first product overwrites it.
            (at_least(&mut scratch.product, g.cout * npix).as_mut_ptr(), npix, false)
        };
        let groups: Vec<usize> = if all_taps {
            vec![usize::MAX]
        } else {
            (0..taps.len()).collect()
        };
        let mut first = true;
        for &t in &groups {
            for c0 in (0..g.cin).step_by(channels) {
                let c1 = (c0 + channels).min(g.cin);
                let chunk_taps = if all_taps { &taps[..] } else { &taps[t..t + 1] };
                fill_columns(g, block, chunk_taps, c0..c1, r0..r1, &[x], &mut scratch.columns);
                let rows_k = (c1 - c0) * chunk_taps.len();
                let cols = &scratch.columns[..rows_k * npix];
                // Weight columns of this chunk: all taps of channels c0..c1 are contiguous; one tap's are k² apart.
                let (lhs, lhs_cs) = if all_taps {
                    (&weight[c0 * k * k..], 1)
                } else {
                    let (ky, kx) = taps[t];
                    (&weight[c0 * k * k + ky * k + kx..], k * k)
                };
                // SAFETY: `dst` covers [cout, npix] with rows `dst_rs` apart (a tile of whole rows of `out`, or the
                // product buffer); `lhs` covers [cout, rows_k] with rows cin·k² apart and columns `lhs_cs` apart
                // inside the weight; `cols` is [rows_k, npix].
                unsafe {
                    product(
                        g.cout,
                        npix,
                        rows_k,
                        dst,
                        dst_rs,
                        lhs.as_ptr(),
                        g.cin * k * k,
                        lhs_cs,
                        cols.as_ptr(),
                        npix,
                        onto_out || !first,
                    )
                };
                first = false;
            }
        }
        if !full_width {
            let product = &scratch.product;
            let c0 = block.out_cols.start;
            out.par_chunks_mut(plane).enumerate().for_each(|(co, o)| {
                let p = &product[co * npix..(co + 1) * npix];
                for (r, oy) in (r0..r1).enumerate() {
                    let dst = &mut o[oy * g.ow + c0..oy * g.ow + c0 + width];
                    dst.iter_mut()
                        .zip(&p[r * width..(r + 1) * width])
                        .for_each(|(d, s)| *d += s);
                }
            });
        }
        r0 = r1;
    }
}

/// The column matrix of channels `channels` and output rows `rows` of `block` for each of `images`:
/// `[C·taps, images·npix]` (each image's pixels one after the other), rows in `(c, tap)` order (the weight's own
/// order when `taps` is every tap).
pub(crate) fn fill_columns(
    g: &ConvGeometry,
    block: &Block,
    taps: &[(usize, usize)],
    channels: Range<usize>,
    rows: Range<usize>,
    images: &[&[f32]],
    columns: &mut Vec<f32>,
) {
    let npix = rows.len() * block.out_cols.len();
    let rows_k = channels.len() * taps.len();
    // Every element is written below (zeros included), so the buffer is not cleared first.
    at_least(columns, rows_k * npix * images.len())
        .par_chunks_mut(npix * images.len())
        .enumerate()
        .for_each(|(row, col)| {
            fill_column_row(
                g,
                block,
                taps,
                channels.start + row / taps.len(),
                row % taps.len(),
                rows.clone(),
                images,
                col,
            )
        });
}

/// One row of [`fill_columns`]' matrix: input channel `c`, tap `taps[tap]`, over output rows `rows` of `block`,
/// for each of `images` (`col` holds `images.len()` runs of `rows.len() × block.out_cols.len()` pixels).
#[allow(clippy::too_many_arguments)]
pub(crate) fn fill_column_row(
    g: &ConvGeometry,
    block: &Block,
    taps: &[(usize, usize)],
    c: usize,
    tap: usize,
    rows: Range<usize>,
    images: &[&[f32]],
    col: &mut [f32],
) {
    let width = block.out_cols.len();
    let npix = rows.len() * width;
    let (ky, kx) = taps[tap];
    for (x, col) in images.iter().zip(col.chunks_mut(npix)) {
        let channel = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for (r, oy) in rows.clone().enumerate() {
            let seg = &mut col[r * width..(r + 1) * width];
            let Some(iy) = g.source(oy, ky, g.h) else {
                seg.fill(0.0); // a padding row (checked blocks only)
                continue;
            };
            let line = &channel[iy * g.w..(iy + 1) * g.w];
            let first = block.out_cols.start * g.stride + kx * g.dilation;
            if !block.checked && g.stride == 1 {
                let start = first - g.padding;
                seg.copy_from_slice(&line[start..start + width]);
            } else if !block.checked {
                copy_strided(seg, &line[first - g.padding..], g.stride);
            } else {
                // Zeros where the tap reads padding, at either end; the strided copy between.
                let valid = |i: &usize| g.source(block.out_cols.start + i, kx, g.w).is_some();
                let lo = (0..width).find(valid).unwrap_or(width);
                let hi = (lo..width).rfind(valid).map_or(lo, |i| i + 1);
                seg[..lo].fill(0.0);
                seg[hi..].fill(0.0);
                if lo < hi {
                    let ix = g.source(block.out_cols.start + lo, kx, g.w).expect("a valid column");
                    copy_strided(&mut seg[lo..hi], &line[ix..], g.stride);
                }
            }
        }
    }
}

/// `seg[i] = line[i·stride]`. Stride 1 is a copy. Stride 2 (ResNet's stem and downsampling convolutions) is compiled
/// for AVX-512 or AVX2 where the CPU has them, where the compiler turns the constant stride into vector shuffles:
/// done value by value in the baseline's SSE2, with a bounds check per value at the borders, im2col was a third of
/// the stem's time on Zen 4.
fn copy_strided(seg: &mut [f32], line: &[f32], stride: usize) {
    #[inline(always)]
    fn by_two(seg: &mut [f32], line: &[f32]) {
        // Whole pairs wherever the line has them, so the vector loop covers the row: bounded by the last value
        // read (`2n − 1` values), its last vector was out of reach and rows up to 64 outputs wide ran scalar.
        let n = seg.len();
        let pairs = n.min(line.len() / 2);
        for (v, pair) in seg[..pairs].iter_mut().zip(line[..2 * pairs].chunks_exact(2)) {
            *v = pair[0];
        }
        if pairs < n {
            // The line ends at the last value read.
            assert_eq!(pairs, n - 1, "copy_strided: the line is too short");
            seg[n - 1] = line[2 * (n - 1)];
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        unsafe fn by_two_avx512(seg: &mut [f32], line: &[f32]) {
            by_two(seg, line)
        }
        #[target_feature(enable = "avx2")]
        unsafe fn by_two_avx2(seg: &mut [f32], line: &[f32]) {
            by_two(seg, line)
        }
        if stride == 2 && !seg.is_empty() {
            if is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F.
                return unsafe { by_two_avx512(seg, line) };
            }
            if is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2.
                return unsafe { by_two_avx2(seg, line) };
            }
        }
    }
    if stride == 1 {
        return seg.copy_from_slice(&line[..seg.len()]);
    }
    seg.iter_mut().enumerate().for_each(|(i, v)| *v = line[i * stride]);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Direct definition of the convolution, in f64.
    fn reference(g: &ConvGeometry, x: &[f32], w: &[f32], e: &Epilogue) -> Vec<f32> {
        let mut out = vec![0f32; g.output_len()];
        for co in 0..g.cout {
            for oy in 0..g.oh {
                for ox in 0..g.ow {
                    let mut s = e.bias.map_or(0.0, |b| b[co] as f64);
                    for c in 0..g.cin {
                        for ky in 0..g.k {
                            for kx in 0..g.k {
                                if let (Some(iy), Some(ix)) = (g.source(oy, ky, g.h), g.source(ox, kx, g.w)) {
                                    s += x[(c * g.h + iy) * g.w + ix] as f64
                                        * w[((co * g.cin + c) * g.k + ky) * g.k + kx] as f64;
                                }
                            }
                        }
                    }
                    let i = (co * g.oh + oy) * g.ow + ox;
                    s += e.residual.map_or(0.0, |r| r[i] as f64);
                    out[i] = if e.relu { s.max(0.0) as f32 } else { s as f32 };
                }
            }
        }
        out
    }

    /// `n` seeded values in [-1, 1) (also the gemm_bf16 tests' inputs).
    pub(crate) fn seeded(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn matches_the_definition_for_every_plan() {
        // (cin, h, w, cout, k, stride, padding, dilation)
        let cases = [
            (5, 7, 6, 4, 1, 1, 0, 1),     // 1×1: no columns
            (6, 37, 29, 70, 1, 1, 0, 1),  // 1×1 over several column blocks, the last one shorter
            (5, 7, 6, 4, 1, 2, 0, 1),     // strided 1×1 (a downsample)
            (3, 9, 8, 4, 7, 2, 3, 1),     // the stem's 7×7/2
            (4, 8, 8, 6, 3, 1, 1, 1),     // 3×3 "same"
            (4, 9, 7, 6, 3, 2, 1, 1),     // 3×3/2
            (4, 12, 11, 5, 3, 1, 4, 4),   // dilated: padded taps skipped
            (3, 10, 10, 4, 3, 1, 12, 12), // dilation above the map: only the centre tap is valid
            (3, 16, 13, 4, 3, 1, 6, 6),   // ASPP-like: one product per tap over its valid pixels
            (3, 11, 9, 4, 5, 1, 5, 3),    // 5×5 dilated, no centre tap whose rows are whole
            (2, 180, 100, 3, 3, 1, 1, 1), // more pixels than one tile: split into tiles of rows
            (3, 100, 96, 8, 7, 2, 3, 1),  // a stem on row tiles, three tasks
            (40, 50, 46, 6, 3, 2, 1, 1),  // 3×3/2 on row tiles, two tasks, the last one shorter
            (300, 9, 80, 4, 3, 2, 1, 1),  // too many columns a pixel for a row tile: the im2col block
        ];
        // One scratch for all: buffers left over from a larger convolution must not leak into a smaller one.
        let mut scratch = Scratch::default();
        for (i, &(cin, h, w, cout, k, s, p, d)) in cases.iter().enumerate() {
            let g = ConvGeometry::new((cin, h, w), (cout, k), s, p, d).unwrap();
            let x = seeded(g.input_len(), i as u64);
            let wt = seeded(g.weight_len(), 100 + i as u64);
            let bias = seeded(cout, 200 + i as u64);
            let residual = seeded(g.output_len(), 300 + i as u64);
            for e in [
                Epilogue::default(),
                Epilogue {
                    bias: Some(&bias),
                    residual: None,
                    relu: true,
                },
                Epilogue {
                    bias: Some(&bias),
                    residual: Some(&residual),
                    relu: true,
                },
            ] {
                let want = reference(&g, &x, &wt, &e);
                let mut got = vec![f32::NAN; g.output_len()];
                conv2d_image(&g, &x, (&wt, None), e, &mut got, &mut scratch);
                // (f32::max below would skip a NaN left unwritten.)
                assert!(
                    got.iter().all(|v| v.is_finite()),
                    "case {i} {g:?}: an element was not written"
                );
                let err = want.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(err < 1e-4, "case {i} {g:?}: max error {err}");
            }
        }
    }

    /// ‖got − want‖ / ‖want‖.
    fn relative_l2(want: &[f32], got: &[f32]) -> f64 {
        let (mut num, mut den) = (0f64, 0f64);
        for (a, b) in want.iter().zip(got) {
            num += (*a as f64 - *b as f64).powi(2);
            den += (*a as f64).powi(2);
        }
        (num / den).sqrt()
    }

    #[test]
    fn products_split_by_columns_keep_every_stride() {
        // Enough columns to be split into blocks on several threads, with transposed and padded layouts: dst
        // column-major with padded columns (as a weight gradient's tap, columns k² apart), rhs read transposed.
        let (m, n, k) = (5, 1100, 7);
        let (dst_cs, rhs_cs) = (m + 3, k + 2);
        let lhs = seeded(m * k, 1);
        let rhs = seeded(n * rhs_cs, 2);
        let start = seeded(n * dst_cs, 3);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        for accumulate in [false, true] {
            let mut dst = start.clone();
            // SAFETY: dst is [m, n] with strides (1, dst_cs) inside n·dst_cs floats; lhs is [m, k] row-major; rhs
            // is [k, n] with strides (1, rhs_cs) inside n·rhs_cs floats.
            pool.install(|| unsafe {
                product_strided(
                    m,
                    n,
                    k,
                    (dst.as_mut_ptr(), 1, dst_cs),
                    (lhs.as_ptr(), k, 1),
                    (rhs.as_ptr(), 1, rhs_cs),
                    accumulate,
                )
            });
            for i in 0..m {
                for j in 0..n {
                    let mut want: f64 = if accumulate { start[j * dst_cs + i] as f64 } else { 0.0 };
                    for l in 0..k {
                        want += lhs[i * k + l] as f64 * rhs[j * rhs_cs + l] as f64;
                    }
                    let got = dst[j * dst_cs + i] as f64;
                    assert!(
                        (got - want).abs() < 1e-5,
                        "({i}, {j}) accumulate {accumulate}: {got} vs {want}"
                    );
                }
            }
            // The padding between columns is untouched.
            for j in 0..n {
                assert_eq!(
                    &dst[j * dst_cs + m..(j + 1) * dst_cs],
                    &start[j * dst_cs + m..(j + 1) * dst_cs]
                );
            }
        }
    }

    #[test]
    fn chunked_and_winograd_paths_match_the_definition() {
        use super::super::winograd::{plan, Kind};
        // (cin, h, w, cout, dilation, the algorithm pairs it takes): enough channels that the columns are built a
        // chunk at a time, and 3×3 "same" convolutions that take Winograd, plain and on polyphase sub-grids, with
        // sizes that leave partial tiles: F(6×6, 3×3) on large sub-images and on ASPP-like 5–6 pixel ones,
        // F(4×4, 3×3) where 6×6 tiles would multiply more (8 pixels) or as much (13–15), mixed with F(6×6, 3×3)
        // (12), the 3- 2- and 1-pixel sub-images of large dilations. One scratch for all, largest first, so
        // leftovers would show.
        use Kind::*;
        let mut scratch = Scratch::default();
        for (cin, h, w, cout, d, classes) in [
            (256, 40, 40, 64, 5, vec![(F4, F4)]),
            (64, 37, 45, 64, 1, vec![(F6, F6)]),
            (48, 46, 42, 64, 2, vec![(F6, F6)]),
            (32, 57, 49, 64, 4, vec![(F4, F4), (F4, F6)]),
            (64, 62, 60, 256, 12, vec![(F6, F6)]),
            (32, 62, 60, 256, 24, vec![(F3, F3), (F3, T2), (T2, F3), (T2, T2)]),
            (32, 60, 62, 256, 36, vec![(T2, T2), (T2, T1), (T1, T2), (T1, T1)]),
        ] {
            let g = ConvGeometry::new((cin, h, w), (cout, 3), 1, d, d).unwrap();
            let direct_macs = super::plan(&g).iter().map(Block::macs).sum();
            let taken = plan(&g, direct_macs).map(|p| p.classes.iter().map(|c| (c.rows, c.cols)).collect::<Vec<_>>());
            assert_eq!(taken, Some(classes), "{g:?}");
            let x = seeded(g.input_len(), 1);
            let wt = seeded(g.weight_len(), 2);
            let bias = seeded(cout, 3);
            let residual = seeded(g.output_len(), 4);
            let e = Epilogue {
                bias: Some(&bias),
                residual: Some(&residual),
                relu: false,
            };
            let want = reference(&g, &x, &wt, &e);
            let mut got = vec![f32::NAN; g.output_len()];
            conv2d_image(&g, &x, (&wt, None), e, &mut got, &mut scratch);
            let err = relative_l2(&want, &got);
            // F(4×4, 3×3) in f32 loses about a digit to the direct sum (measured: 3.6e-6 at 9216 terms).
            assert!(err < 1e-5, "{g:?}: relative error {err}");
        }
    }

    /// The tile classes (rows, cols) of `g`'s Winograd plan; `None` where the conv stays direct.
    fn winograd_classes(g: &ConvGeometry) -> Option<Vec<(super::super::winograd::Kind, super::super::winograd::Kind)>> {
        let direct = super::plan(g).iter().map(Block::macs).sum::<usize>();
        super::super::winograd::plan(g, direct).map(|p| p.classes.iter().map(|c| (c.rows, c.cols)).collect())
    }

    #[test]
    fn winograd_takes_the_3x3_convolutions_of_deeplabv3() {
        use super::super::winograd::Kind::*;
        // DeepLabV3-ResNet-50 at 512²: the 3×3 convs on whole 64×64 maps take 6×6 tiles; at dilation 2 and 4
        // (sub-images of 32 and 16 pixels, where 6×6 tiles multiply as much) 4×4 tiles; ASPP's dilation 12
        // (sub-images of 5–6 pixels) one 6×6 tile, its 24 (2–3 pixels) 3×3 tiles and the 2-pixel algorithm, its 36
        // (1–2 pixels) the 2- and 1-pixel ones.
        for (cin, cout, d, classes) in [
            (256, 256, 1, vec![(F6, F6)]),
            (256, 256, 2, vec![(F4, F4)]),
            (512, 512, 4, vec![(F4, F4)]),
            (2048, 256, 12, vec![(F6, F6)]),
            (2048, 256, 24, vec![(F3, F3), (F3, T2), (T2, F3), (T2, T2)]),
            (2048, 256, 36, vec![(T2, T2), (T2, T1), (T1, T2), (T1, T1)]),
        ] {
            let g = ConvGeometry::new((cin, 64, 64), (cout, 3), 1, d, d).unwrap();
            assert_eq!(winograd_classes(&g), Some(classes), "dilation {d}");
        }
        // Strided and non-3×3 convolutions stay direct.
        let g = ConvGeometry::new((128, 64, 64), (128, 3), 2, 1, 1).unwrap();
        assert!(winograd_classes(&g).is_none());
        let g = ConvGeometry::new((128, 64, 64), (128, 5), 1, 2, 1).unwrap();
        assert!(winograd_classes(&g).is_none());
    }

    #[test]
    fn heads_whose_transformed_weights_outgrow_the_cache_take_4x4_tiles() {
        use super::super::winograd::Kind::*;
        // On a 64×64 map F(6×6, 3×3) multiplies least, but FCN's head (2048 → 512: 268 MB of U) and PSPNet's (4096
        // → 512: 537 MB) would stream their U from memory on every call; F(4×4, 3×3)'s is 36/64 of it. A 1024 →
        // 256 conv (67 MB) and ASPP's dilation 12 (134 MB, where 4×4 tiles would multiply 2.25 times as much) keep
        // 6×6 tiles.
        for (cin, cout, d, classes) in [
            (2048, 512, 1, vec![(F4, F4)]),
            (4096, 512, 1, vec![(F4, F4)]),
            (1024, 256, 1, vec![(F6, F6)]),
            (2048, 256, 12, vec![(F6, F6)]),
        ] {
            let g = ConvGeometry::new((cin, 64, 64), (cout, 3), 1, d, d).unwrap();
            assert_eq!(winograd_classes(&g), Some(classes), "{cin} → {cout} at dilation {d}");
        }
    }

    #[test]
    fn aspp_plans_skip_the_padding() {
        // DeepLabV3's ASPP at 512² (a 64×64 map): the share of multiplications the plan keeps.
        for (d, keep_at_most) in [(12, 0.77), (24, 0.57), (36, 0.40)] {
            let g = ConvGeometry::new((8, 64, 64), (8, 3), 1, d, d).unwrap();
            let blocks = plan(&g);
            let macs: usize = blocks
                .iter()
                .map(|b| b.out_rows.len() * b.out_cols.len() * b.tap_rows.len() * b.tap_cols.len())
                .sum();
            let kept = macs as f64 / (64 * 64 * 9) as f64;
            assert!(kept <= keep_at_most, "dilation {d}: keeps {kept}");
            assert!(blocks.iter().all(|b| !b.checked));
        }
        // A 3×3 "same" conv on a large map keeps one checked block (skipping would save under 5%).
        let g = ConvGeometry::new((8, 64, 64), (8, 3), 1, 1, 1).unwrap();
        assert_eq!(plan(&g).len(), 1);
    }
}

//! Convolutions on small feature maps, for the whole batch at once: forward, weight gradient and input gradient.
//!
//! The per-image paths of [`super::conv_cpu`] and [`super::conv_cpu_backward`] make products as wide as one image's
//! feature map. On the deep layers of a small crop (a 48×48 crop at output stride 8 leaves 6×6 maps; small
//! SageMaker jobs and the CI trainings run such crops) that is a few dozen pixels: each of the tap-wise path's per-tap
//! products re-packs a `[Cout, Cin]` slice of the weight to multiply it by 4–36 pixels, and a 1×1 convolution's
//! product is one single-threaded task. A ResNet-18 step at 48², batch 4, ran its convolutions at 3–22 GFLOP/s
//! where the matrix product reaches 180.
//!
//! Here every image's pixels go side by side into one product per convolution, `[Cout, Cin·T] · [Cin·T, B·P]` (P
//! pixels per image), over the `T` kernel taps that read inside the input for at least one output pixel. The
//! other taps only ever multiply padding and are left out (on a 6×6 map, a dilation of 12 leaves the centre tap
//! alone); within the live taps the reads that land in padding are zeros in the columns. Multiplying those zeros
//! costs less than narrow products.

use std::ops::Range;

use rayon::prelude::*;

use super::conv_cpu::{at_least, fill_columns, product_strided, Block, ConvGeometry, Epilogue, COLUMN_BUDGET};

/// Output pixels per image at or below which a convolution runs here (16×16: the last layers of crops up to 128²
/// at output stride 8).
pub(crate) const MAX_PIXELS: usize = 256;

/// The same for strided convolutions (32×32: the stem of crops up to 64²), whose per-image plan splits a small map
/// into band × band blocks, one narrow product per tap in each border block: a 48² crop's stem ran at 2 GFLOP/s.
/// Larger maps stay per image: at 30×30 (crop 240), DeepLabV3's dense batch-wide products ran 1.3–2× slower
/// than its per-image Winograd and tap-wise ones.
pub(crate) const MAX_STRIDED_PIXELS: usize = 1024;

/// Whether `g` runs here: its output maps are small.
pub(crate) fn applies(g: &ConvGeometry) -> bool {
    let pixels = g.oh * g.ow;
    pixels <= MAX_PIXELS || (g.stride > 1 && pixels <= MAX_STRIDED_PIXELS)
}

/// Buffers reused across calls.
#[derive(Default)]
pub struct Buffers {
    /// The columns of a group of images, `[Cin·T, B·P]` (a chunk of the input channels when they pass the budget).
    columns: Vec<f32>,
    /// The product over a group of images, `[Cout, B·P]`: the output before it is scattered, or the gathered `dY`.
    product: Vec<f32>,
    /// The live taps of the weight, `[Cout, Cin·T]` (only when they are neither all taps nor one).
    weight: Vec<f32>,
    /// The input gradient's columns, `[Cin·T, B·P]`.
    grad_columns: Vec<f32>,
    /// A column budget other than [`COLUMN_BUDGET`], in floats (the tests make groups and chunks with it).
    budget: Option<usize>,
}

/// The whole output with the kernel taps that read inside the input for some output pixel: along each axis the
/// taps valid for some output index form one range, and the live taps are the product of the two ranges.
fn live_block(g: &ConvGeometry) -> Block {
    let live = |outputs: usize, size: usize| {
        let valid: Vec<usize> = (0..g.k)
            .filter(|&t| (0..outputs).any(|o| g.source(o, t, size).is_some()))
            .collect();
        match (valid.first(), valid.last()) {
            (Some(&a), Some(&b)) => a..b + 1,
            _ => 0..0,
        }
    };
    Block {
        out_rows: 0..g.oh,
        out_cols: 0..g.ow,
        tap_rows: live(g.oh, g.h),
        tap_cols: live(g.ow, g.w),
        checked: g.padding > 0,
    }
}

/// The weight's live taps as a `[Cout, Cin·T]` matrix, rows in `(c, tap)` order as the columns': where it sits in
/// memory and its strides. All taps and a single tap are read in place; other subsets are gathered into `buf`.
struct LiveWeight {
    at: *const f32,
    row_stride: usize,
    col_stride: usize,
    /// How far apart consecutive input channels' first columns are.
    channel_stride: usize,
}

impl LiveWeight {
    fn new(g: &ConvGeometry, taps: &[(usize, usize)], weight: &[f32], buf: &mut Vec<f32>) -> Self {
        let k2 = g.k * g.k;
        if taps.len() == k2 {
            return Self {
                at: weight.as_ptr(),
                row_stride: g.cin * k2,
                col_stride: 1,
                channel_stride: k2,
            };
        }
        if let [(ky, kx)] = taps {
            return Self {
                at: weight[ky * g.k + kx..].as_ptr(),
                row_stride: g.cin * k2,
                col_stride: k2,
                channel_stride: k2,
            };
        }
        let t = taps.len();
        let dst = at_least(buf, g.cout * g.cin * t);
        dst.par_chunks_mut(g.cin * t).enumerate().for_each(|(co, row)| {
            for (c, live) in row.chunks_mut(t).enumerate() {
                let src = &weight[(co * g.cin + c) * k2..][..k2];
                for (v, &(ky, kx)) in live.iter_mut().zip(taps) {
                    *v = src[ky * g.k + kx];
                }
            }
        });
        Self {
            at: buf.as_ptr(),
            row_stride: g.cin * t,
            col_stride: 1,
            channel_stride: t,
        }
    }

    /// Where input channel `c`'s first column is.
    fn channel(&self, c: usize) -> *const f32 {
        // SAFETY: `c` < Cin: inside the weight (or the gathered buffer) this was made from.
        unsafe { self.at.add(c * self.channel_stride) }
    }
}

/// Images per group and input channels per chunk, so that a chunk's columns stay near [`COLUMN_BUDGET`]: whole
/// images first (every product then spans all the channels), channels only when one image alone passes it.
fn grouping(g: &ConvGeometry, taps: usize, images: usize, budget: Option<usize>) -> (usize, usize) {
    let budget = budget.unwrap_or(COLUMN_BUDGET);
    let per_image = g.cin * taps * g.oh * g.ow;
    let group = (budget / per_image.max(1)).clamp(1, images.max(1));
    let chunk = (budget / (taps * group * g.oh * g.ow).max(1)).clamp(1, g.cin);
    (group, chunk)
}

/// Runs `f(images, channels, columns)` for each group of images and, within it, each chunk of input channels
/// (in order, so `channels.start == 0` opens a group and `channels.end == Cin` closes it), `columns` being that
/// chunk's `[(c1−c0)·T, B·P]` columns of the group's images.
fn for_each_chunk(
    g: &ConvGeometry,
    (block, taps): (&Block, &[(usize, usize)]),
    x: &[f32],
    budget: Option<usize>,
    columns: &mut Vec<f32>,
    mut f: impl FnMut(Range<usize>, Range<usize>, &[f32]),
) {
    let n_in = g.input_len();
    let images = x.len() / n_in;
    let (group, chunk) = grouping(g, taps.len(), images, budget);
    for i0 in (0..images).step_by(group) {
        let i1 = (i0 + group).min(images);
        let group_images: Vec<&[f32]> = (i0..i1).map(|i| &x[i * n_in..(i + 1) * n_in]).collect();
        let len = taps.len() * group_images.len() * g.oh * g.ow;
        for c0 in (0..g.cin).step_by(chunk) {
            let c1 = (c0 + chunk).min(g.cin);
            fill_columns(g, block, taps, c0..c1, 0..g.oh, &group_images, columns);
            f(i0..i1, c0..c1, &columns[..(c1 - c0) * len]);
        }
    }
}

/// The batch's output `out` `[B, Cout, oh, ow]` from `x` `[B, Cin, H, W]`, with `epilogue` (its residual, if any,
/// the whole batch's `[B, Cout, oh, ow]`). Every element of `out` is written.
pub(crate) fn forward(
    g: &ConvGeometry,
    x: &[f32],
    weight: &[f32],
    epilogue: Epilogue,
    out: &mut [f32],
    buffers: &mut Buffers,
) {
    let (n_in, n_out, p) = (g.input_len(), g.output_len(), g.oh * g.ow);
    let images = x.len() / n_in;
    assert_eq!(x.len(), images * n_in, "small-map conv: input length");
    assert_eq!(out.len(), images * n_out, "small-map conv: output length");
    assert_eq!(weight.len(), g.weight_len(), "small-map conv: weight length");
    let image_epilogue = |i: usize| Epilogue {
        residual: epilogue.residual.map(|r| &r[i * n_out..(i + 1) * n_out]),
        ..epilogue
    };
    let block = live_block(g);
    let taps = block.taps();
    if taps.is_empty() {
        // Every tap reads padding: the output is the epilogue alone.
        out.par_chunks_mut(p).enumerate().for_each(|(j, o)| {
            o.fill(0.0);
            image_epilogue(j / g.cout).finish(j % g.cout, p, 0, o);
        });
        return;
    }
    let lhs = LiveWeight::new(g, &taps, weight, &mut buffers.weight);
    let product = &mut buffers.product;
    for_each_chunk(
        g,
        (&block, &taps),
        x,
        buffers.budget,
        &mut buffers.columns,
        |images, channels, cols| {
            let n = images.len() * p;
            let sum = at_least(product, g.cout * n);
            // SAFETY: `sum` is [cout, n]; the live weight's columns of these channels are [cout, channels·T] with its
            // strides; the columns are [channels·T, n].
            unsafe {
                product_strided(
                    g.cout,
                    n,
                    channels.len() * taps.len(),
                    (sum.as_mut_ptr(), n, 1),
                    (lhs.channel(channels.start), lhs.row_stride, lhs.col_stride),
                    (cols.as_ptr(), n, 1),
                    channels.start > 0,
                )
            };
            if channels.end < g.cin {
                return;
            }
            // [Cout, B·P] → [B, Cout, P], with the bias, residual and ReLU.
            let sum = &*sum;
            out[images.start * n_out..images.end * n_out]
                .par_chunks_mut(p)
                .enumerate()
                .for_each(|(j, o)| {
                    let (i, co) = (j / g.cout, j % g.cout);
                    o.copy_from_slice(&sum[co * n + i * p..][..p]);
                    image_epilogue(images.start + i).finish(co, p, 0, o);
                });
        },
    );
}

/// `dY` of images `images` as one `[Cout, B·P]` matrix, images side by side, in `buf`.
fn gather_grad_y<'a>(g: &ConvGeometry, grad_y: &[f32], images: Range<usize>, buf: &'a mut Vec<f32>) -> &'a [f32] {
    let (p, n_out) = (g.oh * g.ow, g.output_len());
    let n = images.len() * p;
    let dy = at_least(buf, g.cout * n);
    dy.par_chunks_mut(n).enumerate().for_each(|(co, row)| {
        for (i, dst) in images.clone().zip(row.chunks_mut(p)) {
            dst.copy_from_slice(&grad_y[i * n_out + co * p..][..p]);
        }
    });
    dy
}

/// `grad_w` `[Cout, Cin, k, k]` = the batch's weight gradient, from `x` `[B, Cin, H, W]` and `grad_y`
/// `[B, Cout, oh, ow]`: `dW[:, live] = dY · colsᵀ`, zero at the taps that read only padding.
pub(crate) fn weight_grad(g: &ConvGeometry, x: &[f32], grad_y: &[f32], grad_w: &mut [f32], buffers: &mut Buffers) {
    let (n_in, p) = (g.input_len(), g.oh * g.ow);
    let images = x.len() / n_in;
    assert_eq!(x.len(), images * n_in, "small-map weight gradient: input length");
    assert_eq!(
        grad_y.len(),
        images * g.output_len(),
        "small-map weight gradient: output gradient length"
    );
    assert_eq!(grad_w.len(), g.weight_len(), "small-map weight gradient: weight length");
    grad_w.fill(0.0);
    let block = live_block(g);
    let taps = block.taps();
    if taps.is_empty() {
        return;
    }
    let k2 = g.k * g.k;
    // dW's live taps in place (all taps, or one at stride k²), or a compact [Cout, Cin·T] sum scattered at the end.
    let compact = taps.len() != k2 && taps.len() != 1;
    let t = taps.len();
    let (dw, dw_rs, dw_cs, dw_channel) = if compact {
        let sum = at_least(&mut buffers.weight, g.cout * g.cin * t);
        sum.fill(0.0);
        (sum.as_mut_ptr(), g.cin * t, 1, t)
    } else {
        let (ky, kx) = taps[0];
        let first = if t == 1 { ky * g.k + kx } else { 0 };
        (
            grad_w[first..].as_mut_ptr(),
            g.cin * k2,
            if t == 1 { k2 } else { 1 },
            k2,
        )
    };
    let product = &mut buffers.product;
    for_each_chunk(
        g,
        (&block, &taps),
        x,
        buffers.budget,
        &mut buffers.columns,
        |images, channels, cols| {
            let n = images.len() * p;
            if channels.start == 0 {
                gather_grad_y(g, grad_y, images, product);
            }
            // SAFETY: dW's live columns of these channels are [cout, channels·T] with the strides above; dY is
            // [cout, n]; colsᵀ is the columns [channels·T, n] read with strides (1, n).
            unsafe {
                product_strided(
                    g.cout,
                    channels.len() * t,
                    n,
                    (dw.add(channels.start * dw_channel), dw_rs, dw_cs),
                    (product.as_ptr(), n, 1),
                    (cols.as_ptr(), 1, n),
                    true,
                )
            };
        },
    );
    if compact {
        let sum = &buffers.weight[..g.cout * g.cin * t];
        grad_w.par_chunks_mut(g.cin * k2).enumerate().for_each(|(co, row)| {
            for (c, dst) in row.chunks_mut(k2).enumerate() {
                for (&v, &(ky, kx)) in sum[(co * g.cin + c) * t..][..t].iter().zip(&taps) {
                    dst[ky * g.k + kx] = v;
                }
            }
        });
    }
}

/// The batch's input gradient `grad_x` `[B, Cin, H, W]` from `weight` and `grad_y` `[B, Cout, oh, ow]`:
/// `col2im(W[:, live]ᵀ · dY)`. Every element of `grad_x` is written.
pub(crate) fn input_grad(g: &ConvGeometry, weight: &[f32], grad_y: &[f32], grad_x: &mut [f32], buffers: &mut Buffers) {
    let (n_in, n_out, p) = (g.input_len(), g.output_len(), g.oh * g.ow);
    let images = grad_y.len() / n_out;
    assert_eq!(
        grad_y.len(),
        images * n_out,
        "small-map input gradient: output gradient length"
    );
    assert_eq!(grad_x.len(), images * n_in, "small-map input gradient: input length");
    assert_eq!(weight.len(), g.weight_len(), "small-map input gradient: weight length");
    grad_x.par_chunks_mut(n_in).for_each(|x| x.fill(0.0));
    let block = live_block(g);
    let taps = block.taps();
    if taps.is_empty() {
        return;
    }
    let t = taps.len();
    let lhs = LiveWeight::new(g, &taps, weight, &mut buffers.weight);
    let (group, chunk) = grouping(g, t, images, buffers.budget);
    let plane = g.h * g.w;
    for i0 in (0..images).step_by(group) {
        let i1 = (i0 + group).min(images);
        let n = (i1 - i0) * p;
        let dy = gather_grad_y(g, grad_y, i0..i1, &mut buffers.product);
        for c0 in (0..g.cin).step_by(chunk) {
            let c1 = (c0 + chunk).min(g.cin);
            let rows = (c1 - c0) * t;
            let cols = at_least(&mut buffers.grad_columns, rows * n);
            // SAFETY: cols is [rows, n]; the live weight's columns of channels c0..c1, transposed, are [rows, cout]
            // with strides (column stride, row stride); dY is [cout, n].
            unsafe {
                product_strided(
                    rows,
                    n,
                    g.cout,
                    (cols.as_mut_ptr(), n, 1),
                    (lhs.channel(c0), lhs.col_stride, lhs.row_stride),
                    (dy.as_ptr(), n, 1),
                    false,
                )
            };
            // col2im: each (image, channel) plane takes its T rows' share of that image's pixels.
            let cols = &*cols;
            grad_x[i0 * n_in..i1 * n_in]
                .par_chunks_mut(plane)
                .enumerate()
                .filter(|(j, _)| (c0..c1).contains(&(j % g.cin)))
                .for_each(|(j, dst)| {
                    let (i, c) = (j / g.cin, j % g.cin);
                    for (ti, &(ky, kx)) in taps.iter().enumerate() {
                        let row = &cols[((c - c0) * t + ti) * n + i * p..][..p];
                        super::conv_cpu_backward::add_tap(g, ky, kx, row, dst);
                    }
                });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::conv_cpu::tests::seeded;

    /// The definition in f64: `out[i, co, oy, ox] = Σ W[co, c, ky, kx] · x[i, c, iy, ix]` over taps inside.
    fn reference_forward(g: &ConvGeometry, x: &[f32], w: &[f32]) -> Vec<f64> {
        let images = x.len() / g.input_len();
        let mut out = vec![0f64; images * g.output_len()];
        for i in 0..images {
            for co in 0..g.cout {
                for oy in 0..g.oh {
                    for ox in 0..g.ow {
                        let mut s = 0f64;
                        for c in 0..g.cin {
                            for ky in 0..g.k {
                                for kx in 0..g.k {
                                    if let (Some(iy), Some(ix)) = (g.source(oy, ky, g.h), g.source(ox, kx, g.w)) {
                                        s += w[((co * g.cin + c) * g.k + ky) * g.k + kx] as f64
                                            * x[((i * g.cin + c) * g.h + iy) * g.w + ix] as f64;
                                    }
                                }
                            }
                        }
                        out[((i * g.cout + co) * g.oh + oy) * g.ow + ox] = s;
                    }
                }
            }
        }
        out
    }

    fn max_error(want: &[f64], got: &[f32]) -> f64 {
        want.iter()
            .zip(got)
            .map(|(a, &b)| (a - b as f64).abs())
            .fold(0.0, f64::max)
    }

    /// Geometries whose live taps are all taps, a rectangle of them, a single one (a dilation larger than the
    /// map), and a strided, a 1×1 and a stem-like convolution.
    fn cases() -> Vec<ConvGeometry> {
        // (cin, h, w, cout, k, stride, padding, dilation)
        [
            (5, 6, 6, 7, 3, 1, 1, 1),
            (4, 6, 5, 6, 3, 1, 4, 4),
            (3, 6, 6, 5, 3, 1, 12, 12),
            (6, 7, 9, 4, 3, 2, 1, 1),
            (8, 5, 6, 3, 1, 1, 0, 1),
            (3, 9, 9, 4, 7, 2, 3, 1),
        ]
        .into_iter()
        .map(|(cin, h, w, cout, k, s, p, d)| ConvGeometry::new((cin, h, w), (cout, k), s, p, d).unwrap())
        .collect()
    }

    /// The forward pass, its gradients' contractions with a random `dY`, and what the live taps leave out, against
    /// the definition; from NaN-filled buffers, with a budget that splits the batch into groups and chunks.
    #[test]
    fn batch_wide_products_match_the_definition() {
        for (case, g) in cases().into_iter().enumerate() {
            // The default budget (one group, one chunk); one image per group; one image and one channel per chunk.
            let one_image = g.cin * live_block(&g).taps().len() * g.oh * g.ow;
            for (images, budget) in [(1, None), (3, None), (3, Some(one_image)), (3, Some(1))] {
                let seed = 10 * case as u64 + images as u64;
                let x = seeded(images * g.input_len(), seed);
                let weight = seeded(g.weight_len(), seed + 100);
                let bias = seeded(g.cout, seed + 200);
                let residual = seeded(images * g.output_len(), seed + 300);
                let mut buffers = Buffers {
                    budget,
                    ..Buffers::default()
                };

                let mut out = vec![f32::NAN; images * g.output_len()];
                let epilogue = Epilogue {
                    bias: Some(&bias),
                    residual: Some(&residual),
                    relu: true,
                };
                forward(&g, &x, &weight, epilogue, &mut out, &mut buffers);
                let want: Vec<f64> = reference_forward(&g, &x, &weight)
                    .iter()
                    .enumerate()
                    .map(|(j, v)| {
                        let co = (j / (g.oh * g.ow)) % g.cout;
                        (v + bias[co] as f64 + residual[j] as f64).max(0.0)
                    })
                    .collect();
                assert!(
                    max_error(&want, &out) < 1e-4,
                    "{g:?} × {images}, budget {budget:?}: forward"
                );

                // ⟨dY, conv(x, W)⟩ is linear in W and in x: its gradients are the definition's.
                let grad_y = seeded(images * g.output_len(), seed + 400);
                let mut grad_w = vec![f32::NAN; g.weight_len()];
                weight_grad(&g, &x, &grad_y, &mut grad_w, &mut buffers);
                let mut grad_x = vec![f32::NAN; images * g.input_len()];
                input_grad(&g, &weight, &grad_y, &mut grad_x, &mut buffers);
                let dot = |x: &[f32], w: &[f32]| -> f64 {
                    reference_forward(&g, x, w)
                        .iter()
                        .zip(&grad_y)
                        .map(|(a, &b)| a * b as f64)
                        .sum()
                };
                for j in 0..g.weight_len() {
                    let mut unit = vec![0f32; g.weight_len()];
                    unit[j] = 1.0;
                    let want = dot(&x, &unit);
                    assert!(
                        (want - grad_w[j] as f64).abs() < 1e-4,
                        "{g:?} × {images}, budget {budget:?}: dW[{j}]"
                    );
                }
                for j in (0..grad_x.len()).step_by(7) {
                    let mut unit = vec![0f32; grad_x.len()];
                    unit[j] = 1.0;
                    let want = dot(&unit, &weight);
                    assert!(
                        (want - grad_x[j] as f64).abs() < 1e-4,
                        "{g:?} × {images}, budget {budget:?}: dX[{j}]"
                    );
                }
            }
        }
    }

    #[test]
    fn taps_that_read_only_padding_are_left_out() {
        // A dilation of 12 on a 6×6 map: only the centre tap reads inside.
        let g = ConvGeometry::new((8, 6, 6), (8, 3), 1, 12, 12).unwrap();
        assert_eq!(live_block(&g).taps(), vec![(1, 1)]);
        // A dilation of 4 on a 6×6 map: every tap reads inside for some pixel.
        let g = ConvGeometry::new((8, 6, 6), (8, 3), 1, 4, 4).unwrap();
        assert_eq!(live_block(&g).taps().len(), 9);
        // A dilation of 4 on a 3-pixel-wide map: only the middle column of taps.
        let g = ConvGeometry::new((8, 6, 3), (8, 3), 1, 4, 4).unwrap();
        assert_eq!(live_block(&g).taps(), vec![(0, 1), (1, 1), (2, 1)]);
    }
}

//! Stride-1 convolutions whose taps read much zero padding (DeepLabV3's ASPP: 3×3 at dilations 12/24/36 on a
//! 64×64 map, where 23–61% of the taps land in the padding), as one matrix product per kernel tap over exactly the
//! pixels where that tap reads inside the input.
//!
//! Along an axis, tap `t` of a stride-1 convolution shifts by `δ = t·d − p`: output indices `o0..o0+n` read input
//! indices `o0+δ..o0+δ+n`, a contiguous range. So per kernel column `kx`:
//! - the input's valid columns are copied once into a compact `[Cin, H, n_x]` buffer (no copy when every column is
//!   valid), in which each kernel row's valid input rows are one contiguous `[Cin, n_y·n_x]` matrix;
//! - each kernel row `ky` adds `W[:, :, ky, kx] · X_kx[:, rows]` onto the matching output rows of a compact
//!   `[Cout, oh, n_x]` sum (or straight onto the output when every column is valid);
//! - the sum is added onto the output's columns `o0..o0+n_x`.
//!
//! Every product is large (`[Cout, Cin] · [Cin, n_y·n_x]`, at least 28·28 pixels for the ASPP at 512²), so the
//! multiplications skipped are exactly the padded ones and the rest run at the matrix product's rate. The band ×
//! band blocks of [`super::conv_cpu::plan`] skip the same taps but make many small products (a 12×12 corner times
//! a 2048-channel weight), each re-packing its weight.

use rayon::prelude::*;

use super::conv_cpu::{at_least, product_strided, ConvGeometry};

/// Buffers reused across calls.
#[derive(Default)]
pub(crate) struct Buffers {
    /// The weight tap-major: `[k², Cout, Cin]`.
    weight: Vec<f32>,
    /// The input's valid columns for one kernel column: `[Cin, H, n_x]`.
    input: Vec<f32>,
    /// The output side over one kernel column's valid output columns, `[Cout, oh, n_x]`: the products' sum (forward)
    /// or dY (weight gradient).
    output: Vec<f32>,
}

/// Where tap `t` reads inside an input axis of `size` (output axis `outputs`, stride 1): `(first output, first
/// input, count)`, or `None` when it reads only padding.
fn span(g: &ConvGeometry, t: usize, size: usize, outputs: usize) -> Option<(usize, usize, usize)> {
    let delta = (t * g.dilation) as isize - g.padding as isize;
    let first = (-delta).max(0);
    let end = (outputs as isize).min(size as isize - delta);
    (end > first).then(|| (first as usize, (first + delta) as usize, (end - first) as usize))
}

/// Adds the convolution of `x` `[Cin, H, W]` by `weight` `[Cout, Cin, k, k]` onto `out` `[Cout, oh, ow]`.
pub(crate) fn conv2d_add(g: &ConvGeometry, x: &[f32], weight: &[f32], out: &mut [f32], buffers: &mut Buffers) {
    assert_eq!(g.stride, 1, "tap-wise convolution: stride 1 only");
    let (k2, plane) = (g.k * g.k, g.oh * g.ow);
    // Tap-major weight, so each tap's [Cout, Cin] is packed from contiguous rows (its columns are k² apart as
    // stored: each product would read the whole weight for a ninth of it).
    let taps = at_least(&mut buffers.weight, g.weight_len());
    taps.par_chunks_mut(g.cout * g.cin).enumerate().for_each(|(t, dst)| {
        for (i, v) in dst.iter_mut().enumerate() {
            *v = weight[i * k2 + t];
        }
    });
    let taps = &buffers.weight[..g.weight_len()];

    for kx in 0..g.k {
        let Some((ox0, ix0, nx)) = span(g, kx, g.w, g.ow) else {
            continue;
        };
        let whole_rows = nx == g.w && nx == g.ow;
        // The input matrix (rows `channel · H + iy`, `nx` wide) and the destination of the products.
        let input: &[f32] = if whole_rows {
            x
        } else {
            compact_columns(x, g.cin, (g.h, g.w), ix0..ix0 + nx, &mut buffers.input);
            &buffers.input[..g.cin * g.h * nx]
        };
        let (dst, dst_plane) = if whole_rows {
            (out.as_mut_ptr(), plane)
        } else {
            let sum = at_least(&mut buffers.output, g.cout * g.oh * nx);
            sum.par_chunks_mut(g.oh * nx).for_each(|s| s.fill(0.0));
            (sum.as_mut_ptr(), g.oh * nx)
        };
        for ky in 0..g.k {
            let Some((oy0, iy0, ny)) = span(g, ky, g.h, g.oh) else {
                continue;
            };
            let tap = &taps[(ky * g.k + kx) * g.cout * g.cin..][..g.cout * g.cin];
            // SAFETY: dst is [cout, oh·nx] (or `out`, [cout, oh·ow] with nx = ow) and rows oy0..oy0+ny of each
            // output channel are inside it; the tap is [cout, cin]; the input rows iy0..iy0+ny of each channel are
            // inside `input` ([cin, h·nx]), channels h·nx apart.
            unsafe {
                product_strided(
                    g.cout,
                    ny * nx,
                    g.cin,
                    (dst.add(oy0 * nx), dst_plane, 1),
                    (tap.as_ptr(), g.cin, 1),
                    (input[iy0 * nx..].as_ptr(), g.h * nx, 1),
                    true,
                )
            };
        }
        if !whole_rows {
            let sum = &buffers.output[..g.cout * g.oh * nx];
            out.par_chunks_mut(plane).enumerate().for_each(|(co, o)| {
                for (oy, s) in sum[co * g.oh * nx..][..g.oh * nx].chunks(nx).enumerate() {
                    o[oy * g.ow + ox0..][..nx].iter_mut().zip(s).for_each(|(d, s)| *d += s);
                }
            });
        }
    }
}

/// Adds the batch's weight gradient onto `grad_w` `[Cout, Cin, k, k]`, from `images` (each `[Cin, H, W]`) and
/// `grad_y` `[B, Cout, oh·ow]`: per tap and image, `dW[:, :, ky, kx] += dY[:, valid pixels] · X[:, their sources]ᵀ`,
/// with the same compact per-kernel-column buffers as [`conv2d_add`] (here for dY's valid output columns too).
pub(crate) fn weight_grad_add(
    g: &ConvGeometry,
    images: &[&[f32]],
    grad_y: &[f32],
    grad_w: &mut [f32],
    buffers: &mut Buffers,
) {
    assert_eq!(g.stride, 1, "tap-wise weight gradient: stride 1 only");
    let (k2, plane) = (g.k * g.k, g.oh * g.ow);
    let kk = g.cin * k2;
    for kx in 0..g.k {
        let Some((ox0, ix0, nx)) = span(g, kx, g.w, g.ow) else {
            continue;
        };
        let whole_rows = nx == g.w && nx == g.ow;
        for (i, x) in images.iter().enumerate() {
            let dy_image = &grad_y[i * g.cout * plane..(i + 1) * g.cout * plane];
            let (input, dy): (&[f32], &[f32]) = if whole_rows {
                (x, dy_image)
            } else {
                compact_columns(x, g.cin, (g.h, g.w), ix0..ix0 + nx, &mut buffers.input);
                compact_columns(dy_image, g.cout, (g.oh, g.ow), ox0..ox0 + nx, &mut buffers.output);
                (
                    &buffers.input[..g.cin * g.h * nx],
                    &buffers.output[..g.cout * g.oh * nx],
                )
            };
            debug_assert_eq!(input.len(), g.cin * g.h * nx);
            for ky in 0..g.k {
                let Some((oy0, iy0, ny)) = span(g, ky, g.h, g.oh) else {
                    continue;
                };
                // SAFETY: dW's tap (ky, kx) is [cout, cin] with rows cin·k² and columns k² apart inside grad_w; dY's
                // rows oy0..oy0+ny of each output channel are [cout, ny·nx] (rows oh·nx apart); X's rows
                // iy0..iy0+ny of each input channel, read transposed, are [ny·nx, cin] (strides 1, h·nx).
                unsafe {
                    product_strided(
                        g.cout,
                        g.cin,
                        ny * nx,
                        (grad_w[ky * g.k + kx..].as_mut_ptr(), kk, k2),
                        (dy[oy0 * nx..].as_ptr(), g.oh * nx, 1),
                        (input[iy0 * nx..].as_ptr(), 1, g.h * nx),
                        true,
                    )
                };
            }
        }
    }
}

/// Columns `cols` of every row of `channels` planes `[rows, width]`, packed into `buf` as `[channels, rows,
/// cols.len()]`.
fn compact_columns(
    src: &[f32],
    channels: usize,
    (rows, width): (usize, usize),
    cols: std::ops::Range<usize>,
    buf: &mut Vec<f32>,
) {
    let n = cols.len();
    at_least(buf, channels * rows * n)
        .par_chunks_mut(rows * n)
        .enumerate()
        .for_each(|(c, dst)| {
            for (r, row) in dst.chunks_mut(n).enumerate() {
                row.copy_from_slice(&src[(c * rows + r) * width + cols.start..][..n]);
            }
        });
}

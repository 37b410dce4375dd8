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
    /// One kernel column's sum over its valid output columns: `[Cout, oh, n_x]`.
    sum: Vec<f32>,
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
    let (k2, plane, hw) = (g.k * g.k, g.oh * g.ow, g.h * g.w);
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
            let buf = at_least(&mut buffers.input, g.cin * g.h * nx);
            buf.par_chunks_mut(g.h * nx).enumerate().for_each(|(c, dst)| {
                for (iy, row) in dst.chunks_mut(nx).enumerate() {
                    row.copy_from_slice(&x[c * hw + iy * g.w + ix0..][..nx]);
                }
            });
            &buffers.input[..g.cin * g.h * nx]
        };
        let (dst, dst_plane) = if whole_rows {
            (out.as_mut_ptr(), plane)
        } else {
            let sum = at_least(&mut buffers.sum, g.cout * g.oh * nx);
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
            let sum = &buffers.sum[..g.cout * g.oh * nx];
            out.par_chunks_mut(plane).enumerate().for_each(|(co, o)| {
                for (oy, s) in sum[co * g.oh * nx..][..g.oh * nx].chunks(nx).enumerate() {
                    o[oy * g.ow + ox0..][..nx].iter_mut().zip(s).for_each(|(d, s)| *d += s);
                }
            });
        }
    }
}

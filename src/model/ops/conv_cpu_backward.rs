//! The gradients of the CPU convolution (f32, NCHW, groups = 1), per image, for [`super::conv::conv2d`] in training.
//!
//! Both multiply by the column matrix of the input, rebuilt here a chunk of input channels at a time rather than kept
//! from the forward pass, so the autograd graph holds no `[Cin·k², L]` buffers (for a ResNet-50 at crop 512 those
//! were gigabytes, each a fresh allocation the kernel had to zero):
//! - weight: `dW[Cout, Cin·k²] += dY[Cout, L] · colsᵀ` (1×1 stride-1: `dY · Xᵀ`, no columns);
//! - input: `dX = col2im(Wᵀ · dY)` (1×1 stride-1: `Wᵀ · dY`, no columns; 3×3 stride-1 "same": the forward kernel on
//!   dY with the flipped, transposed weight).
//!
//! Small feature maps go to [`super::small_maps`], which runs the whole batch as one product.

use rayon::prelude::*;

use super::conv_cpu::{
    at_least, channels_per_chunk, conv2d_image, fill_columns, plan, product_strided, ConvGeometry, Epilogue,
    KeptWeights, Scratch, COLUMN_BUDGET,
};

/// Buffers reused across calls.
#[derive(Default)]
pub struct Buffers {
    columns: Vec<f32>,
    gathered: Vec<f32>,
    flipped: Vec<f32>,
    tapwise: super::tapwise::Buffers,
    small_maps: super::small_maps::Buffers,
}

/// `W'[ci][co][ky][kx] = W[co][ci][k−1−ky][k−1−kx]`: the weight of the convolution that maps dY to dX.
fn flipped_transpose<'a>(g: &ConvGeometry, weight: &[f32], buf: &'a mut Vec<f32>) -> &'a [f32] {
    let k2 = g.k * g.k;
    let out = at_least(buf, g.weight_len());
    out.par_chunks_mut(g.cout * k2).enumerate().for_each(|(ci, dst)| {
        for co in 0..g.cout {
            let src = &weight[(co * g.cin + ci) * k2..(co * g.cin + ci + 1) * k2];
            for (t, v) in dst[co * k2..(co + 1) * k2].iter_mut().enumerate() {
                *v = src[k2 - 1 - t];
            }
        }
    });
    out
}

fn is_pointwise(g: &ConvGeometry) -> bool {
    g.k == 1 && g.stride == 1 && g.padding == 0
}

/// `grad_w` `[Cout, Cin, k, k]` = the batch's weight gradient, from `x` `[B, Cin, H, W]` and `grad_y`
/// `[B, Cout, oh·ow]`. The images' pixels go side by side into each product (its inner dimension), so small feature
/// maps still make large products.
pub fn weight_grad(g: &ConvGeometry, x: &[f32], grad_y: &[f32], grad_w: &mut [f32], buffers: &mut Buffers) {
    let b = x.len() / g.input_len().max(1);
    assert_eq!(x.len(), b * g.input_len(), "weight gradient: input length");
    assert_eq!(
        grad_y.len(),
        b * g.output_len(),
        "weight gradient: output gradient length"
    );
    assert_eq!(grad_w.len(), g.weight_len(), "weight gradient: weight length");
    if super::small_maps::applies(g) {
        return super::small_maps::weight_grad(g, x, grad_y, grad_w, &mut buffers.small_maps);
    }
    grad_w.fill(0.0);
    let plane = g.oh * g.ow;
    let kk = g.cin * g.k * g.k;
    let k2 = g.k * g.k;
    let images: Vec<&[f32]> = x.chunks(g.input_len()).collect();
    if is_pointwise(g) {
        for (i, xi) in images.iter().enumerate() {
            // SAFETY: dY is [cout, l]; Xᵀ is x [cin, l] read with strides (1, l); dW is [cout, cin].
            unsafe {
                product_strided(
                    g.cout,
                    g.cin,
                    plane,
                    (grad_w.as_mut_ptr(), g.cin, 1),
                    (grad_y[i * g.output_len()..].as_ptr(), plane, 1),
                    (xi.as_ptr(), 1, plane),
                    true,
                )
            };
        }
        return;
    }
    let blocks = plan(g);
    if g.stride == 1 && blocks.len() > 1 {
        // Skipping the padded taps pays: one large product per tap and image, as the forward pass.
        super::tapwise::weight_grad_add(g, &images, grad_y, grad_w, &mut buffers.tapwise);
        return;
    }
    // Block by block: taps that read only padding contribute nothing and are skipped.
    for block in blocks {
        let taps = block.taps();
        let width = block.out_cols.len();
        let npix = block.out_rows.len() * width;
        if taps.is_empty() || npix == 0 {
            continue;
        }
        let all_taps = taps.len() == k2;
        let n = b * npix; // the product's inner dimension: every image's pixels of this block
                          // dY over the block's pixels, image after image: [cout, b·npix].
        let dy = at_least(&mut buffers.gathered, g.cout * n);
        dy.par_chunks_mut(n).enumerate().for_each(|(co, dst)| {
            for (i, dst) in dst.chunks_mut(npix).enumerate() {
                for (r, oy) in block.out_rows.clone().enumerate() {
                    let src = &grad_y[i * g.output_len() + co * plane + oy * g.ow + block.out_cols.start..][..width];
                    dst[r * width..(r + 1) * width].copy_from_slice(src);
                }
            }
        });
        let dy = &buffers.gathered[..g.cout * n];
        // Each chunk re-packs dY inside the product, so chunks stay at 64 channels or more even when the batch's
        // columns then pass the budget (batch 16 at 30×30: 64·9·14400 floats, 33 MB).
        let chunk = (COLUMN_BUDGET / (n * taps.len())).max(64).clamp(1, g.cin);
        for c0 in (0..g.cin).step_by(chunk) {
            let c1 = (c0 + chunk).min(g.cin);
            fill_columns(
                g,
                &block,
                &taps,
                c0..c1,
                block.out_rows.clone(),
                &images,
                &mut buffers.columns,
            );
            let cols = &buffers.columns[..(c1 - c0) * taps.len() * n];
            // SAFETY: dY is [cout, n]; colsᵀ is cols [(c, tap), n] read with strides (1, n) (all taps) or, for one
            // tap, (1, taps·n) from that tap's first row; dW's columns for channels c0.. are k² apart per channel
            // (k²·cin per row), one tap at offset ky·k + kx.
            unsafe {
                if all_taps {
                    product_strided(
                        g.cout,
                        (c1 - c0) * k2,
                        n,
                        (grad_w[c0 * k2..].as_mut_ptr(), kk, 1),
                        (dy.as_ptr(), n, 1),
                        (cols.as_ptr(), 1, n),
                        true,
                    );
                } else {
                    for (ti, &(ky, kx)) in taps.iter().enumerate() {
                        product_strided(
                            g.cout,
                            c1 - c0,
                            n,
                            (grad_w[c0 * k2 + ky * g.k + kx..].as_mut_ptr(), kk, k2),
                            (dy.as_ptr(), n, 1),
                            (cols[ti * n..].as_ptr(), 1, taps.len() * n),
                            true,
                        );
                    }
                }
            }
        }
    }
}

/// The batch's input gradient `[B, Cin, H, W]` from `weight` `[Cout, Cin, k, k]` and `grad_y` `[B, Cout, oh·ow]`,
/// image by image. Every element of `grad_x` is written before it is read, so what it held before does not matter.
pub fn input_grad(
    g: &ConvGeometry,
    weight: &[f32],
    grad_y: &[f32],
    grad_x: &mut [f32],
    buffers: &mut Buffers,
    forward: &mut Scratch,
) {
    let (n_out, n_in) = (g.output_len(), g.input_len());
    assert_eq!(weight.len(), g.weight_len(), "input gradient: weight length");
    assert!(
        n_out > 0 && grad_y.len().is_multiple_of(n_out),
        "input gradient: output gradient length"
    );
    let images = grad_y.len() / n_out;
    assert_eq!(grad_x.len(), images * n_in, "input gradient: input length");
    if super::small_maps::applies(g) {
        return super::small_maps::input_grad(g, weight, grad_y, grad_x, &mut buffers.small_maps);
    }
    let each = grad_y.chunks_exact(n_out).zip(grad_x.chunks_exact_mut(n_in));
    if is_pointwise(g) {
        let l = g.oh * g.ow;
        for (grad_y, grad_x) in each {
            // SAFETY: Wᵀ is weight [cout, cin] read with strides (1, cin); dY is [cout, l]; dX is [cin, l].
            unsafe {
                product_strided(
                    g.cin,
                    l,
                    g.cout,
                    (grad_x.as_mut_ptr(), l, 1),
                    (weight.as_ptr(), 1, g.cin),
                    (grad_y.as_ptr(), l, 1),
                    false,
                )
            };
        }
        return;
    }
    if g.stride == 1 && 2 * g.padding == g.dilation * (g.k - 1) {
        // A stride-1 "same" convolution's input gradient is the same convolution of dY by the weight with input and
        // output channels swapped and the taps flipped, so it gets the forward kernel's Winograd and tap skipping;
        // the flipped weight (and its Winograd transform) is made once for the batch.
        let flipped = flipped_transpose(g, weight, &mut buffers.flipped);
        let back = ConvGeometry::new((g.cout, g.oh, g.ow), (g.cin, g.k), 1, g.padding, g.dilation)
            .expect("the transposed geometry of a valid same-size convolution is valid");
        let kept = (images > 1).then(KeptWeights::for_one_batch);
        for (grad_y, grad_x) in each {
            conv2d_image(
                &back,
                grad_y,
                (flipped, kept.as_ref()),
                Epilogue::default(),
                grad_x,
                forward,
            );
        }
        return;
    }
    for (grad_y, grad_x) in each {
        input_grad_by_columns(g, weight, grad_y, grad_x, buffers);
    }
}

/// One image's input gradient by products into columns and col2im, for the convolutions that are not "same".
fn input_grad_by_columns(g: &ConvGeometry, weight: &[f32], grad_y: &[f32], grad_x: &mut [f32], buffers: &mut Buffers) {
    let l = g.oh * g.ow;
    let kk = g.cin * g.k * g.k;
    grad_x.fill(0.0);
    let chunk = channels_per_chunk(g, l);
    let k2 = g.k * g.k;
    for c0 in (0..g.cin).step_by(chunk) {
        let c1 = (c0 + chunk).min(g.cin);
        let rows = (c1 - c0) * k2;
        let cols = at_least(&mut buffers.columns, rows * l);
        // SAFETY: cols is [rows, l]; Wᵀ's rows c0·k².. are weight columns read with strides (1, cin·k²); dY is
        // [cout, l].
        unsafe {
            product_strided(
                rows,
                l,
                g.cout,
                (cols.as_mut_ptr(), l, 1),
                (weight[c0 * k2..].as_ptr(), 1, kk),
                (grad_y.as_ptr(), l, 1),
                false,
            )
        };
        // col2im: each channel's k² rows add onto that channel's plane only, so channels run in parallel.
        let cols = &*cols;
        grad_x[c0 * g.h * g.w..c1 * g.h * g.w]
            .par_chunks_mut(g.h * g.w)
            .enumerate()
            .for_each(|(i, plane)| {
                for ky in 0..g.k {
                    for kx in 0..g.k {
                        let row = &cols[((i * g.k + ky) * g.k + kx) * l..][..l];
                        add_tap(g, ky, kx, row, plane);
                    }
                }
            });
    }
}

/// `plane[iy, ix] += row[oy, ox]` for every output pixel whose tap (ky, kx) reads input pixel (iy, ix).
pub(crate) fn add_tap(g: &ConvGeometry, ky: usize, kx: usize, row: &[f32], plane: &mut [f32]) {
    // Output columns whose source column is inside: ox·s + kx·d − p in [0, w).
    let offset = (kx * g.dilation) as isize - g.padding as isize;
    let first = if offset >= 0 {
        0
    } else {
        ((-offset) as usize).div_ceil(g.stride)
    };
    let last = ((g.w as isize - 1 - offset).max(-1) + 1) as usize; // exclusive bound on ox·s
    let end = last.div_ceil(g.stride).min(g.ow);
    if first >= end {
        return;
    }
    for oy in 0..g.oh {
        let iy = (oy * g.stride + ky * g.dilation) as isize - g.padding as isize;
        if iy < 0 || iy >= g.h as isize {
            continue;
        }
        let line = &mut plane[iy as usize * g.w..(iy as usize + 1) * g.w];
        let src = &row[oy * g.ow..(oy + 1) * g.ow];
        if g.stride == 1 {
            let start = (first as isize + offset) as usize;
            line[start..start + end - first]
                .iter_mut()
                .zip(&src[first..end])
                .for_each(|(d, s)| *d += s);
        } else {
            for ox in first..end {
                line[(ox as isize * g.stride as isize + offset) as usize] += src[ox];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::conv_cpu::tests::seeded;

    /// `dX[c, iy, ix] = Σ W[co, c, ky, kx] · dY[co, oy, ox]` over the outputs whose tap (ky, kx) reads (iy, ix).
    fn reference(g: &ConvGeometry, w: &[f32], dy: &[f32]) -> Vec<f32> {
        let mut dx = vec![0f64; g.input_len()];
        for co in 0..g.cout {
            for c in 0..g.cin {
                for (ky, kx) in (0..g.k).flat_map(|ky| (0..g.k).map(move |kx| (ky, kx))) {
                    let wv = w[((co * g.cin + c) * g.k + ky) * g.k + kx] as f64;
                    for oy in 0..g.oh {
                        for ox in 0..g.ow {
                            let iy = (oy * g.stride + ky * g.dilation) as isize - g.padding as isize;
                            let ix = (ox * g.stride + kx * g.dilation) as isize - g.padding as isize;
                            if (0..g.h as isize).contains(&iy) && (0..g.w as isize).contains(&ix) {
                                dx[(c * g.h + iy as usize) * g.w + ix as usize] +=
                                    wv * dy[(co * g.oh + oy) * g.ow + ox] as f64;
                            }
                        }
                    }
                }
            }
        }
        dx.into_iter().map(|v| v as f32).collect()
    }

    /// Every path of the input gradient (1×1, stride-1 "same" through the forward kernel, strided and dilated
    /// through col2im) gives the definition and writes every element: the output starts as NaN, as an unzeroed
    /// buffer may hold anything. One image, and a batch of three (whose "same" path keeps the flipped weight's
    /// Winograd transform from the first image for the others).
    #[test]
    fn input_gradient_matches_the_definition_from_any_starting_buffer() {
        // (cin, h, w, cout, k, stride, padding, dilation)
        for (i, &(cin, h, w, cout, k, s, p, d)) in [
            (6, 9, 7, 5, 1, 1, 0, 1),
            (5, 7, 6, 4, 1, 2, 0, 1),
            (24, 12, 11, 20, 3, 1, 1, 1),
            (4, 12, 11, 5, 3, 1, 4, 4),
            (4, 9, 8, 6, 3, 2, 1, 1),
            (3, 16, 15, 4, 7, 2, 3, 1),
        ]
        .iter()
        .enumerate()
        {
            let g = ConvGeometry::new((cin, h, w), (cout, k), s, p, d).unwrap();
            let weight = seeded(g.weight_len(), i as u64);
            for images in [1, 3] {
                let grad_y = seeded(images * g.output_len(), 50 + i as u64);
                let want: Vec<f32> = grad_y
                    .chunks(g.output_len())
                    .flat_map(|gy| reference(&g, &weight, gy))
                    .collect();
                let mut got = vec![f32::NAN; images * g.input_len()];
                input_grad(
                    &g,
                    &weight,
                    &grad_y,
                    &mut got,
                    &mut Buffers::default(),
                    &mut Scratch::default(),
                );
                assert!(
                    got.iter().all(|v| v.is_finite()),
                    "{g:?} × {images}: an element was not written"
                );
                let err = want.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(err < 1e-4, "{g:?} × {images}: max error {err}");
            }
        }
    }
}

//! Winograd F(4×4, 3×3) for the CPU inference convolution: a 3×3 stride-1 convolution computes each 4×4 output
//! tile from a 6×6 input tile with 36 multiplications per (input, output) channel pair instead of 144, so about a
//! quarter of the multiply-accumulates (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016).
//!
//! Dilated convolutions (ResNet's layer3/layer4 at output stride 8, dilation 2 and 4) run on polyphase sub-grids:
//! output pixels whose row and column have the same residues modulo the dilation read only input pixels with those
//! residues, so each residue pair is an ordinary 3×3 convolution on a sub-image, and all sub-images' tiles go
//! through the same products.
//!
//! Per chunk of input channels: the input tiles are transformed (`V = Bᵀ·d·B`), the weights too (`U = G·g·Gᵀ`,
//! recomputed on each call rather than kept, so the model's memory does not grow: it costs about 1% of the
//! products), then 36 products `M[ξ] += U[ξ] · V[ξ]` (`[Cout, Cin] · [Cin, tiles]`) run on the gemm crate, and at the
//! end each tile's `Aᵀ·M·A` is added onto the output, which already holds the bias and residual.

use rayon::prelude::*;

use super::conv_cpu::{at_least, product_single_threaded, ConvGeometry};

/// Output tile side.
const M: usize = 4;
/// Input tile side, `M + 3 − 1`.
const A: usize = 6;
const A2: usize = A * A;

/// Input transform `Bᵀ` (6×6), interpolation points 0, ±1, ±2, ∞.
#[rustfmt::skip]
const BT: [[f32; A]; A] = [
    [4.0,  0.0, -5.0,  0.0, 1.0, 0.0],
    [0.0, -4.0, -4.0,  1.0, 1.0, 0.0],
    [0.0,  4.0, -4.0, -1.0, 1.0, 0.0],
    [0.0, -2.0, -1.0,  2.0, 1.0, 0.0],
    [0.0,  2.0, -1.0, -2.0, 1.0, 0.0],
    [0.0,  4.0,  0.0, -5.0, 0.0, 1.0],
];

/// Weight transform `G` (6×3).
#[rustfmt::skip]
const G: [[f32; 3]; A] = [
    [ 1.0 / 4.0,   0.0,         0.0      ],
    [-1.0 / 6.0,  -1.0 / 6.0,  -1.0 / 6.0],
    [-1.0 / 6.0,   1.0 / 6.0,  -1.0 / 6.0],
    [ 1.0 / 24.0,  1.0 / 12.0,  1.0 / 6.0],
    [ 1.0 / 24.0, -1.0 / 12.0,  1.0 / 6.0],
    [ 0.0,         0.0,         1.0      ],
];

/// Output transform `Aᵀ` (4×6).
#[rustfmt::skip]
const AT: [[f32; A]; M] = [
    [1.0, 1.0,  1.0, 1.0,  1.0, 0.0],
    [0.0, 1.0, -1.0, 2.0, -2.0, 0.0],
    [0.0, 1.0,  1.0, 4.0,  4.0, 0.0],
    [0.0, 1.0, -1.0, 8.0, -8.0, 1.0],
];

/// Transformed inputs per chunk, in floats (16 MiB).
const INPUT_BUDGET: usize = 4 << 20;

/// One tile: the residues of its sub-grid and its position there, in tiles.
#[derive(Clone, Copy, Debug)]
struct Tile {
    ry: usize,
    rx: usize,
    ty: usize,
    tx: usize,
}

/// Every output tile of every residue sub-grid.
fn tiles(g: &ConvGeometry) -> Vec<Tile> {
    let d = g.dilation;
    let mut tiles = Vec::new();
    for ry in 0..d.min(g.oh) {
        let sh = (g.oh - ry).div_ceil(d);
        for rx in 0..d.min(g.ow) {
            let sw = (g.ow - rx).div_ceil(d);
            for ty in 0..sh.div_ceil(M) {
                for tx in 0..sw.div_ceil(M) {
                    tiles.push(Tile { ry, rx, ty, tx });
                }
            }
        }
    }
    tiles
}

/// Whether this convolution runs here: 3×3, stride 1, "same" padding (the polyphase split needs padding =
/// dilation), and the tiles' multiplications well under the direct convolution's `direct_macs` (per channel pair):
/// large dilations leave sub-images of a few pixels, mostly tile padding.
pub(crate) fn applies(g: &ConvGeometry, direct_macs: usize) -> bool {
    g.k == 3 && g.stride == 1 && g.padding == g.dilation && g.cin >= 16 && {
        let winograd_macs = tiles(g).len() * A2;
        // The transforms cost about a quarter of the products' time on top.
        (winograd_macs as f64) * 1.25 < direct_macs as f64 * 0.9
    }
}

/// Buffers reused across calls.
#[derive(Default)]
pub(crate) struct Buffers {
    input: Vec<f32>,
    weight: Vec<f32>,
    product: Vec<f32>,
}

/// Adds the convolution of `x` `[Cin, H, W]` by `weight` `[Cout, Cin, 3, 3]` onto `out` `[Cout, oh, ow]`.
pub(crate) fn conv2d_add(g: &ConvGeometry, x: &[f32], weight: &[f32], out: &mut [f32], buffers: &mut Buffers) {
    let tiles = tiles(g);
    let t = tiles.len();
    let chunk = (INPUT_BUDGET / (A2 * t)).clamp(8, g.cin);
    // M[co][ξ][tile]
    // Not cleared: the first chunk's products overwrite it.
    at_least(&mut buffers.product, g.cout * A2 * t);
    for c0 in (0..g.cin).step_by(chunk) {
        let cc = (c0 + chunk).min(g.cin) - c0;
        transform_inputs(g, &tiles, x, c0..c0 + cc, &mut buffers.input);
        transform_weights(g, weight, c0..c0 + cc, &mut buffers.weight);
        let (u, v) = (&buffers.weight, &buffers.input);
        // The 36 products are independent and small (`[Cout, cc] · [cc, tiles]`): one single-threaded gemm per
        // task, rather than each product split across the threads with a wait after each.
        let m = buffers.product[..g.cout * A2 * t].as_mut_ptr() as usize;
        (0..A2).into_par_iter().for_each(|xi| {
            // SAFETY: M[co][ξ][·] rows are A2·t apart (length t); U[co][ξ][·] rows A2·cc apart (length cc);
            // V[c][ξ][·] rows A2·t apart (length t); all offsets by ξ stay inside their buffers, and tasks write
            // disjoint elements of M (their own ξ).
            unsafe {
                product_single_threaded(
                    g.cout,
                    t,
                    cc,
                    (m as *mut f32).add(xi * t),
                    A2 * t,
                    u[xi * cc..].as_ptr(),
                    A2 * cc,
                    v[xi * t..].as_ptr(),
                    A2 * t,
                    c0 > 0,
                )
            };
        });
    }
    transform_outputs(g, &tiles, &buffers.product[..g.cout * A2 * t], out);
}

/// Tiles (or channels) transformed together, one per SIMD lane: the loops over lanes vectorise.
const LANES: usize = 16;

type Lanes = [f32; LANES];

/// `out[i][j] = Σ_a m[i][a]·x[a][j]` on lane vectors, skipping the matrix's zeros.
#[inline(always)]
fn left<const R: usize, const K: usize, const C: usize>(m: &[[f32; K]; R], x: &[[Lanes; C]; K]) -> [[Lanes; C]; R] {
    let mut out = [[[0f32; LANES]; C]; R];
    for i in 0..R {
        for a in 0..K {
            let c = m[i][a];
            if c != 0.0 {
                for j in 0..C {
                    for l in 0..LANES {
                        out[i][j][l] += c * x[a][j][l];
                    }
                }
            }
        }
    }
    out
}

/// `out[i][j] = Σ_b x[i][b]·m[j][b]` (times the transpose of `m`) on lane vectors, skipping the matrix's zeros.
#[inline(always)]
fn right<const R: usize, const K: usize, const C: usize>(x: &[[Lanes; K]; R], m: &[[f32; K]; C]) -> [[Lanes; C]; R] {
    let mut out = [[[0f32; LANES]; C]; R];
    for i in 0..R {
        for j in 0..C {
            for b in 0..K {
                let c = m[j][b];
                if c != 0.0 {
                    for l in 0..LANES {
                        out[i][j][l] += c * x[i][b][l];
                    }
                }
            }
        }
    }
    out
}

/// `V[c][ξ][tile] = (Bᵀ·d·B)[ξ]` for the 6×6 input patch `d` of every tile, channels `channels`, `LANES` tiles at
/// a time.
fn transform_inputs(g: &ConvGeometry, tiles: &[Tile], x: &[f32], channels: std::ops::Range<usize>, v: &mut Vec<f32>) {
    let t = tiles.len();
    let d = g.dilation as isize;
    // Every element is written below.
    at_least(v, channels.len() * A2 * t)
        .par_chunks_mut(A2 * t)
        .enumerate()
        .for_each(|(i, vc)| {
            let c = channels.start + i;
            let plane = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
            for t0 in (0..t).step_by(LANES) {
                let lanes = (t - t0).min(LANES);
                // The patches: sub-image rows ty·4 − 1 + a, i.e. input rows ry + d·(ty·4 − 1 + a); zero outside.
                let mut patch = [[[0f32; LANES]; A]; A];
                for (l, tile) in tiles[t0..t0 + lanes].iter().enumerate() {
                    for (a, row) in patch.iter_mut().enumerate() {
                        let iy = tile.ry as isize + d * ((tile.ty * M + a) as isize - 1);
                        if iy < 0 || iy >= g.h as isize {
                            continue;
                        }
                        let line = &plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                        let first = tile.rx as isize + d * (tile.tx * M) as isize - d;
                        if first >= 0 && first + d * (A as isize - 1) < g.w as isize {
                            // An interior tile: all six columns inside, no check per element.
                            let first = first as usize;
                            for (b, p) in row.iter_mut().enumerate() {
                                p[l] = line[first + b * d as usize];
                            }
                        } else {
                            for (b, p) in row.iter_mut().enumerate() {
                                let ix = first + d * b as isize;
                                if ix >= 0 && ix < g.w as isize {
                                    p[l] = line[ix as usize];
                                }
                            }
                        }
                    }
                }
                let transformed = right(&left(&BT, &patch), &BT);
                for (i, row) in transformed.iter().enumerate() {
                    for (j, lanes_v) in row.iter().enumerate() {
                        let at = (i * A + j) * t + t0;
                        vc[at..at + lanes].copy_from_slice(&lanes_v[..lanes]);
                    }
                }
            }
        });
}

/// `U[co][ξ][c] = (G·g·Gᵀ)[ξ]` for channels `channels` of every output channel, `LANES` channels at a time.
fn transform_weights(g: &ConvGeometry, weight: &[f32], channels: std::ops::Range<usize>, u: &mut Vec<f32>) {
    let cc = channels.len();
    // Every element is written below.
    at_least(u, g.cout * A2 * cc)
        .par_chunks_mut(A2 * cc)
        .enumerate()
        .for_each(|(co, uc)| {
            for c0 in (0..cc).step_by(LANES) {
                let lanes = (cc - c0).min(LANES);
                let mut k = [[[0f32; LANES]; 3]; 3];
                for l in 0..lanes {
                    let c = channels.start + c0 + l;
                    let w = &weight[(co * g.cin + c) * 9..(co * g.cin + c + 1) * 9];
                    for (a, row) in k.iter_mut().enumerate() {
                        for (b, v) in row.iter_mut().enumerate() {
                            v[l] = w[a * 3 + b];
                        }
                    }
                }
                let transformed = right(&left(&G, &k), &G);
                for (r, row) in transformed.iter().enumerate() {
                    for (s, lanes_v) in row.iter().enumerate() {
                        let at = (r * A + s) * cc + c0;
                        uc[at..at + lanes].copy_from_slice(&lanes_v[..lanes]);
                    }
                }
            }
        });
}

/// `out[co] += Aᵀ·M·A` of every tile, cropped to the output, `LANES` tiles at a time.
fn transform_outputs(g: &ConvGeometry, tiles: &[Tile], m: &[f32], out: &mut [f32]) {
    let t = tiles.len();
    let d = g.dilation;
    out.par_chunks_mut(g.oh * g.ow).enumerate().for_each(|(co, o)| {
        let mc = &m[co * A2 * t..(co + 1) * A2 * t];
        for t0 in (0..t).step_by(LANES) {
            let lanes = (t - t0).min(LANES);
            let mut mt = [[[0f32; LANES]; A]; A];
            for (a, row) in mt.iter_mut().enumerate() {
                for (b, v) in row.iter_mut().enumerate() {
                    let at = (a * A + b) * t + t0;
                    v[..lanes].copy_from_slice(&mc[at..at + lanes]);
                }
            }
            let y = right(&left(&AT, &mt), &AT);
            for (l, tile) in tiles[t0..t0 + lanes].iter().enumerate() {
                for (i, row) in y.iter().enumerate() {
                    let oy = tile.ry + d * (tile.ty * M + i);
                    if oy >= g.oh {
                        break;
                    }
                    for (j, v) in row.iter().enumerate() {
                        let ox = tile.rx + d * (tile.tx * M + j);
                        if ox >= g.ow {
                            break;
                        }
                        o[oy * g.ow + ox] += v[l];
                    }
                }
            }
        }
    });
}

//! Winograd F(m×m, 3×3) for the CPU inference convolution: a 3×3 stride-1 convolution computes each m×m output
//! tile from an (m+2)×(m+2) input tile with (m+2)² multiplications per (input, output) channel pair instead of 9m²
//! (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016). m is 4 where the map allows (a quarter
//! of the multiply-accumulates), 3 on sub-images too small for 4×4 tiles. (F(2×2, 3×3) never has fewer
//! multiplications than both: where it would, on 2-pixel sub-images, skipping the padded taps does as well.)
//!
//! Dilated convolutions (ResNet's layer3/layer4 at output stride 8, dilation 2 and 4, and ASPP's 12) run on
//! polyphase sub-grids: output pixels whose row and column have the same residues modulo the dilation read only
//! input pixels with those residues, so each residue pair is an ordinary 3×3 convolution on a sub-image, and all
//! sub-images' tiles go through the same products. ASPP's sub-images are 5–6 pixels at dilation 12 on a 64×64 map:
//! 4×4 tiles would be mostly padding there, 3×3 ones are not (F(3×3, 3×3) needs 39% of the direct products, where
//! skipping the padded taps leaves 59%; DeepLabV3-ResNet-50 at 512² on 2 Zen 4 threads: 160 → 125 ms).
//!
//! Per chunk of input channels: the input tiles are transformed (`V = Bᵀ·d·B`), the weights too (`U = G·g·Gᵀ`,
//! recomputed on each call rather than kept, so the model's memory does not grow), then (m+2)² products
//! `M[ξ] += U[ξ] · V[ξ]` (`[Cout, Cin] · [Cin, tiles]`) run on the gemm crate, and at the end each tile's `Aᵀ·M·A`
//! is added onto the output, which already holds the bias and residual. The transforms run compiled for AVX-512
//! where the CPU has it (checked at run time), on whole vectors of channels or tiles.

use rayon::prelude::*;

use gemm::Parallelism;

use super::conv_cpu::{at_least, gemm_strided, ConvGeometry};

/// The matrices of F(M×M, 3×3) with `A = M + 2`: input transform `Bᵀ` (A×A), weight transform `G` (A×3), output
/// transform `Aᵀ` (M×A). Derived by Toom-Cook at the interpolation points listed (and ∞), the fractions in `G`.
/// Constants of a type rather than values, so each transform compiles with its matrix folded in (zeros skipped,
/// ±1 without a multiplication).
trait Transforms<const M: usize, const A: usize> {
    const BT: [[f32; A]; A];
    const G: [[f32; 3]; A];
    const AT: [[f32; A]; M];
}

/// F(3×3, 3×3), points 0, ±1, 2.
#[rustfmt::skip]
struct F3;

#[rustfmt::skip]
impl Transforms<3, 5> for F3 {
    const BT: [[f32; 5]; 5] = [
        [2.0, -1.0, -2.0,  1.0, 0.0],
        [0.0, -2.0, -1.0,  1.0, 0.0],
        [0.0,  2.0, -3.0,  1.0, 0.0],
        [0.0, -1.0,  0.0,  1.0, 0.0],
        [0.0,  2.0, -1.0, -2.0, 1.0],
    ];
    const G: [[f32; 3]; 5] = [
        [ 1.0 / 2.0,  0.0,        0.0      ],
        [-1.0 / 2.0, -1.0 / 2.0, -1.0 / 2.0],
        [-1.0 / 6.0,  1.0 / 6.0, -1.0 / 6.0],
        [ 1.0 / 6.0,  1.0 / 3.0,  2.0 / 3.0],
        [ 0.0,        0.0,        1.0      ],
    ];
    const AT: [[f32; 5]; 3] = [
        [1.0, 1.0,  1.0, 1.0, 0.0],
        [0.0, 1.0, -1.0, 2.0, 0.0],
        [0.0, 1.0,  1.0, 4.0, 1.0],
    ];
}

/// F(4×4, 3×3), points 0, ±1, ±2.
#[rustfmt::skip]
struct F4;

#[rustfmt::skip]
impl Transforms<4, 6> for F4 {
    const BT: [[f32; 6]; 6] = [
        [4.0,  0.0, -5.0,  0.0, 1.0, 0.0],
        [0.0, -4.0, -4.0,  1.0, 1.0, 0.0],
        [0.0,  4.0, -4.0, -1.0, 1.0, 0.0],
        [0.0, -2.0, -1.0,  2.0, 1.0, 0.0],
        [0.0,  2.0, -1.0, -2.0, 1.0, 0.0],
        [0.0,  4.0,  0.0, -5.0, 0.0, 1.0],
    ];
    const G: [[f32; 3]; 6] = [
        [ 1.0 / 4.0,   0.0,         0.0      ],
        [-1.0 / 6.0,  -1.0 / 6.0,  -1.0 / 6.0],
        [-1.0 / 6.0,   1.0 / 6.0,  -1.0 / 6.0],
        [ 1.0 / 24.0,  1.0 / 12.0,  1.0 / 6.0],
        [ 1.0 / 24.0, -1.0 / 12.0,  1.0 / 6.0],
        [ 0.0,         0.0,         1.0      ],
    ];
    const AT: [[f32; 6]; 4] = [
        [1.0, 1.0,  1.0, 1.0,  1.0, 0.0],
        [0.0, 1.0, -1.0, 2.0, -2.0, 0.0],
        [0.0, 1.0,  1.0, 4.0,  4.0, 0.0],
        [0.0, 1.0, -1.0, 8.0, -8.0, 1.0],
    ];
}

/// Transformed inputs per chunk, in floats (16 MiB).
const INPUT_BUDGET: usize = 4 << 20;

/// An output tile side this module computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TileSize {
    F3,
    F4,
}

impl TileSize {
    /// Output tile side m.
    fn m(self) -> usize {
        match self {
            TileSize::F3 => 3,
            TileSize::F4 => 4,
        }
    }

    /// Products per tile and channel pair, (m + 2)².
    fn products(self) -> usize {
        (self.m() + 2).pow(2)
    }
}

/// One tile: the residues of its sub-grid and its position there, in tiles.
#[derive(Clone, Copy, Debug)]
struct Tile {
    ry: usize,
    rx: usize,
    ty: usize,
    tx: usize,
}

/// Every m×m output tile of every residue sub-grid.
fn tiles(g: &ConvGeometry, m: usize) -> Vec<Tile> {
    let d = g.dilation;
    let mut tiles = Vec::new();
    for ry in 0..d.min(g.oh) {
        let sh = (g.oh - ry).div_ceil(d);
        for rx in 0..d.min(g.ow) {
            let sw = (g.ow - rx).div_ceil(d);
            for ty in 0..sh.div_ceil(m) {
                for tx in 0..sw.div_ceil(m) {
                    tiles.push(Tile { ry, rx, ty, tx });
                }
            }
        }
    }
    tiles
}

/// The tile size this convolution runs with here, if any: 3×3, stride 1, "same" padding (the polyphase split needs
/// padding = dilation), and the tiles' multiplications well under the direct convolution's `direct_macs` (per
/// channel pair, padded taps skipped). Of the sizes that pay, the one with the fewest multiplications; ties go to
/// the larger tile (fewer, larger products).
pub(crate) fn choose(g: &ConvGeometry, direct_macs: usize) -> Option<TileSize> {
    if !(g.k == 3 && g.stride == 1 && g.padding == g.dilation && g.cin >= 16) {
        return None;
    }
    [TileSize::F4, TileSize::F3]
        .into_iter()
        .map(|size| (size, tiles(g, size.m()).len() * size.products()))
        // The transforms cost up to half the products' time on top (ASPP's 2048 → 256 channels at dilation 12:
        // 36 ms beside 86), and the products run a little below the direct ones' rate.
        .filter(|&(_, macs)| (macs as f64) * 1.5 < direct_macs as f64 * 0.9)
        .min_by_key(|&(_, macs)| macs)
        .map(|(size, _)| size)
}

/// Buffers reused across calls.
#[derive(Default)]
pub(crate) struct Buffers {
    interleaved: Vec<Lanes>,
    input: Vec<f32>,
    weight: Vec<f32>,
    product: Vec<f32>,
}

/// Adds the convolution of `x` `[Cin, H, W]` by `weight` `[Cout, Cin, 3, 3]` onto `out` `[Cout, oh, ow]`, with
/// `size`'s tiles (from [`choose`]).
pub(crate) fn conv2d_add(
    g: &ConvGeometry,
    size: TileSize,
    x: &[f32],
    weight: &[f32],
    out: &mut [f32],
    buffers: &mut Buffers,
) {
    match size {
        TileSize::F3 => conv2d_add_with::<3, 5, F3>(g, x, weight, out, buffers),
        TileSize::F4 => conv2d_add_with::<4, 6, F4>(g, x, weight, out, buffers),
    }
}

fn conv2d_add_with<const M: usize, const A: usize, F: Transforms<M, A>>(
    g: &ConvGeometry,
    x: &[f32],
    weight: &[f32],
    out: &mut [f32],
    buffers: &mut Buffers,
) {
    let a2 = A * A;
    let tiles = tiles(g, M);
    let t = tiles.len();
    // A whole number of lane groups, so only the last chunk has a partial one.
    let chunk = (INPUT_BUDGET / (a2 * t) / LANES * LANES).clamp(LANES, g.cin);
    // M[co][ξ][tile]
    // Not cleared: the first chunk's products overwrite it.
    at_least(&mut buffers.product, g.cout * a2 * t);
    for c0 in (0..g.cin).step_by(chunk) {
        let cc = (c0 + chunk).min(g.cin) - c0;
        transform_inputs::<M, A, F>(
            g,
            &tiles,
            x,
            c0..c0 + cc,
            &mut buffers.interleaved,
            aligned(&mut buffers.input, A * A * v_stride(t, cc)),
        );
        transform_weights::<M, A, F>(g, weight, c0..c0 + cc, &mut buffers.weight);
        let (u, v) = (&buffers.weight, aligned(&mut buffers.input, A * A * v_stride(t, cc)));
        // The A² products are independent and small (`[Cout, cc] · [cc, tiles]`): one single-threaded gemm per
        // task, rather than each product split across the threads with a wait after each.
        let m = buffers.product[..g.cout * a2 * t].as_mut_ptr() as usize;
        (0..a2).into_par_iter().for_each(|xi| {
            // SAFETY: M[co][ξ][·] rows are A²·t apart (length t); U[co][ξ][·] rows A²·cc apart (length cc);
            // V[ξ] is [t, cc] (the product's rhs column-major); all offsets by ξ stay inside their buffers, and
            // tasks write disjoint elements of M (their own ξ).
            unsafe {
                gemm_strided(
                    (g.cout, t, cc),
                    ((m as *mut f32).add(xi * t), a2 * t, 1),
                    (u[xi * cc..].as_ptr(), a2 * cc, 1),
                    (v[xi * v_stride(t, cc)..].as_ptr(), 1, cc),
                    c0 > 0,
                    Parallelism::None,
                )
            };
        });
    }
    transform_outputs::<M, A, F>(g, &tiles, &buffers.product[..g.cout * a2 * t], out);
}
/// Tiles (or channels) transformed together, one per SIMD lane: the loops over lanes vectorise.
const LANES: usize = 16;

type Lanes = [f32; LANES];

/// `dst[..n] = src[..n]`: one vector copy for a full group (a `copy_from_slice` of a run-time length is a call to
/// `memmove`, which cost more than the transform itself).
#[inline(always)]
fn copy_lanes(dst: &mut [f32], src: &[f32], n: usize) {
    if n == LANES {
        let dst: &mut Lanes = (&mut dst[..LANES]).try_into().unwrap();
        *dst = src[..LANES].try_into().unwrap();
    } else {
        dst[..n].copy_from_slice(&src[..n]);
    }
}

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

/// Padded polyphase sub-images, channel-interleaved: sub-image pixel (p, q) of a residue pair at
/// `(p + 1)·bw + q + 1`, one vector of `LANES` channels each. Every tile's patch is then A² vector loads at a fixed
/// stride, with no check per element (ASPP's 5–6 pixel sub-images are all border).
struct PaddedSubImages {
    d: usize,
    bw: usize,
}

impl PaddedSubImages {
    fn new(g: &ConvGeometry, m: usize) -> Self {
        // The first residue has the most columns, and the most tiles.
        Self {
            d: g.dilation,
            bw: g.ow.div_ceil(g.dilation).div_ceil(m) * m + 2,
        }
    }

    /// Writes padded rows `rows` of residue (`ry`, `rx`) of `image` (one lane group of the chunk, channel-
    /// interleaved: `[H, W]` vectors, H = oh and W = ow as the padding is "same") into `buf` (`rows.len()` rows of
    /// `bw`), zeros around.
    fn fill(
        &self,
        g: &ConvGeometry,
        image: &[Lanes],
        (ry, rx): (usize, usize),
        rows: std::ops::Range<usize>,
        buf: &mut [Lanes],
    ) {
        let d = self.d;
        let (sh, sw) = ((g.h - ry).div_ceil(d), (g.w - rx).div_ceil(d));
        for (r, padded) in rows.enumerate() {
            let row = &mut buf[r * self.bw..(r + 1) * self.bw];
            // Padded row r holds sub-image row r − 1.
            let Some(py) = padded.checked_sub(1).filter(|&py| py < sh) else {
                row.fill([0.0; LANES]);
                continue;
            };
            let line = &image[(ry + d * py) * g.w..(ry + d * py + 1) * g.w];
            row[0] = [0.0; LANES];
            for (px, v) in row[1..=sw].iter_mut().enumerate() {
                *v = line[rx + d * px];
            }
            row[sw + 1..].fill([0.0; LANES]);
        }
    }
}

/// `out[p][l] = x[l][p]` for each of `groups` groups of `LANES` planes of `x` (`[C, hw]`, zeros past its last
/// plane) into `out` (`[groups][hw]` vectors): the channel-interleaved copy the input transform reads whole
/// vectors from. 16×16 blocks transposed in registers where the CPU has AVX-512.
fn interleave(x: &[f32], hw: usize, out: &mut [Lanes]) {
    let planes = x.len() / hw;
    out.par_chunks_mut(hw).enumerate().for_each(|(group, out)| {
        let c0 = group * LANES;
        let lanes = (planes - c0).min(LANES);
        let x = &x[c0 * hw..(c0 + lanes) * hw];
        #[cfg(target_arch = "x86_64")]
        if lanes == LANES && avx512() {
            // SAFETY: the CPU has AVX-512F; `x` holds LANES planes of hw floats and `out` hw vectors.
            unsafe { x86::interleave_16(x, hw, out) };
            return;
        }
        interleave_scalar(x, hw, lanes, out, 0);
    });
}

/// `out[p][l] = x[l·hw + p]` for pixels `from..hw`, zeros in lanes `lanes..`.
fn interleave_scalar(x: &[f32], hw: usize, lanes: usize, out: &mut [Lanes], from: usize) {
    for (p, v) in out.iter_mut().enumerate().skip(from) {
        for (l, e) in v.iter_mut().enumerate() {
            *e = if l < lanes { x[l * hw + p] } else { 0.0 };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{interleave_scalar, Lanes, LANES};

    /// [`super::interleave`] of one full group: 16 pixels of the 16 planes at a time, transposed in registers.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `x` must hold 16 planes of `hw` floats and `out` `hw` vectors.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn interleave_16(x: &[f32], hw: usize, out: &mut [Lanes]) {
        assert!(x.len() >= LANES * hw && out.len() >= hw);
        let full = hw / LANES * LANES;
        for p0 in (0..full).step_by(LANES) {
            // SAFETY: rows l·hw + p0 .. + 16 and out[p0 .. p0 + 16] are inside the slices (asserted above).
            unsafe {
                let mut r = [_mm512_setzero_ps(); LANES];
                for (l, r) in r.iter_mut().enumerate() {
                    *r = _mm512_loadu_ps(x.as_ptr().add(l * hw + p0));
                }
                let t = transpose_16(r);
                for (i, t) in t.iter().enumerate() {
                    _mm512_storeu_ps(out.as_mut_ptr().add(p0 + i) as *mut f32, *t);
                }
            }
        }
        interleave_scalar(x, hw, LANES, out, full);
    }

    /// The transpose of a 16×16 block of floats held as 16 rows: interleaving 32-bit, then 64-bit elements
    /// within each 128-bit lane, then two rounds of 128-bit lane shuffles.
    #[target_feature(enable = "avx512f")]
    pub(super) fn transpose_16(r: [__m512; 16]) -> [__m512; 16] {
        // t[2i] lane k: [r2i[4k], r2i+1[4k], r2i[4k+1], r2i+1[4k+1]]; t[2i+1] the same at 4k+2, 4k+3.
        let mut t = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        // u[4j + q] lane k: column 4k + q of rows 4j .. 4j + 4.
        let mut u = [_mm512_setzero_ps(); 16];
        for j in 0..4 {
            let (t0, t1, t2, t3) = (t[4 * j], t[4 * j + 1], t[4 * j + 2], t[4 * j + 3]);
            u[4 * j] = _mm512_shuffle_ps::<0x44>(t0, t2);
            u[4 * j + 1] = _mm512_shuffle_ps::<0xEE>(t0, t2);
            u[4 * j + 2] = _mm512_shuffle_ps::<0x44>(t1, t3);
            u[4 * j + 3] = _mm512_shuffle_ps::<0xEE>(t1, t3);
        }
        // v[8h + q] (q < 4): columns q and q + 8 of rows 8h .. 8h + 8; v[8h + 4 + q]: columns q + 4 and q + 12.
        let mut v = [_mm512_setzero_ps(); 16];
        for h in 0..2 {
            for q in 0..4 {
                let (a, b) = (u[8 * h + q], u[8 * h + 4 + q]);
                v[8 * h + q] = _mm512_shuffle_f32x4::<0x88>(a, b);
                v[8 * h + 4 + q] = _mm512_shuffle_f32x4::<0xDD>(a, b);
            }
        }
        // Column c < 8 from v[c] and v[8 + c] (lanes 0, 2); column c + 8 from the same (lanes 1, 3).
        let mut out = [_mm512_setzero_ps(); 16];
        for c in 0..8 {
            out[c] = _mm512_shuffle_f32x4::<0x88>(v[c], v[8 + c]);
            out[c + 8] = _mm512_shuffle_f32x4::<0xDD>(v[c], v[8 + c]);
        }
        out
    }
}

/// Floats from V[ξ] to V[ξ + 1] (`[tiles, cc]` each): one cache line more than the matrix, so the A² rows a tile
/// writes are not a multiple of 4 KiB apart (they would all fall in one set of the L1 cache, which evicted each
/// line before it was full).
fn v_stride(t: usize, cc: usize) -> usize {
    t * cc + LANES
}

/// The first `n` floats of `buf` from a 64-byte boundary on (grown as needed), so each vector store of the
/// input transform fills one cache line rather than straddling two.
fn aligned(buf: &mut Vec<f32>, n: usize) -> &mut [f32] {
    let buf = at_least(buf, n + LANES);
    let skip = buf.as_ptr().align_offset(64).min(LANES);
    &mut buf[skip..skip + n]
}

/// Most tiles in one input-transform task: a band of whole tile rows of one residue pair, so that its padded
/// sub-image rows (all channels of the chunk) and its slice of V stay in the core's cache.
const BAND_TILES: usize = 32;

/// The tile list cut into bands: runs of whole tile rows of one residue pair, at most `BAND_TILES` tiles where a
/// row allows.
fn bands(tiles: &[Tile]) -> Vec<std::ops::Range<usize>> {
    let mut bands = Vec::new();
    let mut start = 0;
    for (i, tile) in tiles.iter().enumerate() {
        let next = tiles.get(i + 1);
        let residue_ends = next.is_none_or(|n| (n.ry, n.rx) != (tile.ry, tile.rx));
        let row_ends = next.is_none_or(|n| n.ty != tile.ty) || residue_ends;
        let full = i + 1 - start >= BAND_TILES;
        if residue_ends || (row_ends && full) {
            bands.push(start..i + 1);
            start = i + 1;
        }
    }
    bands
}

/// Whether the transforms run compiled for AVX-512: the binary's baseline is SSE2, where their lane loops take 4
/// floats per instruction instead of 16 (ASPP's input transform: 27 ms against the products' 82 at dilation 12).
fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Defines `$name`, which runs `$body` (a function marked `#[inline(always)]`) compiled for AVX-512F when the CPU
/// has it and for the baseline otherwise, with the same generic parameters and arguments.
macro_rules! simd_dispatch {
    ($name:ident, $avx512:ident, $body:ident, ($($arg:ident: $ty:ty),*)) => {
        fn $name<const M: usize, const A: usize, F: Transforms<M, A>>($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            if avx512() {
                // SAFETY: the CPU has AVX-512F; `$body`'s own contract is the caller's.
                #[allow(unused_unsafe)]
                return unsafe { $avx512::<M, A, F>($($arg),*) };
            }
            #[allow(unused_unsafe)]
            unsafe { $body::<M, A, F>($($arg),*) }
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f")]
        unsafe fn $avx512<const M: usize, const A: usize, F: Transforms<M, A>>($($arg: $ty),*) {
            #[allow(unused_unsafe)]
            unsafe { $body::<M, A, F>($($arg),*) }
        }
    };
}

/// `V[ξ][tile][c] = (Bᵀ·d·B)[ξ]` for the A×A input patch `d` of every tile, channels `channels` (`c` counted
/// from its start). Each task takes a band of tiles: it copies their rows of all the chunk's channels into
/// channel-interleaved sub-images, then transforms `LANES` channels at a time, so the loads and stores are whole
/// vectors and each task writes its own rows of V, whole.
fn transform_inputs<const M: usize, const A: usize, F: Transforms<M, A>>(
    g: &ConvGeometry,
    tiles: &[Tile],
    x: &[f32],
    channels: std::ops::Range<usize>,
    interleaved: &mut Vec<Lanes>,
    v: &mut [f32],
) {
    let (t, cc) = (tiles.len(), channels.len());
    let sub = PaddedSubImages::new(g, M);
    let groups = cc.div_ceil(LANES);
    let hw = g.h * g.w;
    if interleaved.len() < groups * hw {
        interleaved.resize(groups * hw, [0.0; LANES]);
    }
    let interleaved = &mut interleaved[..groups * hw];
    interleave(&x[channels.start * hw..channels.end * hw], hw, interleaved);
    let interleaved = &*interleaved;
    // Every element is written below.
    assert_eq!(v.len(), A * A * v_stride(t, cc));
    let v = v.as_mut_ptr() as usize;
    bands(tiles)
        .into_par_iter()
        .for_each_init(Vec::new, |buf: &mut Vec<Lanes>, range| {
            let band = &tiles[range.clone()];
            let (first, last) = (band[0], band[band.len() - 1]);
            // Padded rows ty·M .. (ty + 1)·M + 2 of each tile row.
            let rows = first.ty * M..(last.ty + 1) * M + 2;
            let per_group = rows.len() * sub.bw;
            buf.resize(groups * per_group, [0.0; LANES]);
            for (gbuf, image) in buf.chunks_mut(per_group).zip(interleaved.chunks(hw)) {
                sub.fill(g, image, (first.ry, first.rx), rows.clone(), gbuf);
            }
            // SAFETY: V holds A²·t·cc floats; this task writes rows V[ξ][range][·], which no other task does.
            unsafe {
                input_tiles::<M, A, F>(
                    &sub,
                    band,
                    (buf.as_slice(), per_group, rows.start),
                    (v as *mut f32).add(range.start * cc),
                    (t, cc),
                )
            };
        });
}

simd_dispatch!(input_tiles, input_tiles_avx512, input_tiles_body, (sub: &PaddedSubImages, band: &[Tile], bufs: (&[Lanes], usize, usize), v: *mut f32, dims: (usize, usize)));

/// `V[ξ][tile][·]` for a band of tiles from their padded sub-image rows `bufs` (the buffer, its length per lane
/// group, the first padded row it holds); `v` points at V[0][the band's first tile][0], `dims` = (all tiles,
/// channels in the chunk).
///
/// # Safety
/// `v` must cover the band's rows of V, for every ξ.
#[inline(always)]
unsafe fn input_tiles_body<const M: usize, const A: usize, F: Transforms<M, A>>(
    sub: &PaddedSubImages,
    band: &[Tile],
    (buf, per_group, first_row): (&[Lanes], usize, usize),
    v: *mut f32,
    (t, cc): (usize, usize),
) {
    let mut patch = [[[0f32; LANES]; A]; A];
    for (i, tile) in band.iter().enumerate() {
        let start = (tile.ty * M - first_row) * sub.bw + tile.tx * M;
        for (group, gbuf) in buf.chunks(per_group).enumerate() {
            for (a, row) in patch.iter_mut().enumerate() {
                row.copy_from_slice(&gbuf[start + a * sub.bw..start + a * sub.bw + A]);
            }
            let transformed = right(&left(&F::BT, &patch), &F::BT);
            let lanes = (cc - group * LANES).min(LANES);
            for (xi, lanes_v) in transformed.iter().flatten().enumerate() {
                // SAFETY (the caller's): V[ξ][tile i][group's lanes] is inside the band's rows.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(v.add(xi * v_stride(t, cc) + i * cc + group * LANES), lanes)
                };
                copy_lanes(dst, lanes_v, lanes);
            }
        }
    }
}

/// `U[co][ξ][c] = (G·g·Gᵀ)[ξ]` for channels `channels` of every output channel, `LANES` channels at a time.
fn transform_weights<const M: usize, const A: usize, F: Transforms<M, A>>(
    g: &ConvGeometry,
    weight: &[f32],
    channels: std::ops::Range<usize>,
    u: &mut Vec<f32>,
) {
    let cc = channels.len();
    // Every element is written below.
    at_least(u, g.cout * A * A * cc)
        .par_chunks_mut(A * A * cc)
        .enumerate()
        .for_each(|(co, uc)| {
            let w = &weight[co * g.cin * 9..(co + 1) * g.cin * 9];
            weight_row::<M, A, F>(&w[channels.start * 9..channels.end * 9], uc);
        });
}

simd_dispatch!(weight_row, weight_row_avx512, weight_row_body, (w: &[f32], uc: &mut [f32]));

/// One output channel's `U[ξ][c]` from its weights `w` `[cc, 3, 3]`.
#[inline(always)]
fn weight_row_body<const M: usize, const A: usize, F: Transforms<M, A>>(w: &[f32], uc: &mut [f32]) {
    let cc = w.len() / 9;
    // Lanes past the last channel hold stale values, never stored.
    let mut k = [[[0f32; LANES]; 3]; 3];
    for c0 in (0..cc).step_by(LANES) {
        let lanes = (cc - c0).min(LANES);
        for l in 0..lanes {
            let wc = &w[(c0 + l) * 9..(c0 + l + 1) * 9];
            for (a, row) in k.iter_mut().enumerate() {
                for (b, v) in row.iter_mut().enumerate() {
                    v[l] = wc[a * 3 + b];
                }
            }
        }
        let transformed = right(&left(&F::G, &k), &F::G);
        for (r, row) in transformed.iter().enumerate() {
            for (s, lanes_v) in row.iter().enumerate() {
                let at = (r * A + s) * cc + c0;
                copy_lanes(&mut uc[at..], lanes_v, lanes);
            }
        }
    }
}

/// `out[co] += Aᵀ·M·A` of every tile, cropped to the output, `LANES` tiles at a time.
fn transform_outputs<const M: usize, const A: usize, F: Transforms<M, A>>(
    g: &ConvGeometry,
    tiles: &[Tile],
    m: &[f32],
    out: &mut [f32],
) {
    let t = tiles.len();
    out.par_chunks_mut(g.oh * g.ow).enumerate().for_each(|(co, o)| {
        output_channel::<M, A, F>(g, tiles, &m[co * A * A * t..(co + 1) * A * A * t], o);
    });
}

simd_dispatch!(output_channel, output_channel_avx512, output_channel_body, (g: &ConvGeometry, tiles: &[Tile], mc: &[f32], o: &mut [f32]));

/// One output channel: `o` `[oh, ow]` += its tiles' `Aᵀ·M·A` from `mc` `[ξ][tile]`.
#[inline(always)]
fn output_channel_body<const M: usize, const A: usize, F: Transforms<M, A>>(
    g: &ConvGeometry,
    tiles: &[Tile],
    mc: &[f32],
    o: &mut [f32],
) {
    let t = tiles.len();
    let d = g.dilation;
    // Lanes past the last tile hold stale values, never stored.
    let mut mt = [[[0f32; LANES]; A]; A];
    for t0 in (0..t).step_by(LANES) {
        let lanes = (t - t0).min(LANES);
        for (a, row) in mt.iter_mut().enumerate() {
            for (b, v) in row.iter_mut().enumerate() {
                let at = (a * A + b) * t + t0;
                copy_lanes(v, &mc[at..], lanes);
            }
        }
        let y = right(&left(&F::AT, &mt), &F::AT);
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The channel-interleaved copy holds every plane's pixel in its lane, zeros past the last plane, for full
    /// groups (the AVX-512 transposes where the CPU has them), a partial one, and a pixel count that leaves a tail.
    #[test]
    fn interleave_transposes_planes_into_lanes() {
        for (planes, hw) in [(16usize, 64usize), (40, 37), (3, 5)] {
            let x: Vec<f32> = (0..planes * hw).map(|i| i as f32).collect();
            let groups = planes.div_ceil(LANES);
            let mut out = vec![[f32::NAN; LANES]; groups * hw];
            interleave(&x, hw, &mut out);
            for group in 0..groups {
                for p in 0..hw {
                    for l in 0..LANES {
                        let c = group * LANES + l;
                        let want = if c < planes { x[c * hw + p] } else { 0.0 };
                        assert_eq!(
                            out[group * hw + p][l],
                            want,
                            "planes {planes}, hw {hw}: channel {c}, pixel {p}"
                        );
                    }
                }
            }
        }
    }
}

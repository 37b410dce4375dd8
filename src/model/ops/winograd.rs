//! Winograd minimal filtering for the CPU convolution's 3×3 stride-1 "same" convolutions: F(m×m, 3×3) computes
//! each m×m output tile from an (m+2)×(m+2) input tile with (m+2)² multiplications per (input, output) channel
//! pair instead of 9m² (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016). m is 6 (64
//! products for 36 outputs, a fifth of the direct multiply-accumulates), 4 (a quarter) or 3, whichever multiplies
//! least over the map's length with its last tile partly padding. F(6, 3) took the 3×3 convs on whole 64×64 and
//! 128×128 maps and ASPP's dilation 12: DeepLabV3-ResNet-50 at 512² on 2 Zen 4 threads 1172 → 1130 ms, FCN 1020
//! → 961, PSPNet 1166 → 1131 (means of 3 alternating rounds).
//!
//! Dilated convolutions (ResNet's layer3/layer4 at output stride 8, dilation 2 and 4, and ASPP's 12, 24, 36) run
//! on polyphase sub-grids: output pixels whose row and column have the same residues modulo the dilation read
//! only input pixels with those residues, so each residue pair is an ordinary 3×3 convolution on a sub-image.
//! ASPP's sub-images on a 64×64 map are small: 5–6 pixels a side at dilation 12, 2–3 at 24, 1–2 at 36. So each
//! dimension of each sub-image takes the algorithm with the fewest multiplications for its length: F(6, 3), F(4, 3),
//! F(3, 3), or, for a whole sub-image of 2 or 1 pixels between zero padding, a 3-multiplication 2×2 Toeplitz
//! product or the centre tap alone. Tiles with the same pair of algorithms form a class; each class is its own
//! set of products. DeepLabV3-ResNet-50 at 512² on 2 Zen 4 threads: ASPP's three convs 368 → 279 ms (the
//! direct ones skipped padded taps already).
//!
//! Per chunk of input channels (interleaved once into vectors of 16 channels; at ASPP's dilations 24 and 36, whose
//! tiles are whole sub-images, read from the planes directly instead: [`by_tile`]), per class: the input tiles are
//! transformed (`V = Bᵀ·d·B`), the weights too (`U = G·g·Gᵀ`, recomputed on each call, except for an inference
//! model's folded convolutions, which keep theirs: [`KeptWeights`]), then one product `M[ξ] += U[ξ] · V[ξ]`
//! (`[Cout, Cin] · [Cin, tiles]`) per pair of the algorithms' multiplications runs on the gemm crate; at the end
//! each tile's `Aᵀ·M·A` is added onto the output, which already holds the bias and residual. The transforms run
//! compiled for AVX-512 where the CPU has it (checked at run time), on whole vectors of channels or tiles.

use rayon::prelude::*;

use gemm::Parallelism;

use super::conv_cpu::{at_least, gemm_strided, ConvGeometry};

/// The widest tile an algorithm here reads or multiplies (F(6, 3): 8 inputs, 8 products).
const CAP: usize = 8;

/// A 1-D minimal filtering algorithm for 3 taps: `M` outputs from `A = M + 2` inputs with `R` multiplications,
/// `y = Aᵀ·[(G·w) ⊙ (Bᵀ·x)]`. A tile is one along rows times one along columns: `R_rows·R_cols` products per
/// (input, output) channel pair. The matrices (`Bᵀ` R×A, `G` R×3, `Aᵀ` M×R) are padded with zeros to CAP×CAP so
/// one array type fits all; the loops stop at `M`, `A`, `R`, constants of the type, so each transform compiles to
/// its exact size with the zeros skipped and ±1 without a multiplication.
trait Algorithm {
    const M: usize;
    const A: usize;
    const R: usize;
    const BT: [[f32; CAP]; CAP];
    const G: [[f32; CAP]; CAP];
    const AT: [[f32; CAP]; CAP];
}

/// `m` padded with zeros to CAP×CAP.
const fn pad<const R: usize, const C: usize>(m: [[f32; C]; R]) -> [[f32; CAP]; CAP] {
    let mut out = [[0.0; CAP]; CAP];
    let mut i = 0;
    while i < R {
        let mut j = 0;
        while j < C {
            out[i][j] = m[i][j];
            j += 1;
        }
        i += 1;
    }
    out
}

/// F(6, 3), Toom-Cook at 0, ±1, ±2, ±1/2 (and ∞): 8 multiplications for 6 outputs against F(4, 3)'s 6 for 4, at
/// a larger rounding error (the powers of 2 up to 32 in `Aᵀ`), still near 1e-5 of the result in f32.
struct F6;

#[rustfmt::skip]
impl Algorithm for F6 {
    const M: usize = 6;
    const A: usize = 8;
    const R: usize = 8;
    const BT: [[f32; CAP]; CAP] = pad([
        [1.0,  0.0, -21.0 / 4.0,  0.0,         21.0 / 4.0,  0.0,        -1.0, 0.0],
        [0.0,  1.0,  1.0,        -17.0 / 4.0, -17.0 / 4.0,  1.0,         1.0, 0.0],
        [0.0, -1.0,  1.0,         17.0 / 4.0, -17.0 / 4.0, -1.0,         1.0, 0.0],
        [0.0,  0.5,  0.25,       -2.5,        -1.25,        2.0,         1.0, 0.0],
        [0.0, -0.5,  0.25,        2.5,        -1.25,       -2.0,         1.0, 0.0],
        [0.0,  2.0,  4.0,        -2.5,        -5.0,         0.5,         1.0, 0.0],
        [0.0, -2.0,  4.0,         2.5,        -5.0,        -0.5,         1.0, 0.0],
        [0.0, -1.0,  0.0,         21.0 / 4.0,  0.0,        -21.0 / 4.0,  0.0, 1.0],
    ]);
    const G: [[f32; CAP]; CAP] = pad([
        [ 1.0,          0.0,          0.0        ],
        [-2.0 / 9.0,   -2.0 / 9.0,   -2.0 / 9.0  ],
        [-2.0 / 9.0,    2.0 / 9.0,   -2.0 / 9.0  ],
        [ 1.0 / 90.0,   1.0 / 45.0,   2.0 / 45.0 ],
        [ 1.0 / 90.0,  -1.0 / 45.0,   2.0 / 45.0 ],
        [ 32.0 / 45.0,  16.0 / 45.0,  8.0 / 45.0 ],
        [ 32.0 / 45.0, -16.0 / 45.0,  8.0 / 45.0 ],
        [ 0.0,          0.0,          1.0        ],
    ]);
    const AT: [[f32; CAP]; CAP] = pad([
        [1.0, 1.0,  1.0,  1.0,   1.0,  1.0,         1.0,         0.0],
        [0.0, 1.0, -1.0,  2.0,  -2.0,  0.5,        -0.5,         0.0],
        [0.0, 1.0,  1.0,  4.0,   4.0,  0.25,        0.25,        0.0],
        [0.0, 1.0, -1.0,  8.0,  -8.0,  0.125,      -0.125,       0.0],
        [0.0, 1.0,  1.0, 16.0,  16.0,  1.0 / 16.0,  1.0 / 16.0,  0.0],
        [0.0, 1.0, -1.0, 32.0, -32.0,  1.0 / 32.0, -1.0 / 32.0,  1.0],
    ]);
}

/// F(4, 3), Toom-Cook at 0, ±1, ±2 (and ∞), the fractions in `G`.
struct F4;

#[rustfmt::skip]
impl Algorithm for F4 {
    const M: usize = 4;
    const A: usize = 6;
    const R: usize = 6;
    const BT: [[f32; CAP]; CAP] = pad([
        [4.0,  0.0, -5.0,  0.0, 1.0, 0.0],
        [0.0, -4.0, -4.0,  1.0, 1.0, 0.0],
        [0.0,  4.0, -4.0, -1.0, 1.0, 0.0],
        [0.0, -2.0, -1.0,  2.0, 1.0, 0.0],
        [0.0,  2.0, -1.0, -2.0, 1.0, 0.0],
        [0.0,  4.0,  0.0, -5.0, 0.0, 1.0],
    ]);
    const G: [[f32; CAP]; CAP] = pad([
        [ 1.0 / 4.0,   0.0,         0.0      ],
        [-1.0 / 6.0,  -1.0 / 6.0,  -1.0 / 6.0],
        [-1.0 / 6.0,   1.0 / 6.0,  -1.0 / 6.0],
        [ 1.0 / 24.0,  1.0 / 12.0,  1.0 / 6.0],
        [ 1.0 / 24.0, -1.0 / 12.0,  1.0 / 6.0],
        [ 0.0,         0.0,         1.0      ],
    ]);
    const AT: [[f32; CAP]; CAP] = pad([
        [1.0, 1.0,  1.0, 1.0,  1.0, 0.0],
        [0.0, 1.0, -1.0, 2.0, -2.0, 0.0],
        [0.0, 1.0,  1.0, 4.0,  4.0, 0.0],
        [0.0, 1.0, -1.0, 8.0, -8.0, 1.0],
    ]);
}

/// F(3, 3), Toom-Cook at 0, ±1, 2 (and ∞).
struct F3;

#[rustfmt::skip]
impl Algorithm for F3 {
    const M: usize = 3;
    const A: usize = 5;
    const R: usize = 5;
    const BT: [[f32; CAP]; CAP] = pad([
        [2.0, -1.0, -2.0,  1.0, 0.0],
        [0.0, -2.0, -1.0,  1.0, 0.0],
        [0.0,  2.0, -3.0,  1.0, 0.0],
        [0.0, -1.0,  0.0,  1.0, 0.0],
        [0.0,  2.0, -1.0, -2.0, 1.0],
    ]);
    const G: [[f32; CAP]; CAP] = pad([
        [ 1.0 / 2.0,  0.0,        0.0      ],
        [-1.0 / 2.0, -1.0 / 2.0, -1.0 / 2.0],
        [-1.0 / 6.0,  1.0 / 6.0, -1.0 / 6.0],
        [ 1.0 / 6.0,  1.0 / 3.0,  2.0 / 3.0],
        [ 0.0,        0.0,        1.0      ],
    ]);
    const AT: [[f32; CAP]; CAP] = pad([
        [1.0, 1.0,  1.0, 1.0, 0.0],
        [0.0, 1.0, -1.0, 2.0, 0.0],
        [0.0, 1.0,  1.0, 4.0, 1.0],
    ]);
}

/// A whole sub-image of 2 pixels (ASPP's dilation 24 and 36 on a 64×64 map leave many): with zeros on both sides,
/// `y0 = w1·x0 + w2·x1`, `y1 = w0·x0 + w1·x1` is a 2×2 Toeplitz product, 3 multiplications instead of 4:
/// `m1 = w1·(x0 + x1)`, `m2 = (w2 − w1)·x1`, `m3 = (w0 − w1)·x0`, `y0 = m1 + m2`, `y1 = m1 + m3`. Valid only where
/// both inputs around the sub-image are padding, which the tiling guarantees (one tile, from the first pixel).
struct T2;

#[rustfmt::skip]
impl Algorithm for T2 {
    const M: usize = 2;
    const A: usize = 4;
    const R: usize = 3;
    const BT: [[f32; CAP]; CAP] = pad([
        [0.0, 1.0, 1.0, 0.0],
        [0.0, 0.0, 1.0, 0.0],
        [0.0, 1.0, 0.0, 0.0],
    ]);
    const G: [[f32; CAP]; CAP] = pad([
        [0.0,  1.0, 0.0],
        [0.0, -1.0, 1.0],
        [1.0, -1.0, 0.0],
    ]);
    const AT: [[f32; CAP]; CAP] = pad([
        [1.0, 1.0, 0.0],
        [1.0, 0.0, 1.0],
    ]);
}

/// A sub-image of 1 pixel: only the centre tap reads inside it, `y0 = w1·x0`.
struct T1;

#[rustfmt::skip]
impl Algorithm for T1 {
    const M: usize = 1;
    const A: usize = 3;
    const R: usize = 1;
    const BT: [[f32; CAP]; CAP] = pad([[0.0, 1.0, 0.0]]);
    const G: [[f32; CAP]; CAP] = pad([[0.0, 1.0, 0.0]]);
    const AT: [[f32; CAP]; CAP] = pad([[1.0]]);
}

/// `$f::<Y, X>(args)` for the class's pair of algorithms: each pair is its own compiled instance of the
/// transforms.
macro_rules! dispatch {
    ($class:expr, $f:ident($($arg:expr),*)) => {
        match ($class.rows, $class.cols) {
            (Kind::F6, Kind::F6) => $f::<F6, F6>($($arg),*),
            (Kind::F6, Kind::F4) => $f::<F6, F4>($($arg),*),
            (Kind::F6, Kind::F3) => $f::<F6, F3>($($arg),*),
            (Kind::F6, Kind::T2) => $f::<F6, T2>($($arg),*),
            (Kind::F6, Kind::T1) => $f::<F6, T1>($($arg),*),
            (Kind::F4, Kind::F6) => $f::<F4, F6>($($arg),*),
            (Kind::F4, Kind::F4) => $f::<F4, F4>($($arg),*),
            (Kind::F4, Kind::F3) => $f::<F4, F3>($($arg),*),
            (Kind::F4, Kind::T2) => $f::<F4, T2>($($arg),*),
            (Kind::F4, Kind::T1) => $f::<F4, T1>($($arg),*),
            (Kind::F3, Kind::F6) => $f::<F3, F6>($($arg),*),
            (Kind::F3, Kind::F4) => $f::<F3, F4>($($arg),*),
            (Kind::F3, Kind::F3) => $f::<F3, F3>($($arg),*),
            (Kind::F3, Kind::T2) => $f::<F3, T2>($($arg),*),
            (Kind::F3, Kind::T1) => $f::<F3, T1>($($arg),*),
            (Kind::T2, Kind::F6) => $f::<T2, F6>($($arg),*),
            (Kind::T2, Kind::F4) => $f::<T2, F4>($($arg),*),
            (Kind::T2, Kind::F3) => $f::<T2, F3>($($arg),*),
            (Kind::T2, Kind::T2) => $f::<T2, T2>($($arg),*),
            (Kind::T2, Kind::T1) => $f::<T2, T1>($($arg),*),
            (Kind::T1, Kind::F6) => $f::<T1, F6>($($arg),*),
            (Kind::T1, Kind::F4) => $f::<T1, F4>($($arg),*),
            (Kind::T1, Kind::F3) => $f::<T1, F3>($($arg),*),
            (Kind::T1, Kind::T2) => $f::<T1, T2>($($arg),*),
            (Kind::T1, Kind::T1) => $f::<T1, T1>($($arg),*),
        }
    };
}

mod by_channel;
mod by_tile;
mod kept;

pub use kept::KeptWeights;

/// Transformed inputs per chunk, in floats (16 MiB).
const INPUT_BUDGET: usize = 4 << 20;

/// The algorithm along one dimension of a tile.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Kind {
    F6,
    F4,
    F3,
    T2,
    T1,
}

impl Kind {
    /// Outputs per tile.
    fn m(self) -> usize {
        match self {
            Kind::F6 => 6,
            Kind::F4 => 4,
            Kind::F3 => 3,
            Kind::T2 => 2,
            Kind::T1 => 1,
        }
    }

    /// Multiplications per tile.
    fn products(self) -> usize {
        match self {
            Kind::F6 => 8,
            Kind::F4 => 6,
            Kind::F3 => 5,
            Kind::T2 => 3,
            Kind::T1 => 1,
        }
    }

    /// Multiplications along a sub-image of `len` pixels, if this algorithm can tile it.
    fn cost(self, len: usize) -> Option<usize> {
        match self {
            Kind::T2 if len > 2 => None,
            Kind::T1 if len > 1 => None,
            _ => Some(len.div_ceil(self.m()) * self.products()),
        }
    }

    /// The cheapest algorithm for a sub-image of `len` pixels, F(6, 3) only `with_f6`. Ties go to F(4, 3), whose
    /// transforms cost less per output than F(6, 3)'s, then to the larger tile.
    fn best(len: usize, with_f6: bool) -> Kind {
        [Kind::F4, Kind::F6, Kind::F3, Kind::T2, Kind::T1]
            .into_iter()
            .filter(|&k| with_f6 || k != Kind::F6)
            .filter_map(|k| Some((k, k.cost(len)?)))
            .min_by_key(|&(_, cost)| cost)
            .map_or(Kind::F4, |(k, _)| k)
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

/// The tiles that take one pair of algorithms (along rows, along columns), residue pair by residue pair.
pub(crate) struct Class {
    pub(crate) rows: Kind,
    pub(crate) cols: Kind,
    tiles: Vec<Tile>,
}

/// The cost model of [`plan`], in multiply-accumulates of the products per channel pair and product of the
/// algorithms: the input transform, per input channel, tile and product, takes about 72 multiply-accumulates' time
/// (shared by the output channels); the weight transform, per channel pair and product, about 47. Measured on
/// ASPP's 2048 → 256 channels at dilation 12 on 2 Zen 4 threads (inputs 24 ms, weights 7 ms, products 86 ms).
const INPUT_TRANSFORM_COST: f64 = 72.0;
const WEIGHT_TRANSFORM_COST: f64 = 47.0;

impl Class {
    /// Products per channel pair: one per tile and (row, column) product of the algorithms.
    fn products_per_channel(&self) -> usize {
        self.rows.products() * self.cols.products() * self.tiles.len()
    }

    /// Per channel pair and product of the algorithms: the tiles' products and input transforms, plus the weight
    /// transform.
    fn cost_per_product(&self, cout: usize) -> f64 {
        let per_tile = 1.0 + INPUT_TRANSFORM_COST / cout as f64;
        self.tiles.len() as f64 * per_tile + WEIGHT_TRANSFORM_COST
    }
}

/// How a convolution runs here: its tiles, grouped by algorithm pair.
pub(crate) struct Plan {
    pub(crate) classes: Vec<Class>,
}

/// Bytes of transformed weights that stay in the last-level cache between calls; beyond this, each call streams
/// them from memory.
const CACHED_WEIGHT_BYTES: f64 = (64 << 20) as f64;

/// What streaming one byte of transformed weights from memory costs, in multiply-accumulates of the products:
/// fitted on 2 threads of an Intel Xeon (AVX-512, AMX) to FCN's and PSPNet's heads (2048 and 4096 → 512
/// channels at 64×64, 268 and 537 MB of `U` with F(6×6, 3×3)), where the products ran at 229 GFLOP/s and `U`
/// arrived at 5.7 GB/s.
const STREAMED_BYTE_COST: f64 = 20.0;

impl Plan {
    /// Bytes of the transformed weights, `U`, over all classes.
    fn weight_bytes(&self, g: &ConvGeometry) -> f64 {
        let products: usize = self.classes.iter().map(|c| c.rows.products() * c.cols.products()).sum();
        (products * g.cout * g.cin * 4) as f64
    }

    /// The products' and transforms' estimated cost per channel pair, in multiply-accumulates.
    fn products_cost(&self, g: &ConvGeometry) -> f64 {
        self.classes
            .iter()
            .map(|c| (c.rows.products() * c.cols.products()) as f64 * c.cost_per_product(g.cout))
            .sum()
    }

    /// The whole estimated cost in multiply-accumulates: the products and transforms of every channel pair, and the
    /// transformed weights that do not stay in cache, streamed from memory on each call.
    fn cost(&self, g: &ConvGeometry) -> f64 {
        let streamed = (self.weight_bytes(g) - CACHED_WEIGHT_BYTES).max(0.0);
        self.products_cost(g) * (g.cin * g.cout) as f64 + streamed * STREAMED_BYTE_COST
    }
}

/// The tiles of a 3×3 stride-1 "same" convolution at its dilation, each sub-image length taking its cheapest
/// algorithm along each dimension (F(6, 3) only `with_f6`).
fn classes(g: &ConvGeometry, with_f6: bool) -> Vec<Class> {
    let d = g.dilation;
    let mut classes: Vec<Class> = Vec::new();
    for ry in 0..d.min(g.oh) {
        let rows = (g.oh - ry).div_ceil(d);
        let ky = Kind::best(rows, with_f6);
        for rx in 0..d.min(g.ow) {
            let cols = (g.ow - rx).div_ceil(d);
            let kx = Kind::best(cols, with_f6);
            let at = match classes.iter().position(|c| (c.rows, c.cols) == (ky, kx)) {
                Some(at) => at,
                None => {
                    classes.push(Class {
                        rows: ky,
                        cols: kx,
                        tiles: Vec::new(),
                    });
                    classes.len() - 1
                }
            };
            for ty in 0..rows.div_ceil(ky.m()) {
                for tx in 0..cols.div_ceil(kx.m()) {
                    classes[at].tiles.push(Tile { ry, rx, ty, tx });
                }
            }
        }
    }
    classes
}

/// The plan for this convolution, if Winograd pays: 3×3, stride 1, "same" padding (the polyphase split needs
/// padding = dilation), and its estimated cost well under the direct convolution's `direct_macs` (per channel
/// pair, padded taps skipped). Each sub-image length takes its cheapest algorithm along each dimension; where that
/// plan's transformed weights outgrow the cache, a plan without F(6, 3) (whose `U` is 36/64 of it) is taken if it
/// costs less with the weights' memory traffic counted: FCN's head (2048 → 512 at 64×64) on 2 Intel Xeon threads
/// (`bench_conv --keep`) ran 118 ms with F(6, 3), 111 with F(4, 3); PSPNet's (4096 → 512), 277 (its 537 MB over
/// the kept budget, transformed on each call) and 215 ms.
pub(crate) fn plan(g: &ConvGeometry, direct_macs: usize) -> Option<Plan> {
    if !(g.k == 3 && g.stride == 1 && g.padding == g.dilation && g.cin >= 16) {
        return None;
    }
    let mut plan = Plan {
        classes: classes(g, true),
    };
    if plan.weight_bytes(g) > CACHED_WEIGHT_BYTES {
        let without_f6 = Plan {
            classes: classes(g, false),
        };
        if without_f6.cost(g) < plan.cost(g) {
            plan = without_f6;
        }
    }
    (plan.products_cost(g) < direct_macs as f64 * 0.9).then_some(plan)
}

/// Buffers reused across calls.
#[derive(Default)]
pub(crate) struct Buffers {
    interleaved: Vec<Lanes>,
    input: Vec<f32>,
    weight: Vec<f32>,
    product: Vec<f32>,
}

/// Adds the convolution of `x` `[Cin, H, W]` by `weight` `[Cout, Cin, 3, 3]` onto `out` `[Cout, oh, ow]`, as
/// `plan` (from [`plan`]) says: per chunk of input channels, the chunk is interleaved once, then each class's
/// inputs and weights are transformed and its products accumulated; at the end each class's output transform.
pub(crate) fn conv2d_add(
    g: &ConvGeometry,
    plan: &Plan,
    (x, weight, kept): (&[f32], &[f32], Option<&KeptWeights>),
    out: &mut [f32],
    buffers: &mut Buffers,
) {
    let Buffers {
        interleaved,
        input,
        weight: transformed_weight,
        product,
    } = buffers;
    let hw = g.h * g.w;
    // Each class's M[co][ξ][tile] (R²·t per output channel), one after another.
    let sizes: Vec<usize> = plan.classes.iter().map(|c| c.products_per_channel()).collect();
    let largest = sizes.iter().copied().max().unwrap_or(1);
    // A whole number of lane groups, so only the last chunk has a partial one.
    let chunk = (INPUT_BUDGET / largest / LANES * LANES).clamp(LANES, g.cin);
    // Not cleared: the first chunk's products overwrite it.
    let product = aligned(product, g.cout * sizes.iter().map(|&s| padded_row(s)).sum::<usize>());
    let kept: Vec<_> = plan
        .classes
        .iter()
        .map(|c| kept.and_then(|k| k.get(g, c, weight)))
        .collect();
    // ASPP's large dilations transform straight from the planes ([`by_tile`]); the rest from interleaved channels.
    let by_tile = by_tile::suits(&plan.classes);
    for c0 in (0..g.cin).step_by(chunk) {
        let cc = (c0 + chunk).min(g.cin) - c0;
        let inputs = if by_tile {
            Inputs::Planes(&x[c0 * hw..(c0 + cc) * hw])
        } else {
            let groups = cc.div_ceil(LANES);
            if interleaved.len() < groups * hw {
                interleaved.resize(groups * hw, [0.0; LANES]);
            }
            interleave(&x[c0 * hw..(c0 + cc) * hw], hw, &mut interleaved[..groups * hw]);
            Inputs::Interleaved(&interleaved[..groups * hw])
        };
        let mut at = 0;
        for ((class, size), kept) in plan.classes.iter().zip(&sizes).zip(&kept) {
            let m = &mut product[at..at + g.cout * padded_row(*size)];
            at += g.cout * padded_row(*size);
            let chunk_of = (inputs, c0..c0 + cc);
            let weights = match kept {
                Some(kept) => Weights::Kept(kept.u()),
                None => Weights::Raw(weight, &mut *transformed_weight),
            };
            dispatch!(class, accumulate_chunk(g, &class.tiles, chunk_of, weights, input, m));
        }
    }
    let mut at = 0;
    for (class, size) in plan.classes.iter().zip(&sizes) {
        let m = &product[at..at + g.cout * padded_row(*size)];
        at += g.cout * padded_row(*size);
        dispatch!(class, transform_outputs(g, &class.tiles, m, out));
    }
}

/// Where a class's transformed weights come from on this call.
enum Weights<'a> {
    /// The raw weights `[Cout, Cin, 3, 3]`, transformed chunk by chunk into the buffer.
    Raw(&'a [f32], &'a mut Vec<f32>),
    /// `U[co][ξ][c]` of every input channel, kept from an earlier call ([`KeptWeights`]).
    Kept(&'a [f32]),
}

/// One chunk of input channels as the input transform reads it.
#[derive(Clone, Copy)]
enum Inputs<'a> {
    /// The chunk's channels interleaved into lane groups ([`interleave`]).
    Interleaved(&'a [Lanes]),
    /// The chunk's planes as they are (`[cc, H, W]`), for [`by_tile`].
    Planes(&'a [f32]),
}

/// One class (algorithm `Y` along rows, `X` along columns), one chunk of input channels (`inputs` and their
/// range): transforms its inputs (and its weights, unless kept), then `M[ξ] (+)= U[ξ]·V[ξ]` into `m`
/// `[Cout][ξ][tile]` (overwriting it for the first chunk).
fn accumulate_chunk<Y: Algorithm, X: Algorithm>(
    g: &ConvGeometry,
    tiles: &[Tile],
    (inputs, channels): (Inputs, std::ops::Range<usize>),
    weights: Weights,
    input: &mut Vec<f32>,
    m: &mut [f32],
) {
    let (r2, t, cc) = (Y::R * X::R, tiles.len(), channels.len());
    // V[ξ] channel-major (its matrices and rows apart), or tile-major.
    let (v, channel_major): (&mut [f32], Option<(usize, usize)>) = match inputs {
        Inputs::Planes(planes) => {
            let v = aligned(input, r2 * by_tile::xi_stride(t, cc));
            by_tile::transform_inputs::<Y, X>(g, tiles, planes, cc, v);
            (v, Some((by_tile::xi_stride(t, cc), by_tile::row_stride(t))))
        }
        Inputs::Interleaved(interleaved) => {
            let v = aligned(input, r2 * v_stride(t, cc));
            transform_inputs::<Y, X>(g, tiles, interleaved, cc, v);
            (v, None)
        }
    };
    // U[co][ξ][·]: this chunk's columns start at `u_first`, rows of R²·`u_channels` (padded) apart.
    let (u, u_channels, u_first): (&[f32], usize, usize) = match weights {
        Weights::Kept(u) => (u, g.cin, channels.start),
        Weights::Raw(weight, buffer) => {
            let u = aligned(buffer, g.cout * padded_row(r2 * cc));
            transform_weights::<Y, X>(g, weight, channels.clone(), u);
            (u, cc, 0)
        }
    };
    assert_eq!(u.len(), g.cout * padded_row(r2 * u_channels));
    let v = &*v;
    // The R² products are independent and small (`[Cout, cc] · [cc, tiles]`): one single-threaded gemm per task,
    // rather than each product split across the threads with a wait after each.
    assert_eq!(m.len(), g.cout * padded_row(r2 * t));
    let m = m.as_mut_ptr() as usize;
    let by_channel = by_channel::pays();
    (0..r2).into_par_iter().for_each(|xi| {
        // `rhs`: V[ξ] as the product's [cc, t] operand, (row, column) strides.
        let product = |rhs: (*const f32, usize, usize)| {
            // SAFETY: M[co][ξ][·] rows are padded_row(R²·t) apart (length t); U[co][ξ][·] rows
            // padded_row(R²·u_channels) apart, of which this chunk reads cc from u_first (asserted length above);
            // `rhs` covers [cc, t] with its strides (below); all offsets by ξ stay inside their buffers, and tasks
            // write disjoint elements of M (their own ξ).
            unsafe {
                gemm_strided(
                    (g.cout, t, cc),
                    ((m as *mut f32).add(xi * t), padded_row(r2 * t), 1),
                    (u[xi * u_channels + u_first..].as_ptr(), padded_row(r2 * u_channels), 1),
                    rhs,
                    channels.start > 0,
                    Parallelism::None,
                )
            }
        };
        if let Some((xi_stride, row_stride)) = channel_major {
            return product((v[xi * xi_stride..].as_ptr(), row_stride, 1));
        }
        // V[ξ] is [t, cc] (tile-major): the product's rhs column-major, or copied channel-major first.
        let v_xi = &v[xi * v_stride(t, cc)..][..t * cc];
        if by_channel {
            by_channel::with_channel_major(v_xi, t, cc, |copy, row_stride| product((copy.as_ptr(), row_stride, 1)));
        } else {
            product((v_xi.as_ptr(), 1, cc));
        }
    });
}

/// Tiles (or channels) transformed together, one per SIMD lane (one AVX-512 register; see [`Simd`]).
const LANES: usize = 16;

type Lanes = [f32; LANES];

/// The partial copy of [`copy_lanes_with`], a function of its own: inlined, the compiler merged both branches into
/// one `memcpy` of a run-time size, 13% of ASPP's dilation-12 conv (a `copy_from_slice` of a run-time length is a
/// call to `memmove`, which cost more than the transform itself).
#[cold]
#[inline(never)]
fn copy_partial_lanes(dst: &mut [f32], src: &[f32], n: usize) {
    dst[..n].copy_from_slice(&src[..n]);
}

/// A tile's values, one lane vector per element, in a CAP×CAP block of which the transforms use the top left.
type Block = [[Lanes; CAP]; CAP];

/// The vector operations of the transforms on one [`Lanes`]: one AVX-512 register, two AVX2 registers, or a
/// plain array for the baseline. Written out because, given plain array loops, LLVM fully unrolled the lanes and
/// its SLP vectoriser regrouped them across a tile's elements, into gathers: 542 `vgatherqps` in the output
/// transform, whose share of layer3's and layer4's convolutions was 20–30%.
trait Simd {
    type V: Copy;
    /// # Safety
    /// `p` must be valid for `LANES` floats and the CPU must have the type's features (as for all methods).
    unsafe fn load(p: *const f32) -> Self::V;
    /// # Safety
    /// As [`Simd::load`], for writing.
    unsafe fn store(p: *mut f32, v: Self::V);
    /// `acc + c·x`, rounded after the product and after the sum (no fused multiply-add: the same bits as the
    /// scalar formula).
    ///
    /// # Safety
    /// The CPU must have the type's features.
    unsafe fn mul_add(acc: Self::V, c: f32, x: Self::V) -> Self::V;
    /// # Safety
    /// The CPU must have the type's features.
    unsafe fn zero() -> Self::V;
}

/// Arrays, for the baseline build.
struct Portable;

impl Simd for Portable {
    type V = Lanes;
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Lanes {
        // SAFETY: the caller's.
        unsafe { *(p as *const Lanes) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Lanes) {
        // SAFETY: the caller's.
        unsafe { *(p as *mut Lanes) = v }
    }
    #[inline(always)]
    unsafe fn mul_add(mut acc: Lanes, c: f32, x: Lanes) -> Lanes {
        for l in 0..LANES {
            acc[l] += c * x[l];
        }
        acc
    }
    #[inline(always)]
    unsafe fn zero() -> Lanes {
        [0.0; LANES]
    }
}

/// `out[i][j] = Σ_{a < k} m[i][a]·x[a][j]` for `i < rows`, `j < cols`, on lane vectors, skipping the matrix's
/// zeros (the bounds and `m` are constants where this is inlined, so the loops unroll to the exact size). The rest
/// of `out` is left as it was: a fresh zeroed block per call was a 2.3 KB `memset` per tile and lane group, 8–9%
/// of ASPP's dilated convolutions, whose 2×2 tiles do far less work than that.
///
/// # Safety
/// The CPU must have `S`'s features.
#[inline(always)]
unsafe fn left<S: Simd>(m: &[[f32; CAP]; CAP], x: &Block, (rows, k, cols): (usize, usize, usize), out: &mut Block) {
    for i in 0..rows {
        for j in 0..cols {
            // SAFETY: every pointer is to a whole `Lanes` of a block; the features are the caller's.
            unsafe {
                let mut acc = S::zero();
                for a in 0..k {
                    let c = m[i][a];
                    if c != 0.0 {
                        acc = S::mul_add(acc, c, S::load(x[a][j].as_ptr()));
                    }
                }
                S::store(out[i][j].as_mut_ptr(), acc);
            }
        }
    }
}

/// `out[i][j] = Σ_{b < k} x[i][b]·m[j][b]` (times the transpose of `m`) for `i < rows`, `j < cols`, as [`left`].
///
/// # Safety
/// The CPU must have `S`'s features.
#[inline(always)]
unsafe fn right<S: Simd>(x: &Block, m: &[[f32; CAP]; CAP], (rows, k, cols): (usize, usize, usize), out: &mut Block) {
    for i in 0..rows {
        for j in 0..cols {
            // SAFETY: as in `left`.
            unsafe {
                let mut acc = S::zero();
                for b in 0..k {
                    let c = m[j][b];
                    if c != 0.0 {
                        acc = S::mul_add(acc, c, S::load(x[i][b].as_ptr()));
                    }
                }
                S::store(out[i][j].as_mut_ptr(), acc);
            }
        }
    }
}

/// `dst[..n] = src[..n]` through `S`'s registers for a full group, else by [`copy_partial_lanes`].
///
/// # Safety
/// The CPU must have `S`'s features.
#[inline(always)]
unsafe fn copy_lanes_with<S: Simd>(dst: &mut [f32], src: &[f32], n: usize) {
    if n == LANES {
        let (dst, src) = (&mut dst[..LANES], &src[..LANES]);
        // SAFETY: both slices hold LANES floats; the features are the caller's.
        unsafe { S::store(dst.as_mut_ptr(), S::load(src.as_ptr())) };
    } else {
        copy_partial_lanes(dst, src, n);
    }
}

/// A zeroed [`Block`], made once per call of a transform and reused for every tile.
const ZERO_BLOCK: Block = [[[0f32; LANES]; CAP]; CAP];

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

    /// Asks the cache for the pixels [`Self::fill`] will read with the same arguments. Their lines are scattered
    /// (`d` pixels apart along a row, a whole plane apart between lane groups), so the hardware prefetchers miss
    /// them and the copy waited on each load: 12% of ASPP's dilation-36 conv, whose sub-images are 2×2.
    fn prefetch(&self, g: &ConvGeometry, image: &[Lanes], (ry, rx): (usize, usize), rows: std::ops::Range<usize>) {
        #[cfg(target_arch = "x86_64")]
        {
            let d = self.d;
            let (sh, sw) = ((g.h - ry).div_ceil(d), (g.w - rx).div_ceil(d));
            for py in rows.filter_map(|padded| padded.checked_sub(1)).filter(|&py| py < sh) {
                let line = &image[(ry + d * py) * g.w..(ry + d * py + 1) * g.w];
                for px in 0..sw {
                    let at = &line[rx + d * px] as *const Lanes as *const i8;
                    // SAFETY: a prefetch only hints the cache; `at` is inside `image` anyway.
                    unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(at) };
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (g, image, (ry, rx), rows);
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
        #[cfg(target_arch = "x86_64")]
        if lanes == LANES && avx2() {
            // SAFETY: the CPU has AVX2; `x` holds LANES planes of hw floats and `out` hw vectors.
            unsafe { x86::interleave_16_avx2(x, hw, out) };
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
pub(super) mod x86 {
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

    /// [`super::interleave`] of one full group on AVX2: 8 pixels of 8 planes at a time, transposed in registers,
    /// into one half of each of the 8 pixels' vectors.
    ///
    /// # Safety
    /// The CPU must have AVX2; `x` must hold 16 planes of `hw` floats and `out` `hw` vectors.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn interleave_16_avx2(x: &[f32], hw: usize, out: &mut [Lanes]) {
        const HALF: usize = LANES / 2;
        assert!(x.len() >= LANES * hw && out.len() >= hw);
        let full = hw / HALF * HALF;
        for p0 in (0..full).step_by(HALF) {
            for half in 0..2 {
                // SAFETY: rows (8·half + l)·hw + p0 .. + 8 and out[p0 .. p0 + 8] are inside the slices (asserted
                // above).
                unsafe {
                    let mut r = [_mm256_setzero_ps(); HALF];
                    for (l, r) in r.iter_mut().enumerate() {
                        *r = _mm256_loadu_ps(x.as_ptr().add((HALF * half + l) * hw + p0));
                    }
                    let t = transpose_8(r);
                    for (i, t) in t.iter().enumerate() {
                        _mm256_storeu_ps((out.as_mut_ptr().add(p0 + i) as *mut f32).add(HALF * half), *t);
                    }
                }
            }
        }
        interleave_scalar(x, hw, LANES, out, full);
    }

    /// One AVX-512 register.
    pub(super) struct Avx512;

    impl super::Simd for Avx512 {
        type V = __m512;
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            // SAFETY: the caller's.
            unsafe { _mm512_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m512) {
            // SAFETY: the caller's.
            unsafe { _mm512_storeu_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn mul_add(acc: __m512, c: f32, x: __m512) -> __m512 {
            // SAFETY: the caller's (AVX-512F).
            unsafe { _mm512_add_ps(acc, _mm512_mul_ps(_mm512_set1_ps(c), x)) }
        }
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            // SAFETY: the caller's (AVX-512F).
            unsafe { _mm512_setzero_ps() }
        }
    }

    /// Two AVX2 registers.
    pub(super) struct Avx2;

    impl super::Simd for Avx2 {
        type V = (__m256, __m256);
        #[inline(always)]
        unsafe fn load(p: *const f32) -> (__m256, __m256) {
            // SAFETY: the caller's.
            unsafe { (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))) }
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: (__m256, __m256)) {
            // SAFETY: the caller's.
            unsafe {
                _mm256_storeu_ps(p, v.0);
                _mm256_storeu_ps(p.add(8), v.1);
            }
        }
        #[inline(always)]
        unsafe fn mul_add(acc: (__m256, __m256), c: f32, x: (__m256, __m256)) -> (__m256, __m256) {
            // SAFETY: the caller's (AVX2).
            unsafe {
                let c = _mm256_set1_ps(c);
                (
                    _mm256_add_ps(acc.0, _mm256_mul_ps(c, x.0)),
                    _mm256_add_ps(acc.1, _mm256_mul_ps(c, x.1)),
                )
            }
        }
        #[inline(always)]
        unsafe fn zero() -> (__m256, __m256) {
            // SAFETY: the caller's (AVX2).
            unsafe { (_mm256_setzero_ps(), _mm256_setzero_ps()) }
        }
    }

    /// The transpose of an 8×8 block of floats held as 8 rows: interleaving 32-bit, then 64-bit elements within
    /// each 128-bit lane, then swapping 128-bit lanes.
    #[target_feature(enable = "avx2")]
    pub(crate) fn transpose_8(r: [__m256; 8]) -> [__m256; 8] {
        // t[2i] lane k: [r2i[4k], r2i+1[4k], r2i[4k+1], r2i+1[4k+1]]; t[2i+1] the same at 4k+2, 4k+3.
        let mut t = [_mm256_setzero_ps(); 8];
        for i in 0..4 {
            t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        // u[4j + q] lane k: column 4k + q of rows 4j .. 4j + 4.
        let mut u = [_mm256_setzero_ps(); 8];
        for j in 0..2 {
            let (t0, t1, t2, t3) = (t[4 * j], t[4 * j + 1], t[4 * j + 2], t[4 * j + 3]);
            u[4 * j] = _mm256_shuffle_ps::<0x44>(t0, t2);
            u[4 * j + 1] = _mm256_shuffle_ps::<0xEE>(t0, t2);
            u[4 * j + 2] = _mm256_shuffle_ps::<0x44>(t1, t3);
            u[4 * j + 3] = _mm256_shuffle_ps::<0xEE>(t1, t3);
        }
        // Column q < 4: the low lanes of u[q] (rows 0..4) and u[4 + q] (rows 4..8); column q + 4: their high lanes.
        let mut out = [_mm256_setzero_ps(); 8];
        for q in 0..4 {
            out[q] = _mm256_permute2f128_ps::<0x20>(u[q], u[4 + q]);
            out[q + 4] = _mm256_permute2f128_ps::<0x31>(u[q], u[4 + q]);
        }
        out
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

/// Floats from one output channel's row of U (`[ξ][c]`) or M (`[ξ][tile]`) to the next, a row of `len`: one cache
/// line more, so that the rows are not a multiple of 4 KiB apart. They were with most sizes here (36·256 floats
/// for a 64×64 map's 256 tiles), so the six rows of the result a micro-kernel tile adds into, and the rows of U
/// its packing gathers, all fell in one set of the L1 cache.
fn padded_row(len: usize) -> usize {
    len + LANES
}

/// Floats from V[ξ] to V[ξ + 1] (`[tiles, cc]` each): one cache line more than the matrix, so the R² rows a tile
/// writes are not a multiple of 4 KiB apart (with ASPP's sizes they would be, all in one set of the L1 cache; the
/// measured difference was within noise, the padding costs nothing).
fn v_stride(t: usize, cc: usize) -> usize {
    t * cc + LANES
}

/// The first `n` floats of `buf` from a 64-byte boundary on (grown as needed), so each vector store of the
/// transforms (and each row the products write) fills one cache line rather than straddling two.
fn aligned(buf: &mut Vec<f32>, n: usize) -> &mut [f32] {
    let buf = at_least(buf, n + LANES);
    let skip = buf.as_ptr().align_offset(64).min(LANES);
    &mut buf[skip..skip + n]
}

/// Lane groups whose sub-image pixels are asked for ahead of the one being copied ([`PaddedSubImages::prefetch`]).
const PREFETCH_GROUPS: usize = 4;

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

/// Whether the transforms run compiled for AVX2 (8 floats per instruction) on CPUs without AVX-512: AMD before
/// Zen 4, Intel client CPUs, Haswell to Broadwell servers.
fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Defines `$name`, which runs `$body` (a function marked `#[inline(always)]`) compiled for AVX-512F when the CPU
/// has it, for AVX2 when it has that, and for the baseline otherwise, with the same generic parameters and
/// arguments.
macro_rules! simd_dispatch {
    ($name:ident, $avx512:ident, $avx2:ident, $body:ident, ($($arg:ident: $ty:ty),*)) => {
        fn $name<Y: Algorithm, X: Algorithm>($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            if avx512() {
                // SAFETY: the CPU has AVX-512F; `$body`'s own contract is the caller's.
                #[allow(unused_unsafe)]
                return unsafe { $avx512::<Y, X>($($arg),*) };
            }
            #[cfg(target_arch = "x86_64")]
            if avx2() {
                // SAFETY: the CPU has AVX2; `$body`'s own contract is the caller's.
                #[allow(unused_unsafe)]
                return unsafe { $avx2::<Y, X>($($arg),*) };
            }
            #[allow(unused_unsafe)]
            unsafe { $body::<Y, X, Portable>($($arg),*) }
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f")]
        unsafe fn $avx512<Y: Algorithm, X: Algorithm>($($arg: $ty),*) {
            #[allow(unused_unsafe)]
            unsafe { $body::<Y, X, x86::Avx512>($($arg),*) }
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        unsafe fn $avx2<Y: Algorithm, X: Algorithm>($($arg: $ty),*) {
            #[allow(unused_unsafe)]
            unsafe { $body::<Y, X, x86::Avx2>($($arg),*) }
        }
    };
}

/// `V[ξ][tile][c] = (Bᵀ·d·B)[ξ]` for the input patch `d` of every tile, the chunk's `cc` channels given
/// interleaved into vectors of `LANES`: each task takes a band of tiles, copies their padded sub-image rows out of
/// that with whole-vector moves, and transforms `LANES` channels at a time, writing its own rows of V, whole.
fn transform_inputs<Y: Algorithm, X: Algorithm>(
    g: &ConvGeometry,
    tiles: &[Tile],
    interleaved: &[Lanes],
    cc: usize,
    v: &mut [f32],
) {
    let t = tiles.len();
    let sub = PaddedSubImages::new(g, X::M);
    let groups = cc.div_ceil(LANES);
    let hw = g.h * g.w;
    // Every element is written below.
    assert_eq!(v.len(), Y::R * X::R * v_stride(t, cc));
    let v = v.as_mut_ptr() as usize;
    bands(tiles)
        .into_par_iter()
        .for_each_init(Vec::new, |buf: &mut Vec<Lanes>, range| {
            let band = &tiles[range.clone()];
            let (first, last) = (band[0], band[band.len() - 1]);
            // Padded rows ty·M .. (ty + 1)·M + 2 of each tile row.
            let rows = first.ty * Y::M..(last.ty + 1) * Y::M + 2;
            let per_group = rows.len() * sub.bw;
            buf.resize(groups * per_group, [0.0; LANES]);
            // Lane group i's channel-interleaved image.
            let image = |i: usize| &interleaved[i * hw..(i + 1) * hw];
            let residue = (first.ry, first.rx);
            for i in 0..PREFETCH_GROUPS.min(groups) {
                sub.prefetch(g, image(i), residue, rows.clone());
            }
            for (i, gbuf) in buf.chunks_mut(per_group).enumerate() {
                if i + PREFETCH_GROUPS < groups {
                    sub.prefetch(g, image(i + PREFETCH_GROUPS), residue, rows.clone());
                }
                sub.fill(g, image(i), residue, rows.clone(), gbuf);
            }
            // SAFETY: V holds R²·t·cc floats; this task writes rows V[ξ][range][·], which no other task does.
            unsafe {
                input_tiles::<Y, X>(
                    &sub,
                    band,
                    (buf.as_slice(), per_group, rows.start),
                    (v as *mut f32).add(range.start * cc),
                    (t, cc),
                )
            };
        });
}

simd_dispatch!(input_tiles, input_tiles_avx512, input_tiles_avx2, input_tiles_body, (sub: &PaddedSubImages, band: &[Tile], bufs: (&[Lanes], usize, usize), v: *mut f32, dims: (usize, usize)));

/// `V[ξ][tile][·]` for a band of tiles from their padded sub-image rows `bufs` (the buffer, its length per lane
/// group, the first padded row it holds); `v` points at V[0][the band's first tile][0], `dims` = (all tiles,
/// channels in the chunk).
///
/// # Safety
/// `v` must cover the band's rows of V, for every ξ.
#[inline(always)]
unsafe fn input_tiles_body<Y: Algorithm, X: Algorithm, S: Simd>(
    sub: &PaddedSubImages,
    band: &[Tile],
    (buf, per_group, first_row): (&[Lanes], usize, usize),
    v: *mut f32,
    (t, cc): (usize, usize),
) {
    let (mut patch, mut rows_done, mut transformed) = (ZERO_BLOCK, ZERO_BLOCK, ZERO_BLOCK);
    for (i, tile) in band.iter().enumerate() {
        let start = (tile.ty * Y::M - first_row) * sub.bw + tile.tx * X::M;
        for (group, gbuf) in buf.chunks(per_group).enumerate() {
            for (a, row) in patch.iter_mut().enumerate().take(Y::A) {
                row[..X::A].copy_from_slice(&gbuf[start + a * sub.bw..start + a * sub.bw + X::A]);
            }
            // SAFETY: the dispatch checked `S`'s features.
            unsafe {
                left::<S>(&Y::BT, &patch, (Y::R, Y::A, X::A), &mut rows_done);
                right::<S>(&rows_done, &X::BT, (Y::R, X::A, X::R), &mut transformed);
            }
            let lanes = (cc - group * LANES).min(LANES);
            for (r, row) in transformed.iter().enumerate().take(Y::R) {
                for (s, lanes_v) in row.iter().enumerate().take(X::R) {
                    let xi = r * X::R + s;
                    // SAFETY (the caller's): V[ξ][tile i][group's lanes] is inside the band's rows.
                    unsafe {
                        let dst =
                            std::slice::from_raw_parts_mut(v.add(xi * v_stride(t, cc) + i * cc + group * LANES), lanes);
                        copy_lanes_with::<S>(dst, lanes_v, lanes);
                    }
                }
            }
        }
    }
}

/// `U[co][ξ][c] = (G·g·Gᵀ)[ξ]` for channels `channels` of every output channel, `LANES` channels at a time.
fn transform_weights<Y: Algorithm, X: Algorithm>(
    g: &ConvGeometry,
    weight: &[f32],
    channels: std::ops::Range<usize>,
    u: &mut [f32],
) {
    let cc = channels.len();
    // Every element is written below.
    u.par_chunks_mut(padded_row(Y::R * X::R * cc))
        .enumerate()
        .for_each(|(co, uc)| {
            let w = &weight[co * g.cin * 9..(co + 1) * g.cin * 9];
            weight_row::<Y, X>(&w[channels.start * 9..channels.end * 9], uc);
        });
}

simd_dispatch!(weight_row, weight_row_avx512, weight_row_avx2, weight_row_body, (w: &[f32], uc: &mut [f32]));

/// One output channel's `U[ξ][c]` from its weights `w` `[cc, 3, 3]`, `LANES` input channels at a time, as two
/// block products (as the input transform does) where a tile has at most 36 products: on 2 Zen 4 threads that ran
/// layer4's F(4×4, 3×3) (512 → 512 at dilation 4) in 41 ms against 44 by rows, and ASPP's dilation 24 with its
/// smaller tiles in 88 against 101.
#[inline(always)]
fn weight_row_body<Y: Algorithm, X: Algorithm, S: Simd>(w: &[f32], uc: &mut [f32]) {
    if Y::R * X::R > 36 {
        return weight_row_by_rows::<Y, X, S>(w, uc);
    }
    let cc = w.len() / 9;
    // Lanes past the last channel hold stale values, never stored.
    let (mut k, mut rows_done, mut transformed) = (ZERO_BLOCK, ZERO_BLOCK, ZERO_BLOCK);
    for c0 in (0..cc).step_by(LANES) {
        let lanes = (cc - c0).min(LANES);
        for l in 0..lanes {
            let wc = &w[(c0 + l) * 9..(c0 + l + 1) * 9];
            for (a, row) in k.iter_mut().enumerate().take(3) {
                for (b, v) in row.iter_mut().enumerate().take(3) {
                    v[l] = wc[a * 3 + b];
                }
            }
        }
        // SAFETY: the dispatch checked `S`'s features.
        unsafe {
            left::<S>(&Y::G, &k, (Y::R, 3, 3), &mut rows_done);
            right::<S>(&rows_done, &X::G, (Y::R, 3, X::R), &mut transformed);
            for (r, row) in transformed.iter().enumerate().take(Y::R) {
                for (s, lanes_v) in row.iter().enumerate().take(X::R) {
                    let at = (r * X::R + s) * cc + c0;
                    copy_lanes_with::<S>(&mut uc[at..], lanes_v, lanes);
                }
            }
        }
    }
}

/// [`weight_row_body`] for the largest tiles: row `r` of `G_Y·g` (3 vectors), then each `U[r][s]` from it, stored
/// at once, so a group's work stays in registers. The block form kept F(6, 3)'s 8×8 blocks of vectors on the
/// stack: 44% of ASPP's dilation-12 conv. Same sums in the same order, so the same bits.
#[inline(always)]
fn weight_row_by_rows<Y: Algorithm, X: Algorithm, S: Simd>(w: &[f32], uc: &mut [f32]) {
    let cc = w.len() / 9;
    for c0 in (0..cc).step_by(LANES) {
        let lanes = (cc - c0).min(LANES);
        // k[tap][lane]; lanes past the last channel stay zero, never stored.
        let mut k = [[0f32; LANES]; 9];
        for (l, wc) in w[c0 * 9..(c0 + lanes) * 9].chunks_exact(9).enumerate() {
            for (tap, &v) in wc.iter().enumerate() {
                k[tap][l] = v;
            }
        }
        // SAFETY: the dispatch checked `S`'s features; every pointer is to a whole `Lanes`.
        unsafe {
            for r in 0..Y::R {
                let mut t = [S::zero(); 3];
                for (b, tb) in t.iter_mut().enumerate() {
                    for a in 0..3 {
                        let c = Y::G[r][a];
                        if c != 0.0 {
                            *tb = S::mul_add(*tb, c, S::load(k[a * 3 + b].as_ptr()));
                        }
                    }
                }
                for s in 0..X::R {
                    let mut acc = S::zero();
                    for (b, tb) in t.iter().enumerate() {
                        let c = X::G[s][b];
                        if c != 0.0 {
                            acc = S::mul_add(acc, c, *tb);
                        }
                    }
                    let mut stored = [0f32; LANES];
                    S::store(stored.as_mut_ptr(), acc);
                    copy_lanes_with::<S>(&mut uc[(r * X::R + s) * cc + c0..], &stored, lanes);
                }
            }
        }
    }
}

/// `out[co] += Aᵀ·M·A` of every tile, cropped to the output, `LANES` tiles at a time.
fn transform_outputs<Y: Algorithm, X: Algorithm>(g: &ConvGeometry, tiles: &[Tile], m: &[f32], out: &mut [f32]) {
    let (t, r2) = (tiles.len(), Y::R * X::R);
    let places = Places::new::<Y, X>(g, tiles);
    out.par_chunks_mut(g.oh * g.ow).enumerate().for_each(|(co, o)| {
        let row = co * padded_row(r2 * t);
        output_channel::<Y, X>(g, &places, &m[row..row + r2 * t], o);
    });
}

/// Where each tile's outputs go in an output plane: the offset of its first output, and how many of its rows and
/// columns fall inside the plane (the last tiles of a sub-image are cropped), worked out once per class rather than
/// checked per output and channel. Padded with empty tiles to a whole number of lane groups.
struct Places {
    offset: Vec<usize>,
    rows: Vec<usize>,
    cols: Vec<usize>,
}

impl Places {
    fn new<Y: Algorithm, X: Algorithm>(g: &ConvGeometry, tiles: &[Tile]) -> Self {
        let n = tiles.len().div_ceil(LANES) * LANES;
        let (mut offset, mut rows, mut cols) = (vec![0; n], vec![0; n], vec![0; n]);
        let d = g.dilation;
        // Outputs i of a tile starting at `first`, `i < m`, at first + d·i < size.
        let inside = |first: usize, m: usize, size: usize| size.saturating_sub(first).div_ceil(d).min(m);
        for (i, tile) in tiles.iter().enumerate() {
            let (oy, ox) = (tile.ry + d * tile.ty * Y::M, tile.rx + d * tile.tx * X::M);
            offset[i] = oy * g.ow + ox;
            rows[i] = inside(oy, Y::M, g.oh);
            cols[i] = inside(ox, X::M, g.ow);
        }
        Self { offset, rows, cols }
    }
}

simd_dispatch!(output_channel, output_channel_avx512, output_channel_avx2, output_channel_body, (g: &ConvGeometry, places: &Places, mc: &[f32], o: &mut [f32]));

/// One output channel: `o` `[oh, ow]` += its tiles' `Aᵀ·M·A` from `mc` `[ξ][tile]`.
#[inline(always)]
fn output_channel_body<Y: Algorithm, X: Algorithm, S: Simd>(
    g: &ConvGeometry,
    places: &Places,
    mc: &[f32],
    o: &mut [f32],
) {
    let t = mc.len() / (Y::R * X::R);
    let d = g.dilation;
    assert_eq!(o.len(), g.oh * g.ow);
    assert!(places.offset.len() >= t.div_ceil(LANES) * LANES);
    // Lanes past the last tile hold stale values, never stored.
    let (mut mt, mut rows_done, mut y) = (ZERO_BLOCK, ZERO_BLOCK, ZERO_BLOCK);
    for t0 in (0..t).step_by(LANES) {
        let lanes = (t - t0).min(LANES);
        for (r, row) in mt.iter_mut().enumerate().take(Y::R) {
            for (s, v) in row.iter_mut().enumerate().take(X::R) {
                let at = (r * X::R + s) * t + t0;
                // SAFETY: the dispatch checked `S`'s features.
                unsafe { copy_lanes_with::<S>(v, &mc[at..], lanes) };
            }
        }
        // SAFETY: as above.
        unsafe {
            left::<S>(&Y::AT, &mt, (Y::M, Y::R, X::R), &mut rows_done);
            right::<S>(&rows_done, &X::AT, (Y::M, X::R, X::M), &mut y);
        }
        let group = t0..t0 + LANES;
        let (offset, rows, cols) = (
            &places.offset[group.clone()],
            &places.rows[group.clone()],
            &places.cols[group],
        );
        // One scalar update per output: AVX-512's gather and scatter ran no faster on Zen 4.
        for l in 0..lanes {
            for (i, row) in y.iter().enumerate().take(rows[l]) {
                for (j, v) in row.iter().enumerate().take(cols[l]) {
                    o[offset[l] + i * d * g.ow + j * d] += v[l];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Aᵀ·[(G·w) ⊙ (Bᵀ·x)]` of one algorithm, in f64.
    fn filter_1d<K: Algorithm>(x: &[f64], w: &[f64; 3]) -> Vec<f64> {
        let u: Vec<f64> = (0..K::R)
            .map(|r| (0..3).map(|k| K::G[r][k] as f64 * w[k]).sum())
            .collect();
        let v: Vec<f64> = (0..K::R)
            .map(|r| (0..K::A).map(|a| K::BT[r][a] as f64 * x[a]).sum())
            .collect();
        (0..K::M)
            .map(|i| (0..K::R).map(|r| K::AT[i][r] as f64 * u[r] * v[r]).sum())
            .collect()
    }

    /// `left` and `right` give the same bits on every vector width this CPU has: the same products and sums in
    /// the same order.
    #[test]
    fn block_products_agree_across_vector_widths() {
        let values = crate::model::ops::conv_cpu::tests::seeded(CAP * CAP * LANES, 9);
        let mut x = ZERO_BLOCK;
        for (v, chunk) in x.iter_mut().flatten().zip(values.chunks_exact(LANES)) {
            v.copy_from_slice(chunk);
        }
        fn both<S: Simd>(x: &Block) -> (Block, Block) {
            let (mut l, mut r) = (ZERO_BLOCK, ZERO_BLOCK);
            // SAFETY: the caller checked `S`'s features.
            unsafe {
                left::<S>(&F6::BT, x, (F6::R, F6::A, F6::A), &mut l);
                right::<S>(x, &F6::AT, (F6::R, F6::R, F6::M), &mut r);
            }
            (l, r)
        }
        let portable = both::<Portable>(&x);
        #[cfg(target_arch = "x86_64")]
        {
            if avx2() {
                assert!(both::<x86::Avx2>(&x) == portable, "AVX2");
            }
            if avx512() {
                assert!(both::<x86::Avx512>(&x) == portable, "AVX-512");
            }
        }
        assert_ne!(portable.0, ZERO_BLOCK);
    }

    /// Each algorithm's matrices compute the 3-tap correlation `y[i] = Σ_k w[k]·x[i + k]` of its tile: on any input
    /// for the Toom-Cook ones, on inputs with zeros around the sub-image for the 2- and 1-pixel ones.
    #[test]
    fn every_algorithm_is_the_three_tap_correlation() {
        fn check<K: Algorithm>(name: &str, zero_ends: bool) {
            let mut x: Vec<f64> = (0..K::A).map(|a| ((a * 7 + 3) % 11) as f64 / 5.0 - 1.0).collect();
            if zero_ends {
                x[0] = 0.0;
                x[K::A - 1] = 0.0;
            }
            let w = [0.7, -1.3, 0.4];
            let got = filter_1d::<K>(&x, &w);
            for (i, y) in got.iter().enumerate() {
                let want: f64 = (0..3).map(|k| w[k] * x[i + k]).sum();
                assert!((y - want).abs() < 1e-6, "{name}: output {i} is {y}, not {want}");
            }
        }
        check::<F6>("F(6, 3)", false);
        check::<F4>("F(4, 3)", false);
        check::<F3>("F(3, 3)", false);
        check::<T2>("2-pixel", true);
        check::<T1>("1-pixel", true);
    }

    /// The channel-interleaved copy holds every plane's pixel in its lane, zeros past the last plane, for full
    /// groups (the AVX-512 transposes where the CPU has them), a partial one, and a pixel count that leaves a tail.
    #[test]
    fn interleave_transposes_planes_into_lanes() {
        for (planes, hw) in [(16usize, 64usize), (40, 37), (3, 5)] {
            let x: Vec<f32> = (0..planes * hw).map(|i| i as f32).collect();
            let groups = planes.div_ceil(LANES);
            let mut out = vec![[f32::NAN; LANES]; groups * hw];
            interleave(&x, hw, &mut out);
            for (i, lanes) in out.iter().enumerate() {
                let (group, p) = (i / hw, i % hw);
                for (l, &got) in lanes.iter().enumerate() {
                    let c = group * LANES + l;
                    let want = if c < planes { x[c * hw + p] } else { 0.0 };
                    assert_eq!(got, want, "planes {planes}, hw {hw}: channel {c}, pixel {p}");
                }
            }
        }
    }

    /// The AVX2 copy on CPUs that would otherwise take the AVX-512 one.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_interleave_matches_the_scalar_one() {
        if !avx2() {
            eprintln!("skipped: this CPU has no AVX2");
            return;
        }
        for hw in [64usize, 37, 5, 8] {
            let x: Vec<f32> = (0..LANES * hw).map(|i| i as f32).collect();
            let mut want = vec![[f32::NAN; LANES]; hw];
            interleave_scalar(&x, hw, LANES, &mut want, 0);
            let mut got = vec![[f32::NAN; LANES]; hw];
            // SAFETY: the CPU has AVX2; `x` holds 16 planes of hw floats and `got` hw vectors.
            unsafe { x86::interleave_16_avx2(&x, hw, &mut got) };
            assert_eq!(got, want, "hw {hw}");
        }
    }
}

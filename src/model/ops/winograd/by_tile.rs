//! The input transform of large dilations read straight from the input planes, its lanes across tiles, writing
//! `V[ξ]` channel-major (`[c][tile]`), the layout the products read.
//!
//! The general path interleaves the chunk's channels into vectors of 16 ([`super::interleave`]), copies each
//! residue's padded sub-image out of that ([`super::PaddedSubImages::fill`]), transforms 16 channels at a time into
//! tile-major `V` and copies that channel-major for the gemm crate ([`super::by_channel`]): four passes over the
//! inputs. At ASPP's dilations (12, 24 and 36 on a 64×64 map) a sub-image is one tile, and the tiles of
//! neighbouring residues `rx, rx + 1, …` of one row read neighbouring pixels: pixel `(i, j)` of the tile of
//! residue `(ry, rx)` is `x[ry + d·(i − 1), rx + d·(j − 1)]`. So one vector load from a plane gives that pixel of
//! up to 16 consecutive tiles, zeros masked in where a tile's pixel is padding, and the transformed vectors are
//! those tiles' `V[ξ][c]`, stored whole into the channel-major rows. Taken at dilations 24 and 36 ([`suits`], with
//! the measurements); in DeepLabV3-ResNet-50's profile on the same Intel Xeon, three alternating rounds, ASPP's
//! dilation 24 64.6 / 59.3 / 58.9 → 61.7 / 58.4 / 57.0 ms and dilation 36 56.2 / 54.3 / 50.8 → 51.1 / 49.7 / 48.3.
//!
//! The same values reach the same transform arithmetic and the same products as on the general path, so the
//! results are the same bits.

use std::ops::Range;

use rayon::prelude::*;

use super::{padded_row, Algorithm, Class, Kind, Tile, LANES};
use crate::model::ops::conv_cpu::ConvGeometry;

/// Runs of consecutive tiles whose pixels lie side by side in the planes: tiles of one residue row (`ry`) at the
/// same tile position whose column residues `rx` follow one another. Each vector of [`LANES`] tiles (the list cut
/// into sixteens) loads each pixel as one masked load per run it holds; runs do not cross a vector's edge.
pub(super) fn runs(tiles: &[Tile]) -> Vec<Range<usize>> {
    let mut runs = Vec::new();
    let mut start = 0;
    for (i, tile) in tiles.iter().enumerate() {
        let continues = tiles
            .get(i + 1)
            .is_some_and(|next| (next.ry, next.ty, next.tx) == (tile.ry, tile.ty, tile.tx) && next.rx == tile.rx + 1)
            && (i + 1) % LANES != 0;
        if !continues {
            runs.push(start..i + 1);
            start = i + 1;
        }
    }
    runs
}

/// Whether a plan's inputs are transformed here: where the products read `V` channel-major (AVX-512, f32: see
/// [`super::by_channel::pays`]), where every tile is a whole sub-image of at most 3 pixels a side (F(3, 3) and the
/// 2- and 1-pixel algorithms: ASPP's dilations 24 and 36 on a 64×64 map), and where the runs hold at least
/// [`MIN_RUN`] tiles on average. Measured on 2 threads of an Intel Xeon (`lscpu` model 167), `bench_conv 2048 64 64
/// 256 3 1 d d --keep`, alternating in the same minutes: dilation 24 64.7 / 62.6 → 61.1 / 59.1 ms, dilation 36
/// 61.2 / 57.0 → 51.3 / 51.2. Dilation 12 (F(6×6, 3×3), 12 tiles a residue row: 64 masked loads a tile vector,
/// often two runs each) measured the same both ways, 58.4 / 59.0 against 60.3 / 56.1, and stays on the general
/// path, as do layer3's and layer4's dilations 2 and 4, whose sub-images hold several tiles (runs of one).
pub(super) fn suits(classes: &[Class]) -> bool {
    let small = |k: Kind| matches!(k, Kind::F3 | Kind::T2 | Kind::T1);
    super::by_channel::pays()
        && classes.iter().all(|c| {
            small(c.rows) && small(c.cols) && !c.tiles.is_empty() && runs(&c.tiles).len() * MIN_RUN <= c.tiles.len()
        })
}

/// The shortest mean run of tiles that [`suits`] takes.
const MIN_RUN: usize = 4;

/// Floats from one channel's row of `V[ξ]` to the next: a whole number of vectors plus one cache line (as
/// [`super::by_channel`]'s copy), so the rows are not a multiple of 4 KiB apart.
pub(super) fn row_stride(t: usize) -> usize {
    padded_row(t.next_multiple_of(LANES))
}

/// Floats from `V[ξ]` to `V[ξ + 1]` (`cc` rows each), one cache line more for the same reason.
pub(super) fn xi_stride(t: usize, cc: usize) -> usize {
    cc * row_stride(t) + LANES
}

/// `V[ξ][c][tile] = (Bᵀ·d·B)[ξ]` of every tile's input patch `d`, for the chunk's `cc` planes `x` (`[cc, H, W]`),
/// into `v` (`R²` matrices [`xi_stride`] apart, rows [`row_stride`] apart). Channels run in parallel.
pub(super) fn transform_inputs<Y: Algorithm, X: Algorithm>(
    g: &ConvGeometry,
    tiles: &[Tile],
    x: &[f32],
    cc: usize,
    v: &mut [f32],
) {
    let hw = g.h * g.w;
    let t = tiles.len();
    assert!(
        x.len() >= cc * hw,
        "by_tile: {} input values, not {cc} planes of {hw}",
        x.len()
    );
    assert!(
        v.len() >= Y::R * X::R * xi_stride(t, cc),
        "by_tile: V holds {} values",
        v.len()
    );
    assert!(
        super::avx512(),
        "by_tile runs only where the CPU has AVX-512F (`suits`)"
    );
    // Each run with its residue row's number of sub-image rows.
    let runs: Vec<(Range<usize>, usize)> = runs(tiles)
        .into_iter()
        .map(|run| {
            let sub_rows = (g.h - tiles[run.start].ry).div_ceil(g.dilation);
            (run, sub_rows)
        })
        .collect();
    let v = v.as_mut_ptr() as usize;
    (0..cc).into_par_iter().with_min_len(CHANNELS_PER_TASK).for_each(|c| {
        // The pixels a tile vector reads are d rows apart, scattered over the plane, so the hardware prefetchers
        // miss them and each masked load waited on memory (half of the dilation-12 transform's samples): the next
        // plane is asked for while this one is transformed.
        if c + 1 < cc {
            prefetch(&x[(c + 1) * hw..(c + 2) * hw]);
        }
        // SAFETY: the CPU has AVX-512F (asserted); the plane is inside `x` (asserted); this task writes row `c` of
        // every V[ξ], inside `v` (asserted), which no other task does.
        unsafe {
            x86::channel::<Y, X>(
                g,
                (tiles, &runs),
                &x[c * hw..(c + 1) * hw],
                (v as *mut f32).add(c * row_stride(t)),
                xi_stride(t, cc),
            )
        }
    });
}

/// Channels a task transforms one after another (so the plane prefetched for the next is its own).
const CHANNELS_PER_TASK: usize = 8;

/// Asks the cache for every line of `plane`.
fn prefetch(plane: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in plane.chunks(LANES) {
        // SAFETY: a prefetch only hints the cache; the address is inside `plane`.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(line.as_ptr() as *const i8) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = plane;
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::super::x86::Avx512;
    use super::super::{left, right, Algorithm, Tile, LANES, ZERO_BLOCK};
    use crate::model::ops::conv_cpu::ConvGeometry;

    /// One channel's row of every `V[ξ]`, at `v` (`V[0][c][0]`; `V[ξ]` `xi_stride` floats apart), from its
    /// `plane` (`[H, W]`), one vector of [`LANES`] tiles at a time, each pixel gathered run by run.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `v` must cover `R²` rows of the tiles' length, `xi_stride` apart; `runs` must
    /// be [`super::runs`] of `tiles`, each with its residue row's number of sub-image rows.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn channel<Y: Algorithm, X: Algorithm>(
        g: &ConvGeometry,
        (tiles, runs): (&[Tile], &[(Range<usize>, usize)]),
        plane: &[f32],
        v: *mut f32,
        xi_stride: usize,
    ) {
        assert_eq!(plane.len(), g.h * g.w);
        let d = g.dilation;
        let (mut patch, mut rows_done, mut transformed) = (ZERO_BLOCK, ZERO_BLOCK, ZERO_BLOCK);
        let mut next_run = 0;
        for start in (0..tiles.len()).step_by(LANES) {
            let end = (start + LANES).min(tiles.len());
            let first_run = next_run;
            while next_run < runs.len() && runs[next_run].0.end <= end {
                next_run += 1;
            }
            let vector_runs = &runs[first_run..next_run];
            for (a, patch_row) in patch.iter_mut().enumerate().take(Y::A) {
                for (b, value) in patch_row.iter_mut().enumerate().take(X::A) {
                    let mut vector = _mm512_setzero_ps();
                    for (run, sub_rows) in vector_runs {
                        let (run, sub_rows) = (run.clone(), *sub_rows);
                        let tile = tiles[run.start];
                        // Patch row a is sub-image row ty·M + a − 1 (−1: the padding above), column likewise.
                        let py = (tile.ty * Y::M + a).checked_sub(1).filter(|&py| py < sub_rows);
                        let px = (tile.tx * X::M + b).checked_sub(1);
                        let (Some(py), Some(px)) = (py, px) else { continue };
                        // The run's tile k reads column rx + k + d·px: inside the plane for the first `inside`.
                        let column = tile.rx + d * px;
                        let inside = g.w.saturating_sub(column).min(run.len());
                        let lane = run.start - start;
                        let mask = (((1u32 << inside) - 1) << lane) as __mmask16;
                        // SAFETY: masked-off lanes are not read; lane `lane + k` reads the run's tile k's pixel,
                        // inside the plane (row ry + d·py < H as py < sub_rows, column < W as counted).
                        let at = plane
                            .as_ptr()
                            .wrapping_add((tile.ry + d * py) * g.w + column)
                            .wrapping_sub(lane);
                        vector = _mm512_mask_loadu_ps(vector, mask, at);
                    }
                    _mm512_storeu_ps(value.as_mut_ptr(), vector);
                }
            }
            left::<Avx512>(&Y::BT, &patch, (Y::R, Y::A, X::A), &mut rows_done);
            right::<Avx512>(&rows_done, &X::BT, (Y::R, X::A, X::R), &mut transformed);
            let mask = ((1u32 << (end - start)) - 1) as __mmask16;
            for (r, row) in transformed.iter().enumerate().take(Y::R) {
                for (s, vector) in row.iter().enumerate().take(X::R) {
                    let xi = r * X::R + s;
                    // SAFETY (the caller's): V[ξ][c][start..end] is inside `v`'s rows.
                    _mm512_mask_storeu_ps(v.add(xi * xi_stride + start), mask, _mm512_loadu_ps(vector.as_ptr()));
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    use std::ops::Range;

    use super::super::{Algorithm, Tile};
    use crate::model::ops::conv_cpu::ConvGeometry;

    /// Never called: [`super::suits`] is false off x86_64.
    pub(super) unsafe fn channel<Y: Algorithm, X: Algorithm>(
        _: &ConvGeometry,
        _: (&[Tile], &[(Range<usize>, usize)]),
        _: &[f32],
        _: *mut f32,
        _: usize,
    ) {
        unreachable!("by_tile runs only on x86_64")
    }
}

#[cfg(test)]
mod tests {
    use super::super::{by_channel, classes, interleave, transform_inputs as general, v_stride, Lanes, F3, T1, T2};
    use super::*;
    use crate::model::ops::conv_cpu::tests::seeded;

    /// Both transforms of one class: the general path's tile-major `V` copied channel-major, and this path's;
    /// returns (general, here) as `[ξ][c][tile]` without the padding.
    fn both<Y: Algorithm, X: Algorithm>(g: &ConvGeometry, tiles: &[Tile], x: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let (cc, hw, t, r2) = (g.cin, g.h * g.w, tiles.len(), Y::R * X::R);
        let mut interleaved = vec![[0f32; LANES] as Lanes; cc.div_ceil(LANES) * hw];
        interleave(x, hw, &mut interleaved);
        let mut tile_major = vec![f32::NAN; r2 * v_stride(t, cc)];
        general::<Y, X>(g, tiles, &interleaved, cc, &mut tile_major);
        let mut here = vec![f32::NAN; r2 * xi_stride(t, cc)];
        transform_inputs::<Y, X>(g, tiles, x, cc, &mut here);
        let (mut want, mut got) = (Vec::new(), Vec::new());
        for xi in 0..r2 {
            let mut copy = vec![f32::NAN; cc * row_stride(t)];
            by_channel::transpose(
                &tile_major[xi * v_stride(t, cc)..][..t * cc],
                t,
                cc,
                &mut copy,
                row_stride(t),
            );
            for c in 0..cc {
                want.extend_from_slice(&copy[c * row_stride(t)..][..t]);
                got.extend_from_slice(&here[xi * xi_stride(t, cc) + c * row_stride(t)..][..t]);
            }
        }
        (want, got)
    }

    /// On ASPP-like dilations, with maps that leave 3-, 2- and 1-pixel sub-images, runs cut by the vectors' edges
    /// and a chunk of channels that is not a whole number of lane groups, the transform from the planes gives the
    /// same bits as the general path's, and the plans take it.
    #[test]
    fn the_transform_from_the_planes_gives_the_general_paths_bits() {
        if !super::super::avx512() {
            eprintln!("skipped: this CPU has no AVX-512F, so this path never runs here");
            return;
        }
        for (cin, h, w, d) in [(20usize, 62usize, 60usize, 24usize), (5, 60, 62, 36), (17, 50, 58, 36)] {
            let g = ConvGeometry::new((cin, h, w), (8, 3), 1, d, d).unwrap();
            let x = seeded(g.input_len(), 7);
            let plan = classes(&g, true);
            assert!(suits(&plan) || !by_channel::pays(), "{g:?} takes the general path");
            for class in &plan {
                let (want, got) = match (class.rows, class.cols) {
                    (Kind::F3, Kind::F3) => both::<F3, F3>(&g, &class.tiles, &x),
                    (Kind::F3, Kind::T2) => both::<F3, T2>(&g, &class.tiles, &x),
                    (Kind::T2, Kind::F3) => both::<T2, F3>(&g, &class.tiles, &x),
                    (Kind::T2, Kind::T2) => both::<T2, T2>(&g, &class.tiles, &x),
                    (Kind::T2, Kind::T1) => both::<T2, T1>(&g, &class.tiles, &x),
                    (Kind::T1, Kind::T2) => both::<T1, T2>(&g, &class.tiles, &x),
                    (Kind::T1, Kind::T1) => both::<T1, T1>(&g, &class.tiles, &x),
                    other => panic!("{g:?}: unexpected class {other:?}"),
                };
                assert!(want.iter().any(|&v| v != 0.0));
                let differ = want.iter().zip(&got).position(|(a, b)| a.to_bits() != b.to_bits());
                assert_eq!(differ, None, "{g:?}, class {:?}", (class.rows, class.cols));
            }
        }
    }

    /// Runs follow the residues along a row and stop at a new residue row, a gap and each vector's edge.
    #[test]
    fn runs_stop_at_rows_gaps_and_vector_edges() {
        let tile = |ry, rx| Tile { ry, rx, ty: 0, tx: 0 };
        let mut tiles: Vec<Tile> = (0..12).map(|rx| tile(0, rx)).collect();
        tiles.extend((0..6).map(|rx| tile(1, rx)));
        tiles.push(tile(1, 8));
        assert_eq!(runs(&tiles), vec![0..12, 12..16, 16..18, 18..19]);
    }
}

//! Convolutions with few columns per output pixel (`Cin·k²`), run one tile of output rows per task: the ResNet stem
//! (3·7² = 147), the strided 3×3 of layer2 (128·3² = 1152) and the strided 1×1 downsamples.
//!
//! [`super::conv_cpu`]'s im2col path builds the columns of many pixels at once in parallel (up to 8 MiB), then
//! multiplies them in parallel, and passes over the whole output for the bias and for the ReLU: each phase's data
//! went through memory, and the stem's 3 input channels made its products' `k` 98 and 49 (two channel chunks), so
//! the 16 MiB output was read and written twice by the products alone. Here each task builds its tile's columns
//! (within [`TILE_COLUMN_BYTES`], in L2), writes the product of all `Cin·k²` rows into `out` and adds the bias,
//! residual and ReLU while the tile is still in cache.

use std::cell::RefCell;

use gemm::Parallelism;
use rayon::prelude::*;

use super::conv_cpu::{at_least, fill_column_row, gemm_strided, Block, ConvGeometry, Epilogue};

/// A task's column buffer: it stays in L2 (1–2 MiB a core) with the product's tile.
const TILE_COLUMN_BYTES: usize = 512 << 10;

/// Fewer output pixels than this make the product too thin for the gemm micro-kernel (64 pixels a register tile).
const MIN_TILE_PIXELS: usize = 128;

thread_local! {
    static COLUMNS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Output rows per task where this path applies to `blocks` (the convolution's plan): one block over the whole
/// output, whose tiles' columns fit [`TILE_COLUMN_BYTES`] (twice that for tiles of [`MIN_TILE_PIXELS`]).
pub(crate) fn rows_per_task(g: &ConvGeometry, blocks: &[Block]) -> Option<usize> {
    let [block] = blocks else { return None };
    if block.out_rows != (0..g.oh)
        || block.out_cols != (0..g.ow)
        || block.tap_rows.len() * block.tap_cols.len() != g.k * g.k
    {
        return None;
    }
    let row_bytes = g.cin * g.k * g.k * g.ow * size_of::<f32>();
    let rows = (TILE_COLUMN_BYTES / row_bytes.max(1))
        .max(MIN_TILE_PIXELS.div_ceil(g.ow))
        .min(g.oh);
    // Thin tiles may take up to twice the budget (layer2's 3×3/2: two rows of 64 pixels, 576 KiB).
    (rows * row_bytes <= 2 * TILE_COLUMN_BYTES).then_some(rows)
}

/// `out = epilogue(W ⊛ x)` for one image (`x` `[Cin, H, W]`, `weight` `[Cout, Cin, k, k]`, `out` `[Cout, oh, ow]`),
/// `rows` output rows per task (from [`rows_per_task`], whose `block` this is). Every element of `out` is written.
pub(crate) fn conv2d(
    g: &ConvGeometry,
    block: &Block,
    rows: usize,
    (x, weight): (&[f32], &[f32]),
    epilogue: Epilogue,
    out: &mut [f32],
) {
    assert_eq!(out.len(), g.output_len(), "row_tiles: output length");
    assert_eq!(weight.len(), g.weight_len(), "row_tiles: weight length");
    let (plane, taps) = (g.oh * g.ow, block.taps());
    // Rows of the columns in the weight's own (c, ky, kx) order.
    let depth = g.cin * taps.len();
    let out_at = out.as_mut_ptr() as usize;
    (0..g.oh.div_ceil(rows)).into_par_iter().for_each(|t| {
        let tile = t * rows..((t + 1) * rows).min(g.oh);
        let (from, npix) = (tile.start * g.ow, tile.len() * g.ow);
        COLUMNS.with_borrow_mut(|columns| {
            let columns = at_least(columns, depth * npix);
            for (row, col) in columns.chunks_mut(npix).enumerate() {
                let (c, tap) = (row / taps.len(), row % taps.len());
                fill_column_row(g, block, &taps, c, tap, tile.clone(), &[x], col);
            }
            // SAFETY: `out` is [cout, plane] (asserted); this tile's pixels from..from + npix of each channel are
            // written by this task alone; `weight` is [cout, depth] row-major (asserted), `columns` [depth, npix].
            // The product runs on this thread (`Parallelism::None`), so the borrow of `columns` is not re-entered.
            unsafe {
                gemm_strided(
                    (g.cout, npix, depth),
                    ((out_at as *mut f32).add(from), plane, 1),
                    (weight.as_ptr(), depth, 1),
                    (columns.as_ptr(), npix, 1),
                    false,
                    Parallelism::None,
                )
            };
        });
        if !epilogue.is_identity() {
            for co in 0..g.cout {
                // SAFETY: as above, this task's pixels of channel `co`.
                let o = unsafe { std::slice::from_raw_parts_mut((out_at as *mut f32).add(co * plane + from), npix) };
                epilogue.finish(co, plane, from, o);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::super::conv_cpu::plan;
    use super::*;

    fn rows(g: (usize, usize, usize), (cout, k): (usize, usize), stride: usize, padding: usize) -> Option<usize> {
        let g = ConvGeometry::new(g, (cout, k), stride, padding, 1).unwrap();
        rows_per_task(&g, &plan(&g))
    }

    // The cases of `conv_cpu::tests::matches_the_definition_for_every_plan` check the results; these check which
    // convolutions come here.
    #[test]
    fn takes_resnets_stem_and_strided_convolutions() {
        // The stem at 512²: 147 columns a pixel, 256 pixels a row, 3 rows a task.
        assert_eq!(rows((3, 512, 512), (64, 7), 2, 3), Some(3));
        // layer2's 3×3/2 at 128² → 64²: 1152 columns a pixel, 64 pixels a row, two rows a task.
        assert_eq!(rows((128, 128, 128), (128, 3), 2, 1), Some(2));
        // layer2's 1×1/2 downsample.
        assert_eq!(rows((256, 128, 128), (512, 1), 2, 0), Some(8));
        // The test cases that take this path (three and two tasks)...
        assert_eq!(rows((3, 100, 96), (8, 7), 2, 3), Some(18));
        assert_eq!(rows((40, 50, 46), (6, 3), 2, 1), Some(15));
        // ...and the one that does not: the four rows of 40 pixels that make 128 would hold 1.7 MiB of columns.
        assert_eq!(rows((300, 9, 80), (4, 3), 2, 1), None);
        // Dilated convolutions with padded taps to skip run as several blocks elsewhere.
        let g = ConvGeometry::new((16, 12, 11), (5, 3), 1, 4, 4).unwrap();
        assert!(plan(&g).len() > 1 && rows_per_task(&g, &plan(&g)).is_none());
    }
}

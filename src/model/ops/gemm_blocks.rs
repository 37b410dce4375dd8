//! How a packed product's result is cut into tasks; shared by [`super::gemm_f32`] and [`super::gemm_bf16`].

use std::ops::Range;

use rayon::prelude::*;

/// Calls `block(row_panels, column_block)` once for every block of a result of `panels` row panels (of the
/// micro-kernel's height) by `col_blocks` column blocks, on rayon's threads when `parallel`.
///
/// Each column block is a task; when there are too few of them to give every thread four tasks, the row panels are
/// split too (in runs of at least four panels), so a thread slowed by other work does not hold up the product.
pub(crate) fn for_each_block(
    panels: usize,
    col_blocks: usize,
    parallel: bool,
    block: impl Fn(Range<usize>, usize) + Sync,
) {
    let threads = if parallel { rayon::current_num_threads() } else { 1 };
    let row_tasks = if threads > 1 {
        (4 * threads)
            .div_ceil(col_blocks.max(1))
            .clamp(1, panels.div_ceil(4).max(1))
    } else {
        1
    };
    let per_row_task = panels.div_ceil(row_tasks);
    let run = |t: usize| {
        let (rt, ct) = (t / col_blocks, t % col_blocks);
        let rows = rt * per_row_task..((rt + 1) * per_row_task).min(panels);
        if !rows.is_empty() {
            block(rows, ct);
        }
    };
    let tasks = row_tasks * col_blocks;
    if threads > 1 && tasks > 1 {
        (0..tasks).into_par_iter().for_each(run);
    } else {
        (0..tasks).for_each(run);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    fn blocks(panels: usize, col_blocks: usize, parallel: bool) -> Vec<(Range<usize>, usize)> {
        let seen = Mutex::new(Vec::new());
        for_each_block(panels, col_blocks, parallel, |rows, ct| {
            seen.lock().unwrap().push((rows, ct))
        });
        let mut seen = seen.into_inner().unwrap();
        seen.sort_by_key(|(rows, ct)| (*ct, rows.start));
        seen
    }

    #[test]
    fn every_panel_of_every_column_block_is_visited_once() {
        for (panels, col_blocks) in [(1, 1), (3, 1), (43, 1), (43, 2), (7, 9), (100, 3), (0, 4)] {
            for parallel in [false, true] {
                let mut covered = vec![0u32; panels * col_blocks];
                for (rows, ct) in blocks(panels, col_blocks, parallel) {
                    assert!(!rows.is_empty(), "empty block");
                    rows.for_each(|p| covered[ct * panels + p] += 1);
                }
                assert!(
                    covered.iter().all(|&c| c == 1),
                    "{panels}×{col_blocks} parallel={parallel}: {covered:?}"
                );
            }
        }
    }

    #[test]
    fn one_thread_runs_whole_column_blocks() {
        assert_eq!(blocks(43, 2, false), vec![(0..43, 0), (0..43, 1)]);
    }
}

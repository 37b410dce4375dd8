//! Winograd's transformed weights kept across calls, for convolutions whose weights never change (an inference
//! model's folded convolutions), or across the images of one batch (a training step's forward pass and input
//! gradient, which run the kernel image by image with one weight).
//!
//! Transformed on each call, a class's `U` is R²·Cout·Cin floats written out and read back by the products: 134 MB
//! for ASPP's dilation 12 at 512². Where a class has few tiles, that pass is a large share of the convolution
//! (about a fifth of ASPP's dilation 12, a quarter of FCN's head, more at dilation 36). So a folded convolution's
//! classes keep their `U` from the first call on, within a process-wide budget (`SEMSEG_KEPT_WEIGHTS_MB`, default
//! 512 MiB; 0 keeps none), so memory stays bounded whatever the image sizes served. The products read the kept `U`
//! exactly as the per-call one: the same floats, so the same results.
//!
//! A folded 1×1 convolution keeps its weight packed for the AVX-512 kernel here too ([`KeptWeights::pointwise`]),
//! outside the budget: that copy is the weight's own size, whatever the images.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use super::super::pointwise_avx512::PackedWeight;
use super::{aligned, padded_row, transform_weights, Class, ConvGeometry, Kind, F3, F4, F6, T1, T2};

/// Keep a class's `U` only when the class has at least this many tiles. On small maps (the server's 128²
/// warm-up, thumbnails) the whole convolution costs little: keeping their `U` would spend the budget on sizes that
/// do not need it (the warm-up alone would have kept 250 MB of DeepLabV3's). Above it, every class measured paid
/// for its memory, about 0.1 ms a MB per call or more on 2 Zen 4 threads at 512² (`bench_conv --keep`): ASPP's
/// dilation 12 12 ms for 134 MB, layer4's F(4×4) 4 ms for 38 MB, layer3's 1.5 ms for 9 MB, and most where the
/// algorithms multiply least (dilation 36's 2- and 1-pixel classes: 11 ms for 31 MB), where a per-pair cost
/// dominates the transform.
const MIN_TILES: usize = 64;

/// The budget when `SEMSEG_KEPT_WEIGHTS_MB` is not set: DeepLabV3-ResNet-50 keeps about 410 MiB at 512², FCN 280,
/// PSPNet 490. The heads of FCN and PSPNet (2048 and 4096 input channels) take F(4×4) tiles, whose `U` (151 and
/// 302 MB) is 36/64 of F(6×6)'s; PSPNet's with F(6×6) (537 MB) stayed transformed on each call.
const DEFAULT_BUDGET_MB: usize = 512;

/// Bytes kept by every [`KeptWeights`] of the process.
static KEPT_BYTES: AtomicUsize = AtomicUsize::new(0);

/// The process-wide budget in bytes, read once from `SEMSEG_KEPT_WEIGHTS_MB`.
fn budget() -> usize {
    static BUDGET: OnceLock<usize> = OnceLock::new();
    *BUDGET.get_or_init(|| {
        let mb = match std::env::var("SEMSEG_KEPT_WEIGHTS_MB") {
            Err(_) => DEFAULT_BUDGET_MB,
            Ok(v) => v.trim().parse().unwrap_or_else(|_| {
                tracing::warn!(
                    value = %v,
                    "SEMSEG_KEPT_WEIGHTS_MB is not a whole number of MiB: keeping up to {DEFAULT_BUDGET_MB} MiB"
                );
                DEFAULT_BUDGET_MB
            }),
        };
        mb.saturating_mul(1 << 20)
    })
}

/// One convolution's kept transforms, by pair of algorithms, made on first use. Belongs to one weight (the first
/// one it is called with; any other gets nothing kept), so it must live with a weight that never changes.
#[derive(Default)]
pub struct KeptWeights {
    /// Where the weight's floats were on the first call.
    weight_at: OnceLock<usize>,
    classes: Mutex<Vec<(Pair, Arc<Slot>)>>,
    /// A 1×1 convolution's weight packed for the AVX-512 kernel ([`KeptWeights::pointwise`]).
    pointwise: OnceLock<PackedWeight>,
    /// Kept for one batch ([`KeptWeights::for_one_batch`]), not for the process.
    batch: bool,
    /// Bytes kept by this batch's transforms ([`BATCH_BUDGET`]).
    batch_bytes: AtomicUsize,
}

/// The most one batch's transforms keep: 256 MiB, ASPP's three dilated convs and layer4's at any crop (134 MB at
/// most), FCN's head (151 MB). PSPNet's (302 MB) stays transformed per image and chunk, so that training's peak
/// memory does not grow by its `U`.
const BATCH_BUDGET: usize = 256 << 20;

impl std::fmt::Debug for KeptWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let classes = self.classes.lock().map(|c| c.len()).unwrap_or(0);
        f.debug_struct("KeptWeights").field("classes", &classes).finish()
    }
}

/// One class's kept transform, once made: `None` where the budget did not allow it.
type Slot = OnceLock<Option<Arc<Transformed>>>;

/// The algorithms along rows and columns.
type Pair = (Kind, Kind);

/// `U[co][ξ][c]` of every input channel of one class, rows `padded_row(R²·Cin)` apart, from a 64-byte boundary.
pub(crate) struct Transformed {
    buf: Vec<f32>,
    start: usize,
    len: usize,
    /// Counted in [`KEPT_BYTES`] until dropped (0 for a batch's).
    bytes: usize,
}

impl Transformed {
    pub(crate) fn u(&self) -> &[f32] {
        &self.buf[self.start..self.start + self.len]
    }
}

impl Drop for Transformed {
    fn drop(&mut self) {
        KEPT_BYTES.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl KeptWeights {
    /// Transforms kept while one batch's images are convolved with one weight, then dropped with it: every class
    /// is kept (each image after the first reuses it), outside the process's budget (the memory lasts one call)
    /// but within [`BATCH_BUDGET`].
    /// Transformed per image, a training step's weight transforms took 4.6% of DeepLabV3-ResNet-50's step at batch
    /// 2 on an Intel Xeon (ASPP's dilation 12 alone writes 134 MB of `U` per transform).
    pub(crate) fn for_one_batch() -> Self {
        Self {
            batch: true,
            ..Self::default()
        }
    }

    /// The kept `U` of `class` for `weight` (`[Cout, Cin, 3, 3]`), transformed now if this is its first use;
    /// `None` where keeping does not pay, the budget is spent, or `weight` is not the one this belongs to.
    pub(crate) fn get(&self, g: &ConvGeometry, class: &Class, weight: &[f32]) -> Option<Arc<Transformed>> {
        if !(self.batch || worth_keeping(class)) || !self.belongs_to(weight) {
            return None;
        }
        let cell = {
            let mut classes = self.classes.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let key = (class.rows, class.cols);
            match classes.iter().find(|(k, _)| *k == key) {
                Some((_, cell)) => cell.clone(),
                None => {
                    let cell = Arc::new(OnceLock::new());
                    classes.push((key, cell.clone()));
                    cell
                }
            }
        };
        // Concurrent first calls wait for one transform rather than each making its own.
        cell.get_or_init(|| {
            if self.batch && !reserve(&self.batch_bytes, transformed_bytes(g, class), BATCH_BUDGET) {
                return None;
            }
            transform_all(g, class, weight, !self.batch)
        })
        .clone()
    }

    /// A 1×1 convolution's weight (`[Cout, Cin]`) packed for [`super::super::pointwise_avx512`], made on first
    /// use; `None` if `weight` is not the one this belongs to. Not counted in the budget: it is the size of the
    /// weight itself whatever the images (about 50 MB for a ResNet-50 network's 1×1 convolutions), and packing it
    /// on every call took about 0.8% of DeepLabV3-ResNet-50's inference on an Intel Xeon.
    pub(crate) fn pointwise(&self, weight: &[f32], cout: usize, cin: usize) -> Option<&PackedWeight> {
        self.belongs_to(weight)
            .then(|| self.pointwise.get_or_init(|| PackedWeight::new(weight, cout, cin)))
    }

    /// Whether `weight` is the one this was first called with.
    fn belongs_to(&self, weight: &[f32]) -> bool {
        *self.weight_at.get_or_init(|| weight.as_ptr() as usize) == weight.as_ptr() as usize
    }
}

/// Whether the class is large enough to keep its `U` ([`MIN_TILES`]).
fn worth_keeping(class: &Class) -> bool {
    class.tiles.len() >= MIN_TILES
}

/// Counts `bytes` into `kept` if that stays within `limit`.
fn reserve(kept: &AtomicUsize, bytes: usize, limit: usize) -> bool {
    kept.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |now| {
        now.checked_add(bytes).filter(|&total| total <= limit)
    })
    .is_ok()
}

/// Floats of the class's `U` for all input channels.
fn transformed_len(g: &ConvGeometry, class: &Class) -> usize {
    g.cout * padded_row(class.rows.products() * class.cols.products() * g.cin)
}

/// Bytes a kept `U` takes (`aligned` may skip up to one cache line).
fn transformed_bytes(g: &ConvGeometry, class: &Class) -> usize {
    (transformed_len(g, class) + super::LANES) * std::mem::size_of::<f32>()
}

/// The class's `U` for all input channels, if the budget allows it (with `budgeted`; otherwise uncounted).
fn transform_all(g: &ConvGeometry, class: &Class, weight: &[f32], budgeted: bool) -> Option<Arc<Transformed>> {
    let len = transformed_len(g, class);
    let mut bytes = transformed_bytes(g, class);
    if !budgeted {
        bytes = 0;
    } else if !reserve(&KEPT_BYTES, bytes, budget()) {
        tracing::debug!(bytes, "Winograd weights not kept: over SEMSEG_KEPT_WEIGHTS_MB");
        return None;
    }
    let mut buf = Vec::new();
    let u = aligned(&mut buf, len);
    dispatch!(class, transform_weights(g, weight, 0..g.cin, u));
    let start = u.as_ptr() as usize - buf.as_ptr() as usize;
    Some(Arc::new(Transformed {
        start: start / std::mem::size_of::<f32>(),
        buf,
        len,
        bytes,
    }))
}

#[cfg(test)]
mod tests {
    use super::super::plan;
    use super::*;
    use crate::model::ops::conv_cpu::tests::seeded;
    use crate::model::ops::conv_cpu::{conv2d_image, Epilogue, Scratch};

    /// ASPP's dilation 12 on a 64×64 map with 256 output channels (144 tiles of F(6×6), kept), on few input
    /// channels so the test stays quick.
    fn aspp_like() -> ConvGeometry {
        ConvGeometry::new((24, 64, 64), (256, 3), 1, 12, 12).unwrap()
    }

    fn convolve(g: &ConvGeometry, x: &[f32], w: &[f32], kept: Option<&KeptWeights>) -> Vec<f32> {
        let bias = seeded(g.cout, 3);
        let epilogue = Epilogue {
            bias: Some(&bias),
            residual: None,
            relu: true,
        };
        let mut out = vec![0f32; g.output_len()];
        conv2d_image(g, x, (w, kept), epilogue, &mut out, &mut Scratch::default());
        out
    }

    #[test]
    fn kept_weights_give_the_same_bits_as_transforming_on_each_call() {
        let g = aspp_like();
        let (x, w) = (seeded(g.input_len(), 1), seeded(g.weight_len(), 2));
        let plan = plan(&g, usize::MAX).expect("Winograd applies");
        assert!(plan.classes.iter().any(worth_keeping), "the test's class must be kept");
        let fresh = convolve(&g, &x, &w, None);
        let kept = KeptWeights::default();
        let first = convolve(&g, &x, &w, Some(&kept));
        assert_eq!(kept.classes.lock().unwrap().len(), 1, "one class kept: {kept:?}");
        let second = convolve(&g, &x, &w, Some(&kept));
        assert!(fresh == first && first == second, "kept weights changed the result");
    }

    /// A batch's transforms: every class kept, however few its tiles, outside the process's budget, and the same
    /// bits as transforming on each call.
    #[test]
    fn a_batch_keeps_every_class_outside_the_budget() {
        // Dilation 12 on a 64×40 map: sub-images of 6 rows (F(6, 3)) by 4 or 3 columns (F(4, 3), F(3, 3)), classes
        // of 48 and 96 tiles.
        let g = ConvGeometry::new((24, 64, 40), (256, 3), 1, 12, 12).unwrap();
        let plan = plan(&g, usize::MAX).expect("Winograd applies");
        assert!(
            plan.classes.iter().any(|c| !worth_keeping(c)),
            "the test needs a class the process would not keep"
        );
        let (x, w) = (seeded(g.input_len(), 1), seeded(g.weight_len(), 2));
        let fresh = convolve(&g, &x, &w, None);
        let batch = KeptWeights::for_one_batch();
        let first = convolve(&g, &x, &w, Some(&batch));
        let kept: Vec<(Pair, Option<usize>)> = {
            let classes = batch.classes.lock().unwrap();
            classes
                .iter()
                .map(|(pair, slot)| (*pair, slot.get().and_then(Option::as_ref).map(|t| t.bytes)))
                .collect()
        };
        assert_eq!(kept.len(), plan.classes.len(), "every class kept: {kept:?}");
        assert!(
            kept.iter().all(|(_, bytes)| *bytes == Some(0)),
            "kept, and not counted in the budget: {kept:?}"
        );
        let second = convolve(&g, &x, &w, Some(&batch));
        assert!(fresh == first && first == second, "kept weights changed the result");
    }

    /// PSPNet's head (4096 → 512 channels at 64², one F(4×4) class of 302 MB) is over a batch's budget: not kept,
    /// nothing reserved.
    #[test]
    fn a_batch_keeps_nothing_over_its_budget() {
        let g = ConvGeometry::new((4096, 64, 64), (512, 3), 1, 1, 1).unwrap();
        let plan = plan(&g, usize::MAX).expect("Winograd applies");
        let class = &plan.classes[0];
        assert!(transformed_bytes(&g, class) > BATCH_BUDGET);
        let w = vec![0f32; g.weight_len()];
        let batch = KeptWeights::for_one_batch();
        assert!(batch.get(&g, class, &w).is_none());
        assert_eq!(batch.batch_bytes.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn another_weight_is_not_served_the_kept_one() {
        let g = aspp_like();
        let x = seeded(g.input_len(), 1);
        let (w1, w2) = (seeded(g.weight_len(), 2), seeded(g.weight_len(), 4));
        let kept = KeptWeights::default();
        convolve(&g, &x, &w1, Some(&kept));
        assert_eq!(convolve(&g, &x, &w2, Some(&kept)), convolve(&g, &x, &w2, None));
    }

    /// A folded 1×1 convolution keeps its packed weight (on AVX-512 CPUs, where the kernel that reads it runs):
    /// the same bits as packing on each call, and another weight still gets its own.
    #[test]
    fn a_pointwise_convolution_keeps_its_packed_weight() {
        // 40 output channels: six full panels and a partial one of the kernel's 6.
        let g = ConvGeometry::new((24, 9, 11), (40, 1), 1, 0, 1).unwrap();
        let x = seeded(g.input_len(), 1);
        let (w1, w2) = (seeded(g.weight_len(), 2), seeded(g.weight_len(), 4));
        let fresh = convolve(&g, &x, &w1, None);
        let kept = KeptWeights::default();
        let first = convolve(&g, &x, &w1, Some(&kept));
        assert_eq!(
            kept.pointwise.get().is_some(),
            crate::model::ops::pointwise_avx512::available(),
            "packed and kept where the AVX-512 kernel runs"
        );
        let second = convolve(&g, &x, &w1, Some(&kept));
        assert!(
            fresh == first && first == second,
            "the kept packed weight changed the result"
        );
        assert_eq!(convolve(&g, &x, &w2, Some(&kept)), convolve(&g, &x, &w2, None));
    }

    /// Floats of `U` that a convolution of this geometry would keep.
    fn kept_floats(g: &ConvGeometry) -> usize {
        let plan = plan(g, usize::MAX).expect("Winograd applies");
        let kept = plan.classes.iter().filter(|c| worth_keeping(c));
        kept.map(|c| c.rows.products() * c.cols.products() * g.cout * g.cin)
            .sum()
    }

    #[test]
    fn small_maps_keep_little() {
        // The server's 128² warm-up: ASPP's map is 16², its sub-images 1–2 pixels; only the 1-pixel ones (the
        // centre tap, 64 tiles) are kept, no more floats than the weight itself.
        let warm_up = ConvGeometry::new((24, 16, 16), (256, 3), 1, 12, 12).unwrap();
        assert!(kept_floats(&warm_up) <= warm_up.weight_len());
        // Layer4 at 512²: 256 tiles of F(4×4), kept whole (36 products per channel pair).
        let layer4 = ConvGeometry::new((64, 64, 64), (512, 3), 1, 4, 4).unwrap();
        assert_eq!(kept_floats(&layer4), 36 * 512 * 64);
        assert!(kept_floats(&aspp_like()) > 0);
    }

    #[test]
    fn the_budget_is_never_exceeded() {
        let kept = AtomicUsize::new(0);
        assert!(reserve(&kept, 60, 100));
        assert!(!reserve(&kept, 41, 100));
        assert!(reserve(&kept, 40, 100));
        assert!(!reserve(&kept, usize::MAX, 100));
        assert_eq!(kept.load(Ordering::Relaxed), 100);
    }
}

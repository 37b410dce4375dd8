//! Planning: the validated options and the geometry derived from them (per split, the grid of cells that holds the
//! guaranteed shapes; the radius ranges; the hue jitter; the label encoding).

use super::error::SynthError;
use super::label_map::encoding;
use super::{LabelMapStyle, SynthOptions};

/// Per-split layout.
pub(super) struct SplitPlan {
    pub(super) image_dir: &'static str,
    pub(super) annotation_dir: &'static str,
    pub(super) count: usize,
    /// Global index of the split's first image (stems are numbered across splits: `img_<first_index + i>`).
    pub(super) first_index: usize,
    /// Guaranteed shapes per image (so that every class appears in the split).
    pub(super) per_image: usize,
    /// Grid of cells for the guaranteed shapes.
    pub(super) grid: (usize, usize),
    /// Largest bounding radius of a shape that fits a cell with its border.
    pub(super) cell_max_radius: f32,
}

pub(super) struct Plan {
    pub(super) seed: u64,
    pub(super) width: usize,
    pub(super) height: usize,
    pub(super) num_classes: usize,
    /// Half the ignore-band width.
    pub(super) half_border: f32,
    /// Smallest shape bounding radius that still leaves an interior (label) region inside the border.
    pub(super) min_radius: f32,
    /// Bounding-radius range of the free (randomly placed) shapes.
    pub(super) free_radius: (f32, f32),
    pub(super) hue_jitter: f32,
    pub(super) jpeg_quality: u8,
    pub(super) encoding: Vec<u8>,
    pub(super) splits: [SplitPlan; 2],
}

/// Every shape kind contains a disc of radius ≥ `bounding radius / MIN_RADIUS_FACTOR` (the triangle is the thinnest),
/// and that disc must be wider than the border band plus 1.5 px so that some pixel centre gets the class label.
const MIN_RADIUS_FACTOR: f32 = 2.7;

impl Plan {
    pub(super) fn new(opts: &SynthOptions) -> Result<Plan, SynthError> {
        let invalid = |option: &'static str, value: String, reason: &str| SynthError::InvalidOption {
            option,
            value,
            reason: reason.to_string(),
        };
        if opts.out.as_os_str().is_empty() {
            return Err(invalid("out", "\"\"".into(), "an output directory is required"));
        }
        if !(2..=254).contains(&opts.num_classes) {
            return Err(invalid(
                "num-classes",
                opts.num_classes.to_string(),
                "must be 2..=254 (background class 0 included)",
            ));
        }
        for (option, value) in [
            ("train-count", opts.train_count),
            ("validation-count", opts.validation_count),
        ] {
            if value == 0 {
                return Err(invalid(
                    option,
                    "0".into(),
                    "must be at least 1 (SageMaker requires both channels)",
                ));
            }
        }
        for (option, value) in [("width", opts.width), ("height", opts.height)] {
            if !(16..=8192).contains(&value) {
                return Err(invalid(option, value.to_string(), "must be 16..=8192 px"));
            }
        }
        if !(1..=100).contains(&opts.jpeg_quality) {
            return Err(invalid(
                "jpeg-quality",
                opts.jpeg_quality.to_string(),
                "must be 1..=100",
            ));
        }
        if opts.border > 64 {
            return Err(invalid("border", opts.border.to_string(), "must be 0..=64 px"));
        }
        let shape_classes = opts.num_classes - 1;
        if opts.label_map == LabelMapStyle::Scale
            && (opts.label_scale == 0 || shape_classes as u64 * opts.label_scale as u64 > 254)
        {
            return Err(invalid(
                "label-scale",
                opts.label_scale.to_string(),
                &format!(
                    "must be ≥ 1 with (num_classes − 1) × scale ≤ 254 so that no label encodes to 255 or overflows; \
                     with {} classes the largest scale is {}",
                    opts.num_classes,
                    254 / shape_classes
                ),
            ));
        }

        let encoding = encoding(opts);
        let half_border = opts.border as f32 / 2.0;
        let min_radius = MIN_RADIUS_FACTOR * (half_border + 1.5);
        let short = opts.width.min(opts.height) as f32;
        let free_radius = (min_radius.max(0.10 * short), min_radius.max(0.28 * short));
        let spacing = 360.0 / shape_classes as f32;
        let hue_jitter = (0.3 * spacing).min(12.0);

        let mut splits = Vec::with_capacity(2);
        let mut first_index = 0;
        for (name, image_dir, annotation_dir, count) in [
            ("train", "train", "train_annotation", opts.train_count),
            (
                "validation",
                "validation",
                "validation_annotation",
                opts.validation_count,
            ),
        ] {
            let per_image = (shape_classes as usize).div_ceil(count as usize);
            let (grid, cell_w, cell_h) = best_grid(per_image, opts.width as usize, opts.height as usize);
            let cell_max_radius = cell_w.min(cell_h) / 2.0 - half_border - 1.0;
            if cell_max_radius < min_radius {
                return Err(SynthError::ImagesTooSmall {
                    width: opts.width,
                    height: opts.height,
                    shape_classes,
                    split: name,
                    count,
                    per_image,
                    cell_width: cell_w as u32,
                    cell_height: cell_h as u32,
                    border: opts.border,
                    min_cell: (2.0 * (min_radius + half_border + 1.0)).ceil() as u32,
                });
            }
            splits.push(SplitPlan {
                image_dir,
                annotation_dir,
                count: count as usize,
                first_index,
                per_image,
                grid,
                cell_max_radius,
            });
            first_index += count as usize;
        }
        let splits: [SplitPlan; 2] = splits.try_into().ok().expect("two splits");

        Ok(Plan {
            seed: opts.seed,
            width: opts.width as usize,
            height: opts.height as usize,
            num_classes: opts.num_classes as usize,
            half_border,
            min_radius,
            free_radius,
            hue_jitter,
            jpeg_quality: opts.jpeg_quality,
            encoding,
            splits,
        })
    }
}

/// The grid (columns, rows) with at least `cells` cells whose smallest cell side is largest, and that cell's size.
fn best_grid(cells: usize, width: usize, height: usize) -> ((usize, usize), f32, f32) {
    let mut best = ((1, 1), width as f32, height as f32);
    let mut best_side = f32::MIN;
    for cols in 1..=cells.max(1) {
        let rows = cells.div_ceil(cols).max(1);
        let (w, h) = (width as f32 / cols as f32, height as f32 / rows as f32);
        if w.min(h) > best_side {
            best_side = w.min(h);
            best = ((cols, rows), w, h);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::*;
    use std::path::PathBuf;

    #[test]
    fn invalid_options_are_refused_naming_the_option() {
        let tmp = tempfile::tempdir().unwrap();
        let base = small(tmp.path());
        let cases = [
            (
                SynthOptions {
                    num_classes: 1,
                    ..base.clone()
                },
                "--num-classes",
            ),
            (
                SynthOptions {
                    num_classes: 255,
                    ..base.clone()
                },
                "--num-classes",
            ),
            (
                SynthOptions {
                    train_count: 0,
                    ..base.clone()
                },
                "--train-count",
            ),
            (
                SynthOptions {
                    validation_count: 0,
                    ..base.clone()
                },
                "--validation-count",
            ),
            (
                SynthOptions {
                    width: 8,
                    ..base.clone()
                },
                "--width",
            ),
            (
                SynthOptions {
                    jpeg_quality: 0,
                    ..base.clone()
                },
                "--jpeg-quality",
            ),
            (
                SynthOptions {
                    label_map: LabelMapStyle::Scale,
                    label_scale: 85,
                    ..base.clone()
                },
                "--label-scale",
            ),
            (
                SynthOptions {
                    out: PathBuf::new(),
                    ..base.clone()
                },
                "--out",
            ),
            (
                SynthOptions {
                    num_classes: 254,
                    validation_count: 1,
                    ..base.clone()
                },
                "--width/--height",
            ),
        ];
        for (o, needle) in cases {
            let err = generate(&o).unwrap_err();
            assert!(err.to_string().contains(needle), "{needle}: {err}");
        }
        assert!(
            !tmp.path().join("train").exists(),
            "nothing written for invalid options"
        );
        // The largest allowed scale still works: 3 × 84 = 252.
        generate(&SynthOptions {
            label_map: LabelMapStyle::Scale,
            label_scale: 84,
            ..base
        })
        .unwrap();
    }
}

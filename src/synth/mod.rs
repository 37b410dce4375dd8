//! `semseg synth`: a seeded generator of a complete SageMaker-layout semantic-segmentation dataset.
//!
//! [`generate`] writes, under `--out`:
//!
//! ```text
//! train/img_00000.jpg ...              RGB JPEG images
//! train_annotation/img_00000.png ...   8-bit palette (mode P) PNGs, same stems
//! validation/img_00048.jpg ...
//! validation_annotation/img_00048.png ...
//! label_map/train_label_map.json       {"scale": "1"} | {"scale": "<s>"} | {"map": {"0": p0, "1": p1, ...}}
//! label_map/validation_label_map.json  (the same content)
//! ```
//!
//! so `semseg synth --out ML_ROOT/input/data` makes a ready training job.
//!
//! Content: class 0 is a textured background (gradient, stripes or blotchy noise, all of low saturation); class `k ≥ 1`
//! is a shape whose kind cycles disc, rectangle, triangle, ring, ellipse, cross (class 7 is a disc again, ...) painted
//! in a saturated class-typical hue (classes are spread evenly around the colour wheel) ± a small jitter, with random
//! size, position, rotation and shading. Later shapes cover earlier ones. Image and annotation come from the same
//! signed-distance rasterisation, so they agree pixel for pixel: a pixel whose centre lies inside a shape by more than
//! `border / 2` px gets the shape's label, one within `border / 2` px of a visible edge gets 255 (ignore), as in
//! PASCAL VOC. The annotation pixel is the *encoded* label (see [`LabelMapStyle`]); the PNG palette is VOC's, so
//! index 255 shows as a light beige.
//!
//! Every class appears in both splits: image `i` of a split of `n` images always shows, on top of everything else and
//! in disjoint cells of the image, the classes `1 + (i + j·n) mod (num_classes − 1)` for `j < ⌈(num_classes − 1)/n⌉`.
//! Options that leave those cells too small to hold a shape are refused up front.
//!
//! Determinism: every image draws from its own ChaCha8 stream (`seed`, stream = 1 + global image index; stream 0 is
//! the label-map permutation), so the same options give byte-identical files, whatever the thread count.
//!
//! The files, one job each:
//! - `mod.rs`: the options, [`generate`] (the channel layout, the worker threads) and the [`SynthSummary`];
//! - `plan.rs`: validating the options and deriving the layout (cells for the guaranteed shapes, radii, hues);
//! - `shapes.rs`: the shape kinds as signed-distance geometry;
//! - `render.rs`: one sample's pixels and labels (background texture, shapes, noise);
//! - `label_map.rs`: the annotation value of each label and the `label_map` channel's JSON;
//! - `output.rs`: the channel directories and the JPEG / palette-PNG files of one sample;
//! - `error.rs`: [`SynthError`].

mod error;
mod label_map;
mod output;
mod plan;
mod render;
mod shapes;
#[cfg(test)]
mod test_util;

use std::fmt;
use std::fs;
use std::path::PathBuf;

pub use error::SynthError;
pub use render::class_hue;
pub use shapes::{ShapeKind, SHAPE_KINDS};

use error::io_err;
use label_map::label_map_json;
use output::{prepare_dirs, write_sample, Counts};
use plan::Plan;

/// The channel directories [`generate`] writes (and checks are empty) under `--out`.
pub const CHANNEL_DIRS: [&str; 5] = [
    "train",
    "train_annotation",
    "validation",
    "validation_annotation",
    "label_map",
];

/// How annotation pixel values encode training labels, i.e. what `label_map/*.json` says.
#[derive(clap::ValueEnum, serde::Serialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LabelMapStyle {
    /// Pixel value = label; writes `{"scale": "1"}`.
    #[default]
    None,
    /// Pixel value = label × `--label-scale`; writes `{"scale": "<s>"}`.
    Scale,
    /// Pixel value = a seeded permutation of distinct values (never 255); writes `{"map": {"<label>": <value>, ...}}`.
    Map,
}

/// Options of `semseg synth` (also usable as a library with [`Default`] + struct update syntax).
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct SynthOptions {
    /// Output directory; the channels train, train_annotation, validation, validation_annotation and label_map are
    /// created inside it (use ML_ROOT/input/data for a ready training job). Those channel directories must be absent
    /// or empty unless --force is given; other content of DIR is left alone.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,

    /// Random seed; the same options and seed give byte-identical files.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,

    /// Number of training images (at least 1).
    #[arg(long, default_value_t = 48, value_name = "N")]
    pub train_count: u32,

    /// Number of validation images (at least 1).
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub validation_count: u32,

    /// Image width in pixels (16..=8192).
    #[arg(long, default_value_t = 160, value_name = "PX")]
    pub width: u32,

    /// Image height in pixels (16..=8192).
    #[arg(long, default_value_t = 120, value_name = "PX")]
    pub height: u32,

    /// Number of classes INCLUDING the background class 0 (2..=254), i.e. the job's num_classes hyperparameter.
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub num_classes: u32,

    /// How annotation pixel values encode labels, written to label_map/{train,validation}_label_map.json.
    #[arg(long, value_enum, default_value_t = LabelMapStyle::None, value_name = "STYLE")]
    pub label_map: LabelMapStyle,

    /// Scale factor for --label-map scale (pixel = label × scale); (num_classes − 1) × scale must be ≤ 254.
    #[arg(long, default_value_t = 10, value_name = "S")]
    pub label_scale: u32,

    /// Width in pixels of the ignore band (value 255) straddling each visible shape edge, as in PASCAL VOC; 0 = none.
    #[arg(long, default_value_t = 2, value_name = "PX")]
    pub border: u32,

    /// JPEG quality of the images (1..=100).
    #[arg(long, default_value_t = 90, value_name = "Q")]
    pub jpeg_quality: u8,

    /// Delete the files already inside the channel directories (only those five directories, only plain files)
    /// instead of refusing to write into non-empty ones.
    #[arg(long)]
    pub force: bool,
}

impl Default for SynthOptions {
    /// The CLI defaults; `out` is empty and must be set.
    fn default() -> Self {
        SynthOptions {
            out: PathBuf::new(),
            seed: 42,
            train_count: 48,
            validation_count: 16,
            width: 160,
            height: 120,
            num_classes: 4,
            label_map: LabelMapStyle::None,
            label_scale: 10,
            border: 2,
            jpeg_quality: 90,
            force: false,
        }
    }
}

/// What [`generate`] wrote.
#[derive(serde::Serialize, Debug, Clone, PartialEq, Eq)]
pub struct SynthSummary {
    /// The `--out` directory.
    pub out: PathBuf,
    /// Images in `train` (= annotations in `train_annotation`); the job's `num_training_samples`.
    pub train_count: usize,
    /// Images in `validation` (= annotations in `validation_annotation`).
    pub validation_count: usize,
    /// Classes including background 0; the job's `num_classes`.
    pub num_classes: u32,
    pub width: u32,
    pub height: u32,
    pub label_map: LabelMapStyle,
    /// The annotation pixel value encoding each training label (index = label).
    pub encoding: Vec<u8>,
    /// Pixels of each label (index = label) over all training annotations.
    pub train_class_pixels: Vec<u64>,
    /// Pixels of each label (index = label) over all validation annotations.
    pub validation_class_pixels: Vec<u64>,
    /// Ignore (255) pixels over all training annotations.
    pub train_ignore_pixels: u64,
    /// Ignore (255) pixels over all validation annotations.
    pub validation_ignore_pixels: u64,
}

impl SynthSummary {
    /// The hyperparameters a training job on this dataset must set (string values, as SageMaker passes them).
    pub fn required_hyperparameters(&self) -> Vec<(&'static str, String)> {
        vec![
            ("num_classes", self.num_classes.to_string()),
            ("num_training_samples", self.train_count.to_string()),
        ]
    }
}

impl fmt::Display for SynthSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "wrote {} train + {} validation images ({}x{} px, {} classes, label map {:?}) to {}",
            self.train_count,
            self.validation_count,
            self.width,
            self.height,
            self.num_classes,
            self.label_map,
            self.out.display()
        )
    }
}

/// Write the dataset described by `opts` (see the module docs). Options are validated and the channel directories
/// checked before anything is written.
pub fn generate(opts: &SynthOptions) -> Result<SynthSummary, SynthError> {
    let plan = Plan::new(opts)?;
    prepare_dirs(&opts.out, opts.force)?;

    let json = label_map_json(opts.label_map, opts.label_scale, &plan.encoding);
    for name in ["train_label_map.json", "validation_label_map.json"] {
        let path = opts.out.join("label_map").join(name);
        fs::write(&path, &json).map_err(io_err("write", &path))?;
    }

    let jobs: Vec<(usize, usize)> = (0..plan.splits.len())
        .flat_map(|s| (0..plan.splits[s].count).map(move |i| (s, i)))
        .collect();
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 8)
        .min(jobs.len().div_ceil(4).max(1));
    let per_thread: Vec<Result<Vec<Counts>, SynthError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (plan, jobs, out) = (&plan, &jobs, &opts.out);
                scope.spawn(move || {
                    let mut counts = vec![Counts::new(plan.num_classes); plan.splits.len()];
                    for &(s, i) in jobs.iter().skip(t).step_by(threads) {
                        write_sample(plan, s, i, out, &mut counts[s])?;
                    }
                    Ok(counts)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("synth worker thread panicked"))
            .collect()
    });
    let mut counts = vec![Counts::new(plan.num_classes); plan.splits.len()];
    for result in per_thread {
        for (total, part) in counts.iter_mut().zip(result?) {
            total.add(&part);
        }
    }

    Ok(SynthSummary {
        out: opts.out.clone(),
        train_count: plan.splits[0].count,
        validation_count: plan.splits[1].count,
        num_classes: opts.num_classes,
        width: opts.width,
        height: opts.height,
        label_map: opts.label_map,
        encoding: plan.encoding.clone(),
        train_class_pixels: counts[0].classes.clone(),
        validation_class_pixels: counts[1].classes.clone(),
        train_ignore_pixels: counts[0].ignore,
        validation_ignore_pixels: counts[1].ignore,
    })
}

#[cfg(test)]
mod tests {
    use super::test_util::*;
    use super::*;
    use std::collections::BTreeSet;
    use std::path::Path;

    #[test]
    fn default_layout_counts_and_stems() {
        let tmp = tempfile::tempdir().unwrap();
        let summary = generate(&opts(tmp.path())).unwrap();
        assert_eq!(
            (summary.train_count, summary.validation_count, summary.num_classes),
            (48, 16, 4)
        );
        let root = tmp.path();
        let train = stems(&root.join("train"), "jpg");
        let val = stems(&root.join("validation"), "jpg");
        assert_eq!(train.len(), 48);
        assert_eq!(val.len(), 16);
        assert_eq!(train, stems(&root.join("train_annotation"), "png"));
        assert_eq!(val, stems(&root.join("validation_annotation"), "png"));
        assert_eq!(train[0], "img_00000");
        assert_eq!(val[0], "img_00048");
        assert!(train.iter().all(|s| !val.contains(s)), "stems are unique across splits");
        assert_eq!(
            names(&root.join("label_map")),
            ["train_label_map.json", "validation_label_map.json"]
        );
        // Images are RGB JPEGs of the requested size; annotations match it.
        let img = image::open(root.join("train/img_00003.jpg")).unwrap();
        assert_eq!(img.color(), image::ColorType::Rgb8);
        assert_eq!((img.width(), img.height()), (160, 120));
        let (_, _, _, w, h, raw) = read_png_raw(&root.join("train_annotation/img_00003.png"));
        assert_eq!((w, h, raw.len()), (160, 120, 160 * 120));
        assert_eq!(
            summary.required_hyperparameters(),
            vec![
                ("num_classes", "4".to_string()),
                ("num_training_samples", "48".to_string())
            ]
        );
    }

    #[test]
    fn every_class_appears_with_many_classes_and_few_images() {
        for (classes, train, val, style) in [(21, 5, 2, LabelMapStyle::None), (254, 8, 8, LabelMapStyle::Map)] {
            let tmp = tempfile::tempdir().unwrap();
            let o = SynthOptions {
                num_classes: classes,
                train_count: train,
                validation_count: val,
                label_map: style,
                ..opts(tmp.path())
            };
            let summary = generate(&o).unwrap();
            for (split, pixels) in [
                ("train", &summary.train_class_pixels),
                ("validation", &summary.validation_class_pixels),
            ] {
                let missing: Vec<usize> = (0..classes as usize).filter(|&c| pixels[c] == 0).collect();
                assert!(missing.is_empty(), "{classes} classes, {split}: missing {missing:?}");
                let hist = value_histogram(&tmp.path().join(format!("{split}_annotation")));
                let expected: BTreeSet<u8> = summary.encoding.iter().copied().chain([255]).collect();
                assert_eq!(
                    hist.keys().copied().collect::<BTreeSet<u8>>(),
                    expected,
                    "{classes} classes, {split}"
                );
            }
        }
    }

    #[test]
    fn same_options_give_byte_identical_files_and_the_seed_matters() {
        let (a, b, c) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        let o = |dir: &Path| SynthOptions {
            label_map: LabelMapStyle::Map,
            ..small(dir)
        };
        generate(&o(a.path())).unwrap();
        generate(&o(b.path())).unwrap();
        generate(&SynthOptions { seed: 7, ..o(c.path()) }).unwrap();
        let (fa, fb, fc) = (all_files(a.path()), all_files(b.path()), all_files(c.path()));
        assert_eq!(fa.len(), 2 * 9 + 2);
        assert!(fa == fb, "same options must give identical files");
        assert_eq!(fa.keys().collect::<Vec<_>>(), fc.keys().collect::<Vec<_>>());
        for (name, bytes) in &fa {
            assert_ne!(Some(bytes), fc.get(name), "{name} must change with the seed");
        }
    }

    /// Not a check, a measurement: `cargo test --release --lib synth:: -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn default_dataset_timing() {
        let tmp = tempfile::tempdir().unwrap();
        let start = std::time::Instant::now();
        generate(&opts(tmp.path())).unwrap();
        eprintln!("default dataset generated in {:?}", start.elapsed());
    }

    #[test]
    fn cli_parses_defaults_and_documents_every_option() {
        use clap::{CommandFactory, Parser};
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            synth: SynthOptions,
        }
        let cli = Cli::try_parse_from(["synth", "--out", "/tmp/x"]).unwrap();
        assert_eq!(
            cli.synth,
            SynthOptions {
                out: "/tmp/x".into(),
                ..SynthOptions::default()
            }
        );
        let cli = Cli::try_parse_from(["synth", "--out", "d", "--label-map", "map", "--num-classes", "9"]).unwrap();
        assert_eq!((cli.synth.label_map, cli.synth.num_classes), (LabelMapStyle::Map, 9));
        assert!(Cli::try_parse_from(["synth"]).is_err(), "--out is required");
        for arg in Cli::command().get_arguments() {
            assert!(arg.get_help().is_some(), "--{} has no help", arg.get_id());
        }
    }
}

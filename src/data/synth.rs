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

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::annotation::voc_palette;
use super::IGNORE_LABEL;

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

/// Why [`generate`] refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("invalid --{option} {value}: {reason}")]
    InvalidOption {
        option: &'static str,
        value: String,
        reason: String,
    },
    #[error(
        "{width}x{height} px images are too small to show all {shape_classes} shape classes in the {split} split: \
         each of its {count} images must hold {per_image} non-overlapping shapes in cells of {cell_width}x{cell_height} \
         px, but a shape with a {border} px border needs a cell of at least {min_cell} px; raise --width/--height or \
         the image count, or lower --num-classes/--border"
    )]
    ImagesTooSmall {
        width: u32,
        height: u32,
        shape_classes: u32,
        split: &'static str,
        count: u32,
        per_image: usize,
        cell_width: u32,
        cell_height: u32,
        border: u32,
        min_cell: u32,
    },
    #[error(
        "{} is not empty ({entries} entries, e.g. {first}); empty it, choose another --out, or pass --force to delete \
         the files in the channel directories",
        path.display()
    )]
    NotEmpty {
        path: PathBuf,
        entries: usize,
        first: String,
    },
    #[error("{} is a directory; --force deletes only plain files in the channel directories, remove it yourself", path.display())]
    NestedDirectory { path: PathBuf },
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot encode JPEG {}: {source}", path.display())]
    Jpeg {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },
    #[error("cannot encode PNG {}: {source}", path.display())]
    Png {
        path: PathBuf,
        #[source]
        source: png::EncodingError,
    },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SynthError + 'a {
    move |source| SynthError::Io {
        action,
        path: path.to_path_buf(),
        source,
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

/// The `label_map` JSON for a style: `{"scale": "1"}`, `{"scale": "<s>"}` or `{"map": {"0": p0, ...}}` (keys in label
/// order).
fn label_map_json(style: LabelMapStyle, scale: u32, encoding: &[u8]) -> String {
    match style {
        LabelMapStyle::None => "{\"scale\": \"1\"}\n".to_string(),
        LabelMapStyle::Scale => format!("{{\"scale\": \"{scale}\"}}\n"),
        LabelMapStyle::Map => {
            let entries: Vec<String> = encoding
                .iter()
                .enumerate()
                .map(|(label, value)| format!("\"{label}\": {value}"))
                .collect();
            format!("{{\"map\": {{{}}}}}\n", entries.join(", "))
        }
    }
}

/// Create `out` and the channel directories; refuse non-empty ones unless `force`, then delete their plain files.
fn prepare_dirs(out: &Path, force: bool) -> Result<(), SynthError> {
    // Check all five before touching anything.
    let mut to_delete = Vec::new();
    for name in CHANNEL_DIRS {
        let dir = out.join(name);
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err("read directory", &dir)(e)),
        };
        let mut paths = Vec::new();
        for entry in entries {
            paths.push(entry.map_err(io_err("read directory", &dir))?.path());
        }
        if paths.is_empty() {
            continue;
        }
        paths.sort();
        if !force {
            return Err(SynthError::NotEmpty {
                entries: paths.len(),
                first: paths[0].file_name().unwrap_or_default().to_string_lossy().into_owned(),
                path: dir,
            });
        }
        for path in paths {
            let meta = fs::symlink_metadata(&path).map_err(io_err("inspect", &path))?;
            if meta.is_dir() {
                return Err(SynthError::NestedDirectory { path });
            }
            to_delete.push(path);
        }
    }
    for path in to_delete {
        fs::remove_file(&path).map_err(io_err("delete", &path))?;
    }
    for name in CHANNEL_DIRS {
        let dir = out.join(name);
        fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------------
// Planning: validated options and derived geometry.

/// Per-split layout.
struct SplitPlan {
    image_dir: &'static str,
    annotation_dir: &'static str,
    count: usize,
    /// Global index of the split's first image (stems are numbered across splits: `img_<first_index + i>`).
    first_index: usize,
    /// Guaranteed shapes per image (so that every class appears in the split).
    per_image: usize,
    /// Grid of cells for the guaranteed shapes.
    grid: (usize, usize),
    /// Largest bounding radius of a shape that fits a cell with its border.
    cell_max_radius: f32,
}

struct Plan {
    seed: u64,
    width: usize,
    height: usize,
    num_classes: usize,
    /// Half the ignore-band width.
    half_border: f32,
    /// Smallest shape bounding radius that still leaves an interior (label) region inside the border.
    min_radius: f32,
    /// Bounding-radius range of the free (randomly placed) shapes.
    free_radius: (f32, f32),
    hue_jitter: f32,
    jpeg_quality: u8,
    encoding: Vec<u8>,
    splits: [SplitPlan; 2],
}

/// Every shape kind contains a disc of radius ≥ `bounding radius / MIN_RADIUS_FACTOR` (the triangle is the thinnest),
/// and that disc must be wider than the border band plus 1.5 px so that some pixel centre gets the class label.
const MIN_RADIUS_FACTOR: f32 = 2.7;

impl Plan {
    fn new(opts: &SynthOptions) -> Result<Plan, SynthError> {
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

/// The annotation pixel value of each training label for the chosen style.
fn encoding(opts: &SynthOptions) -> Vec<u8> {
    let n = opts.num_classes as usize;
    match opts.label_map {
        LabelMapStyle::None => (0..n).map(|l| l as u8).collect(),
        LabelMapStyle::Scale => (0..n).map(|l| (l as u32 * opts.label_scale) as u8).collect(),
        LabelMapStyle::Map => {
            let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
            rng.set_stream(0);
            let mut values: Vec<u8> = (0..IGNORE_LABEL).collect();
            loop {
                values.shuffle(&mut rng);
                // Non-trivial: not the identity on the labels in use.
                if values[..n].iter().enumerate().any(|(l, &v)| v as usize != l) {
                    return values[..n].to_vec();
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------------
// Rendering.

#[derive(Clone)]
struct Counts {
    classes: Vec<u64>,
    ignore: u64,
}

impl Counts {
    fn new(num_classes: usize) -> Counts {
        Counts {
            classes: vec![0; num_classes],
            ignore: 0,
        }
    }

    fn add(&mut self, other: &Counts) {
        for (a, b) in self.classes.iter_mut().zip(&other.classes) {
            *a += b;
        }
        self.ignore += other.ignore;
    }
}

/// One rendered sample: RGB pixels and training labels (255 = ignore), row-major.
struct Sample {
    rgb: Vec<u8>,
    labels: Vec<u8>,
}

fn write_sample(plan: &Plan, s: usize, i: usize, out: &Path, counts: &mut Counts) -> Result<(), SynthError> {
    let split = &plan.splits[s];
    let sample = render(plan, split, i);
    for &l in &sample.labels {
        if l == IGNORE_LABEL {
            counts.ignore += 1;
        } else {
            counts.classes[l as usize] += 1;
        }
    }
    let stem = format!("img_{:05}", split.first_index + i);

    let path = out.join(split.image_dir).join(format!("{stem}.jpg"));
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, plan.jpeg_quality)
        .encode(
            &sample.rgb,
            plan.width as u32,
            plan.height as u32,
            image::ExtendedColorType::Rgb8,
        )
        .map_err(|source| SynthError::Jpeg {
            path: path.clone(),
            source,
        })?;
    fs::write(&path, &jpeg).map_err(io_err("write", &path))?;

    let path = out.join(split.annotation_dir).join(format!("{stem}.png"));
    let values: Vec<u8> = sample
        .labels
        .iter()
        .map(|&l| {
            if l == IGNORE_LABEL {
                IGNORE_LABEL
            } else {
                plan.encoding[l as usize]
            }
        })
        .collect();
    let png = encode_palette_png(&values, plan.width as u32, plan.height as u32).map_err(|source| SynthError::Png {
        path: path.clone(),
        source,
    })?;
    fs::write(&path, &png).map_err(io_err("write", &path))?;
    Ok(())
}

/// An 8-bit palette PNG of raw indices with the PASCAL VOC palette.
fn encode_palette_png(indices: &[u8], width: u32, height: u32) -> Result<Vec<u8>, png::EncodingError> {
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, width, height);
    encoder.set_color(png::ColorType::Indexed);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_palette(voc_palette().concat());
    encoder.set_compression(png::Compression::Fast);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(indices)?;
    writer.finish()?;
    Ok(bytes)
}

/// The nominal hue (degrees) of shape class `class ≥ 1`: classes spread evenly around the colour wheel, class 1 red.
pub fn class_hue(class: u32, num_classes: u32) -> f32 {
    (class - 1) as f32 * 360.0 / (num_classes - 1) as f32
}

/// The shape kinds, in class order (class `k ≥ 1` draws `SHAPE_KINDS[(k − 1) % 6]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShapeKind {
    Disc,
    Rectangle,
    Triangle,
    Ring,
    Ellipse,
    Cross,
}

/// Shape kind of each class, cycling for more than six shape classes.
pub const SHAPE_KINDS: [ShapeKind; 6] = [
    ShapeKind::Disc,
    ShapeKind::Rectangle,
    ShapeKind::Triangle,
    ShapeKind::Ring,
    ShapeKind::Ellipse,
    ShapeKind::Cross,
];

/// Geometry relative to the shape's centre; `sdf` < 0 inside.
enum Geom {
    Disc { r: f32 },
    Ring { mid: f32, half_thickness: f32 },
    Ellipse { a: f32, b: f32, cos: f32, sin: f32 },
    Polygon(Vec<[f32; 2]>),
}

impl Geom {
    /// Signed distance (px) from the boundary: negative inside. Exact except for the ellipse (first-order
    /// approximation, exact on the boundary and along the axes).
    fn sdf(&self, x: f32, y: f32) -> f32 {
        match self {
            Geom::Disc { r } => (x * x + y * y).sqrt() - r,
            Geom::Ring { mid, half_thickness } => ((x * x + y * y).sqrt() - mid).abs() - half_thickness,
            Geom::Ellipse { a, b, cos, sin } => {
                let (u, v) = (x * cos + y * sin, -x * sin + y * cos);
                let k0 = ((u / a).powi(2) + (v / b).powi(2)).sqrt();
                let k1 = ((u / (a * a)).powi(2) + (v / (b * b)).powi(2)).sqrt();
                if k1 == 0.0 {
                    -a.min(*b)
                } else {
                    k0 * (k0 - 1.0) / k1
                }
            }
            Geom::Polygon(v) => polygon_sdf(v, x, y),
        }
    }
}

/// Signed distance to a simple polygon (Inigo Quilez's `sdPolygon`): negative inside, any winding.
fn polygon_sdf(v: &[[f32; 2]], px: f32, py: f32) -> f32 {
    let sq = |x: f32, y: f32| x * x + y * y;
    let mut d = sq(px - v[0][0], py - v[0][1]);
    let mut s = 1.0f32;
    let mut j = v.len() - 1;
    for i in 0..v.len() {
        let (ex, ey) = (v[j][0] - v[i][0], v[j][1] - v[i][1]);
        let (wx, wy) = (px - v[i][0], py - v[i][1]);
        let t = ((wx * ex + wy * ey) / sq(ex, ey)).clamp(0.0, 1.0);
        d = d.min(sq(wx - ex * t, wy - ey * t));
        let c = [py >= v[i][1], py < v[j][1], ex * wy > ey * wx];
        if c.iter().all(|&b| b) || c.iter().all(|&b| !b) {
            s = -s;
        }
        j = i;
    }
    s * d.sqrt()
}

fn rotate(points: &[[f32; 2]], angle: f32) -> Vec<[f32; 2]> {
    let (sin, cos) = angle.sin_cos();
    points
        .iter()
        .map(|&[x, y]| [x * cos - y * sin, x * sin + y * cos])
        .collect()
}

/// Geometry of a `kind` fitting in a circle of `radius`, with an inscribed disc of at least `min_half` px.
fn make_geom(kind: ShapeKind, radius: f32, min_half: f32, rng: &mut ChaCha8Rng) -> Geom {
    let angle = rng.random_range(0.0..std::f32::consts::TAU);
    match kind {
        ShapeKind::Disc => Geom::Disc { r: radius },
        ShapeKind::Rectangle => {
            let theta = rng.random_range(0.4..std::f32::consts::FRAC_PI_2 - 0.4);
            let (hx, hy) = (0.98 * radius * theta.cos(), 0.98 * radius * theta.sin());
            Geom::Polygon(rotate(&[[-hx, -hy], [hx, -hy], [hx, hy], [-hx, hy]], angle))
        }
        ShapeKind::Triangle => {
            let points: Vec<[f32; 2]> = (0..3)
                .map(|k| {
                    let a = k as f32 * std::f32::consts::TAU / 3.0 + rng.random_range(-0.26..0.26);
                    let r = radius * rng.random_range(0.9..0.98);
                    [r * a.cos(), r * a.sin()]
                })
                .collect();
            Geom::Polygon(rotate(&points, angle))
        }
        ShapeKind::Ring => {
            let half_thickness = (radius * rng.random_range(0.12..0.22)).clamp(min_half, 0.4 * radius);
            Geom::Ring {
                mid: radius - half_thickness,
                half_thickness,
            }
        }
        ShapeKind::Ellipse => Geom::Ellipse {
            a: radius * rng.random_range(0.85..1.0),
            b: radius * rng.random_range(0.45..0.75),
            cos: angle.cos(),
            sin: angle.sin(),
        },
        ShapeKind::Cross => {
            let w = (radius * rng.random_range(0.2..0.3)).clamp(min_half, 0.4 * radius);
            let l = 0.98 * (radius * radius - w * w).sqrt();
            let points = [
                [-w, -l],
                [w, -l],
                [w, -w],
                [l, -w],
                [l, w],
                [w, w],
                [w, l],
                [-w, l],
                [-w, w],
                [-l, w],
                [-l, -w],
                [-w, -w],
            ];
            Geom::Polygon(rotate(&points, angle))
        }
    }
}

fn hsv_to_rgb(h: f32, s: f32, v: f32) -> [f32; 3] {
    let h = h.rem_euclid(360.0) / 60.0;
    let c = v * s;
    let x = c * (1.0 - (h % 2.0 - 1.0).abs());
    let (r, g, b) = match h as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = v - c;
    [(r + m) * 255.0, (g + m) * 255.0, (b + m) * 255.0]
}

/// A muted (low-saturation) background colour.
fn muted_colour(rng: &mut ChaCha8Rng) -> [f32; 3] {
    hsv_to_rgb(
        rng.random_range(0.0..360.0),
        rng.random_range(0.0..0.3),
        rng.random_range(0.25..0.85),
    )
}

fn lerp3(a: [f32; 3], b: [f32; 3], t: f32) -> [f32; 3] {
    [
        a[0] + (b[0] - a[0]) * t,
        a[1] + (b[1] - a[1]) * t,
        a[2] + (b[2] - a[2]) * t,
    ]
}

struct Canvas {
    width: usize,
    height: usize,
    rgb: Vec<[f32; 3]>,
    labels: Vec<u8>,
}

fn paint_background(canvas: &mut Canvas, rng: &mut ChaCha8Rng) {
    let (w, h) = (canvas.width, canvas.height);
    let (c1, c2) = (muted_colour(rng), muted_colour(rng));
    let angle: f32 = rng.random_range(0.0..std::f32::consts::TAU);
    let (dx, dy) = (angle.cos(), angle.sin());
    // A weak lighting gradient over every texture.
    let light_angle: f32 = rng.random_range(0.0..std::f32::consts::TAU);
    let light_amp: f32 = rng.random_range(0.0..0.15);
    let (lx, ly) = (light_angle.cos(), light_angle.sin());
    let extent = (w * w + h * h) as f32;
    let extent = extent.sqrt();
    let (cx, cy) = (w as f32 / 2.0, h as f32 / 2.0);

    enum Texture {
        Gradient,
        Stripes { period: f32, phase: f32 },
        Blotches { cell: f32, cols: usize, grid: Vec<f32> },
    }
    let texture = match rng.random_range(0..3) {
        0 => Texture::Gradient,
        1 => Texture::Stripes {
            period: rng.random_range(6.0..24.0),
            phase: rng.random_range(0.0..std::f32::consts::TAU),
        },
        _ => {
            let cell: f32 = rng.random_range(8.0..24.0);
            let cols = (w as f32 / cell) as usize + 2;
            let rows = (h as f32 / cell) as usize + 2;
            let grid = (0..cols * rows).map(|_| rng.random_range(0.0..1.0)).collect();
            Texture::Blotches { cell, cols, grid }
        }
    };
    for y in 0..h {
        for x in 0..w {
            let (fx, fy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
            let along = fx * dx + fy * dy;
            let t = match &texture {
                Texture::Gradient => (along / extent + 0.5).clamp(0.0, 1.0),
                Texture::Stripes { period, phase } => {
                    0.5 + 0.5 * (along * std::f32::consts::TAU / period + phase).sin()
                }
                Texture::Blotches { cell, cols, grid } => {
                    let (gx, gy) = (x as f32 / cell, y as f32 / cell);
                    let (ix, iy) = (gx as usize, gy as usize);
                    let smooth = |t: f32| t * t * (3.0 - 2.0 * t);
                    let (tx, ty) = (smooth(gx - ix as f32), smooth(gy - iy as f32));
                    let at = |i: usize, j: usize| grid[j * cols + i];
                    let top = at(ix, iy) + (at(ix + 1, iy) - at(ix, iy)) * tx;
                    let bottom = at(ix, iy + 1) + (at(ix + 1, iy + 1) - at(ix, iy + 1)) * tx;
                    top + (bottom - top) * ty
                }
            };
            let light = 1.0 + light_amp * 2.0 * (fx * lx + fy * ly) / extent;
            let c = lerp3(c1, c2, t);
            canvas.rgb[y * w + x] = [c[0] * light, c[1] * light, c[2] * light];
        }
    }
}

/// Paint shape `class` with bounding `radius` centred at (`cx`, `cy`) into the image and the labels.
fn paint_shape(plan: &Plan, canvas: &mut Canvas, class: usize, cx: f32, cy: f32, radius: f32, rng: &mut ChaCha8Rng) {
    let hb = plan.half_border;
    let kind = SHAPE_KINDS[(class - 1) % SHAPE_KINDS.len()];
    let geom = make_geom(kind, radius, hb + 1.5, rng);
    let hue = class_hue(class as u32, plan.num_classes as u32) + rng.random_range(-1.0..=1.0) * plan.hue_jitter;
    let base = hsv_to_rgb(hue, rng.random_range(0.6..1.0), rng.random_range(0.6..1.0));
    let shade_angle: f32 = rng.random_range(0.0..std::f32::consts::TAU);
    let shade_amp: f32 = rng.random_range(0.0..0.2);
    let (sx, sy) = (
        shade_angle.cos() * shade_amp / radius,
        shade_angle.sin() * shade_amp / radius,
    );

    let reach = radius + hb + 2.0;
    let x0 = (cx - reach).floor().max(0.0) as usize;
    let y0 = (cy - reach).floor().max(0.0) as usize;
    let x1 = ((cx + reach).ceil().max(0.0) as usize).min(canvas.width);
    let y1 = ((cy + reach).ceil().max(0.0) as usize).min(canvas.height);
    let label = class as u8;
    for y in y0..y1 {
        for x in x0..x1 {
            let (fx, fy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
            let d = geom.sdf(fx, fy);
            let p = y * canvas.width + x;
            let coverage = (0.5 - d).clamp(0.0, 1.0);
            if coverage > 0.0 {
                let shade = 1.0 + fx * sx + fy * sy;
                let old = canvas.rgb[p];
                let mut new = [0.0; 3];
                for c in 0..3 {
                    new[c] = old[c] + (base[c] * shade - old[c]) * coverage;
                }
                canvas.rgb[p] = new;
            }
            if d < -hb {
                canvas.labels[p] = label;
            } else if hb > 0.0 && d <= hb {
                canvas.labels[p] = IGNORE_LABEL;
            }
        }
    }
}

fn render(plan: &Plan, split: &SplitPlan, i: usize) -> Sample {
    let mut rng = ChaCha8Rng::seed_from_u64(plan.seed);
    rng.set_stream(1 + (split.first_index + i) as u64);
    let (w, h) = (plan.width, plan.height);
    let mut canvas = Canvas {
        width: w,
        height: h,
        rgb: vec![[0.0; 3]; w * h],
        labels: vec![0; w * h],
    };
    paint_background(&mut canvas, &mut rng);
    let shape_classes = plan.num_classes - 1;

    // Free shapes, anywhere (possibly cut by the image edge), underneath the guaranteed ones.
    for _ in 0..rng.random_range(1..=3) {
        let class = rng.random_range(1..=shape_classes);
        let radius = rng.random_range(plan.free_radius.0..=plan.free_radius.1);
        let cx = rng.random_range(0.0..w as f32);
        let cy = rng.random_range(0.0..h as f32);
        paint_shape(plan, &mut canvas, class, cx, cy, radius, &mut rng);
    }

    // Guaranteed shapes, one per cell of a shuffled grid, fully inside their cells so none hides another.
    let (cols, rows) = split.grid;
    let (cell_w, cell_h) = (w as f32 / cols as f32, h as f32 / rows as f32);
    let mut cells: Vec<usize> = (0..cols * rows).collect();
    cells.shuffle(&mut rng);
    let hi = split.cell_max_radius.min(plan.free_radius.1);
    let lo = plan.min_radius.max(0.5 * hi).min(hi);
    for (k, &cell) in cells.iter().take(split.per_image).enumerate() {
        let class = 1 + (i + k * split.count) % shape_classes;
        let radius = rng.random_range(lo..=hi);
        let margin = radius + plan.half_border + 1.0;
        let (left, top) = ((cell % cols) as f32 * cell_w, (cell / cols) as f32 * cell_h);
        let cx = rng.random_range(left + margin..=(left + cell_w - margin).max(left + margin));
        let cy = rng.random_range(top + margin..=(top + cell_h - margin).max(top + margin));
        paint_shape(plan, &mut canvas, class, cx, cy, radius, &mut rng);
    }

    // Sensor noise (±6 per channel) and quantisation.
    let mut rgb = Vec::with_capacity(w * h * 3);
    for px in &canvas.rgb {
        let noise = rng.random::<u32>().to_le_bytes();
        for c in 0..3 {
            let n = (noise[c] as f32 - 127.5) * (6.0 / 127.5);
            rgb.push((px[c] + n).round().clamp(0.0, 255.0) as u8);
        }
    }
    Sample {
        rgb,
        labels: canvas.labels,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    fn opts(dir: &Path) -> SynthOptions {
        SynthOptions {
            out: dir.to_path_buf(),
            ..SynthOptions::default()
        }
    }

    fn small(dir: &Path) -> SynthOptions {
        SynthOptions {
            train_count: 6,
            validation_count: 3,
            ..opts(dir)
        }
    }

    /// Sorted file names in `dir`.
    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn stems(dir: &Path, ext: &str) -> Vec<String> {
        names(dir)
            .into_iter()
            .map(|n| {
                n.strip_suffix(&format!(".{ext}"))
                    .unwrap_or_else(|| panic!("{n} is not .{ext}"))
                    .to_string()
            })
            .collect()
    }

    /// Decode a PNG WITHOUT palette expansion: (colour type, bit depth, palette, width, height, raw samples).
    fn read_png_raw(path: &Path) -> (png::ColorType, png::BitDepth, Option<Vec<u8>>, u32, u32, Vec<u8>) {
        let mut decoder = png::Decoder::new(io::BufReader::new(fs::File::open(path).unwrap()));
        decoder.set_transformations(png::Transformations::IDENTITY);
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let frame = reader.next_frame(&mut buf).unwrap();
        buf.truncate(frame.buffer_size());
        let info = reader.info();
        (
            frame.color_type,
            frame.bit_depth,
            info.palette.as_ref().map(|p| p.to_vec()),
            frame.width,
            frame.height,
            buf,
        )
    }

    /// All raw annotation values of a split with their pixel counts.
    fn value_histogram(dir: &Path) -> BTreeMap<u8, u64> {
        let mut hist = BTreeMap::new();
        for name in names(dir) {
            let (color, depth, _, _, _, raw) = read_png_raw(&dir.join(name));
            assert_eq!(color, png::ColorType::Indexed);
            assert_eq!(depth, png::BitDepth::Eight);
            for v in raw {
                *hist.entry(v).or_insert(0) += 1;
            }
        }
        hist
    }

    fn read_json(path: &Path) -> serde_json::Value {
        serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
    }

    fn all_files(root: &Path) -> BTreeMap<String, Vec<u8>> {
        let mut files = BTreeMap::new();
        for channel in CHANNEL_DIRS {
            for name in names(&root.join(channel)) {
                files.insert(
                    format!("{channel}/{name}"),
                    fs::read(root.join(channel).join(&name)).unwrap(),
                );
            }
        }
        files
    }

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
    fn palette_png_with_raw_labels_and_every_class_in_both_splits() {
        let tmp = tempfile::tempdir().unwrap();
        let summary = generate(&opts(tmp.path())).unwrap();
        for (dir, pixels) in [
            ("train_annotation", &summary.train_class_pixels),
            ("validation_annotation", &summary.validation_class_pixels),
        ] {
            let hist = value_histogram(&tmp.path().join(dir));
            let keys: BTreeSet<u8> = hist.keys().copied().collect();
            assert_eq!(keys, BTreeSet::from([0, 1, 2, 3, 255]), "{dir}");
            for class in 0..4u8 {
                assert_eq!(hist[&class], pixels[class as usize], "{dir} class {class} pixel count");
                // Every class is a sizeable share, not a few stray pixels.
                assert!(hist[&class] > 2000, "{dir} class {class}: {}", hist[&class]);
            }
        }
        let (_, _, palette, ..) = read_png_raw(&tmp.path().join("validation_annotation/img_00050.png"));
        let palette = palette.expect("PLTE chunk");
        assert_eq!(palette.len(), 768);
        assert_eq!(&palette[3..6], &[128, 0, 0], "VOC colour of index 1");
        assert_eq!(
            &palette[765..768],
            &[224, 224, 192],
            "index 255 is VOC's light ignore colour"
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

    #[test]
    fn label_map_none_writes_scale_1() {
        let tmp = tempfile::tempdir().unwrap();
        let summary = generate(&small(tmp.path())).unwrap();
        for name in ["train_label_map.json", "validation_label_map.json"] {
            assert_eq!(
                read_json(&tmp.path().join("label_map").join(name)),
                serde_json::json!({"scale": "1"})
            );
        }
        assert_eq!(summary.encoding, [0, 1, 2, 3]);
    }

    #[test]
    fn label_map_scale_encodes_label_times_scale() {
        let tmp = tempfile::tempdir().unwrap();
        let o = SynthOptions {
            label_map: LabelMapStyle::Scale,
            label_scale: 30,
            ..small(tmp.path())
        };
        let summary = generate(&o).unwrap();
        for name in ["train_label_map.json", "validation_label_map.json"] {
            assert_eq!(
                read_json(&tmp.path().join("label_map").join(name)),
                serde_json::json!({"scale": "30"})
            );
        }
        assert_eq!(summary.encoding, [0, 30, 60, 90]);
        for dir in ["train_annotation", "validation_annotation"] {
            let keys: BTreeSet<u8> = value_histogram(&tmp.path().join(dir)).keys().copied().collect();
            assert_eq!(keys, BTreeSet::from([0, 30, 60, 90, 255]), "{dir}");
        }
    }

    #[test]
    fn label_map_map_is_a_nontrivial_permutation_matching_the_pixels() {
        let tmp = tempfile::tempdir().unwrap();
        let o = SynthOptions {
            label_map: LabelMapStyle::Map,
            num_classes: 6,
            ..small(tmp.path())
        };
        let summary = generate(&o).unwrap();
        let json = read_json(&tmp.path().join("label_map/train_label_map.json"));
        assert_eq!(json, read_json(&tmp.path().join("label_map/validation_label_map.json")));
        let map = json["map"].as_object().expect("{\"map\": {...}}");
        assert_eq!(json.as_object().unwrap().len(), 1);
        let mut values = Vec::new();
        for label in 0..6 {
            let v = map[&label.to_string()].as_u64().expect("integer value") as u8;
            assert_eq!(v, summary.encoding[label]);
            values.push(v);
        }
        assert_eq!(map.len(), 6);
        assert!(!values.contains(&255));
        assert_eq!(values.iter().collect::<BTreeSet<_>>().len(), 6, "distinct values");
        assert_ne!(values, [0, 1, 2, 3, 4, 5], "non-trivial");
        for dir in ["train_annotation", "validation_annotation"] {
            let keys: BTreeSet<u8> = value_histogram(&tmp.path().join(dir)).keys().copied().collect();
            let expected: BTreeSet<u8> = values.iter().copied().chain([255]).collect();
            assert_eq!(keys, expected, "{dir}");
        }
    }

    fn hue_of(rgb: [f32; 3]) -> (f32, f32) {
        let max = rgb[0].max(rgb[1]).max(rgb[2]);
        let min = rgb[0].min(rgb[1]).min(rgb[2]);
        let d = max - min;
        let sat = if max > 0.0 { d / max } else { 0.0 };
        if d == 0.0 {
            return (0.0, sat);
        }
        let h = if max == rgb[0] {
            60.0 * ((rgb[1] - rgb[2]) / d).rem_euclid(6.0)
        } else if max == rgb[1] {
            60.0 * ((rgb[2] - rgb[0]) / d + 2.0)
        } else {
            60.0 * ((rgb[0] - rgb[1]) / d + 4.0)
        };
        (h, sat)
    }

    fn hue_distance(a: f32, b: f32) -> f32 {
        let d = (a - b).rem_euclid(360.0);
        d.min(360.0 - d)
    }

    #[test]
    fn image_and_annotation_agree_pixel_for_pixel() {
        let tmp = tempfile::tempdir().unwrap();
        let o = SynthOptions {
            num_classes: 7,
            // No ignore band: the label edge itself must match the painted edge (a 1 px shift fails this test).
            border: 0,
            train_count: 12,
            validation_count: 6,
            ..opts(tmp.path())
        };
        generate(&o).unwrap();
        // Per class: pixels whose decoded colour has the class hue (±30°) and is saturated, and all pixels.
        let mut good = [0u64; 7];
        let mut total = [0u64; 7];
        let mut saturated_background = 0u64;
        for name in names(&tmp.path().join("train")) {
            let stem = name.strip_suffix(".jpg").unwrap();
            let img = image::open(tmp.path().join("train").join(&name)).unwrap().to_rgb8();
            let (_, _, _, _, _, raw) = read_png_raw(&tmp.path().join(format!("train_annotation/{stem}.png")));
            for (px, &label) in img.pixels().zip(&raw) {
                if label == 255 {
                    continue;
                }
                let (hue, sat) = hue_of([px[0] as f32, px[1] as f32, px[2] as f32]);
                total[label as usize] += 1;
                if label == 0 {
                    saturated_background += (sat > 0.55) as u64;
                } else if sat > 0.35 && hue_distance(hue, class_hue(label as u32, 7)) < 30.0 {
                    good[label as usize] += 1;
                }
            }
        }
        for class in 1..7 {
            let share = good[class] as f64 / total[class] as f64;
            assert!(
                share > 0.99,
                "class {class}: only {share:.3} of its pixels have its hue"
            );
        }
        let share = saturated_background as f64 / total[0] as f64;
        assert!(share < 0.02, "background is muted, but {share:.3} of it is saturated");
    }

    #[test]
    fn different_classes_never_touch_without_an_ignore_band() {
        let tmp = tempfile::tempdir().unwrap();
        let o = SynthOptions {
            num_classes: 7,
            border: 2,
            ..small(tmp.path())
        };
        generate(&o).unwrap();
        let check = |raw: &[u8], w: usize, h: usize| {
            let mut touching = 0;
            for y in 0..h {
                for x in 0..w {
                    let a = raw[y * w + x];
                    for (nx, ny) in [(x + 1, y), (x, y + 1)] {
                        if nx < w && ny < h {
                            let b = raw[ny * w + nx];
                            touching += (a != b && a != 255 && b != 255) as usize;
                        }
                    }
                }
            }
            touching
        };
        let dir = tmp.path().join("train_annotation");
        for name in names(&dir) {
            let (_, _, _, w, h, raw) = read_png_raw(&dir.join(&name));
            assert_eq!(check(&raw, w as usize, h as usize), 0, "{name}");
        }
        // Without a border, classes do touch.
        let tmp = tempfile::tempdir().unwrap();
        generate(&SynthOptions { border: 0, ..o.clone() }.with_out(tmp.path())).unwrap();
        let dir = tmp.path().join("train_annotation");
        let mut touching = 0;
        for name in names(&dir) {
            let (_, _, _, w, h, raw) = read_png_raw(&dir.join(&name));
            assert!(!raw.contains(&255), "border 0 writes no ignore pixels ({name})");
            touching += check(&raw, w as usize, h as usize);
        }
        assert!(touching > 100);
    }

    impl SynthOptions {
        fn with_out(self, out: &Path) -> SynthOptions {
            SynthOptions {
                out: out.to_path_buf(),
                ..self
            }
        }
    }

    #[test]
    fn refuses_non_empty_channels_unless_forced() {
        let tmp = tempfile::tempdir().unwrap();
        // Other content of OUT is fine.
        fs::create_dir_all(tmp.path().join("model")).unwrap();
        fs::write(tmp.path().join("model/keep.txt"), "x").unwrap();
        fs::create_dir_all(tmp.path().join("validation")).unwrap();
        generate(&small(tmp.path())).unwrap();

        let before = all_files(tmp.path());
        let err = generate(&small(tmp.path())).unwrap_err();
        assert!(matches!(err, SynthError::NotEmpty { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&tmp.path().join("train").display().to_string()), "{msg}");
        assert!(msg.contains("--force"), "{msg}");
        assert!(before == all_files(tmp.path()), "a refused run writes nothing");

        // --force replaces the channel files and removes stale ones.
        fs::write(tmp.path().join("train/stale.jpg"), "old").unwrap();
        let forced = SynthOptions {
            force: true,
            train_count: 2,
            ..small(tmp.path())
        };
        generate(&forced).unwrap();
        assert_eq!(names(&tmp.path().join("train")), ["img_00000.jpg", "img_00001.jpg"]);
        assert_eq!(names(&tmp.path().join("validation_annotation")).len(), 3);
        assert_eq!(fs::read_to_string(tmp.path().join("model/keep.txt")).unwrap(), "x");

        // --force never deletes directories.
        fs::create_dir(tmp.path().join("train/nested")).unwrap();
        let err = generate(&forced).unwrap_err();
        assert!(matches!(err, SynthError::NestedDirectory { .. }), "{err:?}");
    }

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

    /// Not a check, a measurement: `cargo test --release --lib data::synth -- --ignored --nocapture`.
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

    #[test]
    fn polygon_sdf_signs_and_distances() {
        let square = [[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]];
        assert!((polygon_sdf(&square, 0.0, 0.0) + 1.0).abs() < 1e-6);
        assert!((polygon_sdf(&square, 3.0, 0.0) - 2.0).abs() < 1e-6);
        let reversed: Vec<[f32; 2]> = square.iter().rev().copied().collect();
        assert!((polygon_sdf(&reversed, 0.0, 0.5) + 0.5).abs() < 1e-6);
    }
}

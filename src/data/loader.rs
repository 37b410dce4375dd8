//! Background decoding and augmentation into batches, overlapping the training step, with bounded memory.
//!
//! [`Loader::spawn`] starts `workers` threads for one epoch. Each worker claims the next batch index, decodes
//! its samples (image → RGB, annotation → raw values → label map), transforms them ([`super::augment`]) and sends
//! the whole batch through a bounded channel; the consumer (the [`Iterator`] impl) hands batches out strictly in
//! order, holding early arrivals aside.
//!
//! - Reproducible regardless of thread timing: the epoch's order is a permutation seeded by (seed, epoch), and
//!   every sample's random transform uses its own RNG seeded by (seed, epoch, sample index). 1 worker or 8 give
//!   bit-identical batches.
//! - Bounded: a worker may only claim batch `b` while `b < yielded + workers + queue_depth`, so at most
//!   `workers + queue_depth` batches exist inside the loader (plus the one the caller holds).
//! - Dropping the loader stops the workers (they check between samples) and joins them.
//! - A sample that fails to decode, to map or to transform makes its batch an `Err` naming the file; nothing is
//!   skipped. The iterator continues after an error, callers normally stop at the first one.
//! - The label map is applied here. Labels ≥ num_classes are checked up front for File mode (dataset validation) and
//!   here only when [`BatchRecipe::num_classes`] is set (Pipe mode, where nothing can be read up front).
//!
//! Samples come from a [`SampleSource`]: File-mode [`SamplePair`]s ([`Loader::spawn`]) or any other indexable
//! source ([`Loader::spawn_source`]). Streams that cannot be indexed (Pipe mode) go through
//! [`super::stream_loader`], which shares this module's per-batch work ([`build_batch`]).

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use image::{GrayImage, RgbImage};

use super::annotation::{decode_annotation_with_budget, read_annotation_with_budget, AnnotationError};
use super::augment::{
    train_transform, train_transform_into, val_transform, val_transform_into, whole_transform, AugmentError, Sample,
};
use super::dataset::SamplePair;
use super::image_io::{decode_rgb_with_budget, read_rgb_with_budget, ImageDecodeError, DEFAULT_MAX_PIXELS};
use super::label_map::{LabelLut, UnmappedPixel};
use super::IGNORE_LABEL;

/// Which transform the loader applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Random flip / rescale / pad / crop ([`super::augment::train_transform`]).
    Train,
    /// Short side → crop, centre crop ([`super::augment::val_transform`]).
    Validation,
    /// No resize or crop ([`super::augment::whole_transform`]); batches of differently sized images are padded to
    /// the largest (image: mean colour, label: 255). Normally used with batch_size 1.
    WholeImage,
}

/// How the loader batches and transforms one epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoaderConfig {
    pub batch_size: usize,
    /// Worker threads (at least 1).
    pub workers: usize,
    /// Finished batches that may wait beyond one per worker.
    pub queue_depth: usize,
    pub mode: Mode,
    pub shuffle: bool,
    /// Drop the last batch when it is smaller than `batch_size`.
    pub drop_last: bool,
    pub seed: u64,
    pub base_size: u32,
    /// Crop size, already rounded (see [`super::augment::round_crop_size`]).
    pub crop_size: u32,
    /// Pixel budget per image / annotation.
    pub max_pixels: u64,
}

impl LoaderConfig {
    /// Training defaults of the built-in algorithm (base 520, crop 240, shuffled, last partial batch dropped).
    pub fn train(batch_size: usize, seed: u64) -> Self {
        Self {
            batch_size,
            workers: default_workers(),
            queue_depth: 2,
            mode: Mode::Train,
            shuffle: true,
            drop_last: true,
            seed,
            base_size: 520,
            crop_size: 240,
            max_pixels: DEFAULT_MAX_PIXELS,
        }
    }

    /// Validation: in order, nothing dropped, no randomness.
    pub fn validation(batch_size: usize, crop_size: u32) -> Self {
        Self {
            mode: if batch_size == 1 {
                Mode::WholeImage
            } else {
                Mode::Validation
            },
            shuffle: false,
            drop_last: false,
            crop_size,
            ..Self::train(batch_size, 0)
        }
    }
}

/// Worker threads to use by default: the available cores, at most 8.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 8))
}

/// One batch, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// `[n, 3, height, width]`, normalised.
    pub images: Vec<f32>,
    /// `[n, height, width]`, labels (255 = ignore).
    pub labels: Vec<u8>,
    pub n: usize,
    pub height: u32,
    pub width: u32,
    /// Stems of the samples, in batch order.
    pub stems: Vec<String>,
    /// The samples' numbers in the epoch ([`SampleSource::key`]): indices into the source given to [`Loader::spawn`]
    /// / [`Loader::spawn_source`], or positions in the stream for Pipe mode.
    pub indices: Vec<usize>,
}

/// Why a batch could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Image(#[from] ImageDecodeError),
    #[error(transparent)]
    Annotation(#[from] AnnotationError),
    #[error("annotation {}: {err}", file.display())]
    Unmapped {
        file: PathBuf,
        #[source]
        err: UnmappedPixel,
    },
    #[error(
        "annotation {}: labels {labels} are >= num_classes ({num_classes}) and not 255 (ignore); raise num_classes, \
         fix the annotations or add a label_map channel",
        file.display()
    )]
    LabelOutOfRange {
        file: PathBuf,
        labels: String,
        num_classes: u32,
    },
    #[error("image {} with annotation {}: {err}", image.display(), annotation.display())]
    Transform {
        image: PathBuf,
        annotation: PathBuf,
        #[source]
        err: AugmentError,
    },
    #[error(transparent)]
    Pipe(#[from] super::pipe::PipeError),
    #[error("data loader configuration: {0}")]
    Config(String),
    #[error("cannot start a data loader thread: {0}; the machine may be out of threads or memory")]
    Spawn(#[source] std::io::Error),
    #[error("data loader worker crashed while building batch {batch}: {message} (this is a bug, please report it)")]
    WorkerPanicked { batch: usize, message: String },
    #[error("data loader workers stopped before batch {batch} was delivered (this is a bug, please report it)")]
    WorkersGone { batch: usize },
    #[error("data loading was cancelled")]
    Cancelled,
}

/// Number of batches in an epoch of `n` samples.
pub fn batch_count(n: usize, batch_size: usize, drop_last: bool) -> usize {
    if batch_size == 0 {
        0
    } else if drop_last {
        n / batch_size
    } else {
        n.div_ceil(batch_size)
    }
}

/// A 32-byte ChaCha seed from a domain tag and three numbers (no collisions between different inputs).
fn derive_seed(tag: u64, a: u64, b: u64, c: u64) -> [u8; 32] {
    let mut s = [0u8; 32];
    for (i, v) in [tag, a, b, c].into_iter().enumerate() {
        s[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    s
}

const TAG_ORDER: u64 = 0x6f72_6465_7200_0001;
const TAG_SAMPLE: u64 = 0x7361_6d70_6c65_0002;
const TAG_STREAM_ORDER: u64 = 0x7374_7265_616d_0003;

/// The sample order of one epoch: a permutation seeded by (seed, epoch), or 0..n without shuffling.
pub fn epoch_order(n: usize, seed: u64, epoch: u64, shuffle: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if shuffle {
        let mut rng = ChaCha8Rng::from_seed(derive_seed(TAG_ORDER, seed, epoch, 0));
        order.shuffle(&mut rng);
    }
    order
}

/// The RNG that shuffles a stream's examples in an epoch (Pipe mode's shuffle buffer).
pub fn shuffle_rng(seed: u64, epoch: u64) -> ChaCha8Rng {
    ChaCha8Rng::from_seed(derive_seed(TAG_STREAM_ORDER, seed, epoch, 0))
}

/// The RNG a sample's random transform uses in an epoch.
pub fn sample_rng(seed: u64, epoch: u64, index: usize) -> ChaCha8Rng {
    ChaCha8Rng::from_seed(derive_seed(TAG_SAMPLE, seed, epoch, index as u64))
}

/// Where a loader's samples come from: files on disk ([`SamplePair`]s) or encoded bytes already in memory
/// ([`EncodedExample`]s, e.g. records read from a Pipe-mode channel). Implement it to feed other sources.
pub trait SampleSource: Send + Sync {
    /// Number of samples.
    fn len(&self) -> usize;
    /// Whether there are no samples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The sample's stem (reported in [`Batch::stems`]).
    fn stem(&self, index: usize) -> String;
    /// The sample's number in the epoch: it seeds the sample's random transform and is reported in
    /// [`Batch::indices`]. The index itself unless the source is a slice of a longer stream.
    fn key(&self, index: usize) -> usize {
        index
    }
    /// Names of the image and the annotation, for error messages.
    fn names(&self, index: usize) -> (PathBuf, PathBuf);
    /// The decoded RGB image and the RAW annotation values (before the label map).
    fn decode(&self, index: usize, max_pixels: u64) -> Result<(RgbImage, GrayImage), LoadError>;
}

/// File-mode samples.
impl SampleSource for [SamplePair] {
    fn len(&self) -> usize {
        <[SamplePair]>::len(self)
    }
    fn stem(&self, index: usize) -> String {
        self[index].stem.clone()
    }
    fn names(&self, index: usize) -> (PathBuf, PathBuf) {
        (self[index].image.clone(), self[index].annotation.clone())
    }
    fn decode(&self, index: usize, max_pixels: u64) -> Result<(RgbImage, GrayImage), LoadError> {
        let pair = &self[index];
        let image = read_rgb_with_budget(&pair.image, max_pixels)?;
        let label = read_annotation_with_budget(&pair.annotation, max_pixels)?;
        Ok((image, label))
    }
}

/// An encoded image / annotation pair held in memory (one augmented-manifest line read in Pipe mode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedExample {
    /// Position in the epoch's stream (0, 1, 2, ... in arrival order); seeds the example's random transform.
    pub index: usize,
    pub stem: String,
    /// What to call the image in messages (e.g. where in which stream its record was).
    pub image_name: String,
    /// What to call the annotation in messages.
    pub annotation_name: String,
    pub image: Vec<u8>,
    pub annotation: Vec<u8>,
}

impl SampleSource for [EncodedExample] {
    fn len(&self) -> usize {
        <[EncodedExample]>::len(self)
    }
    fn stem(&self, index: usize) -> String {
        self[index].stem.clone()
    }
    fn key(&self, index: usize) -> usize {
        self[index].index
    }
    fn names(&self, index: usize) -> (PathBuf, PathBuf) {
        let p = &self[index];
        (PathBuf::from(&p.image_name), PathBuf::from(&p.annotation_name))
    }
    fn decode(&self, index: usize, max_pixels: u64) -> Result<(RgbImage, GrayImage), LoadError> {
        let (image_name, annotation_name) = self.names(index);
        let p = &self[index];
        let image = decode_rgb_with_budget(&p.image, max_pixels).map_err(|e| e.with_file(&image_name))?;
        let label =
            decode_annotation_with_budget(&p.annotation, max_pixels).map_err(|e| e.with_file(&annotation_name))?;
        Ok((image, label))
    }
}

/// A shared slice as a source (the slice impls above do the work).
struct SliceSource<T>(Arc<[T]>);

impl<T: Send + Sync> SampleSource for SliceSource<T>
where
    [T]: SampleSource,
{
    fn len(&self) -> usize {
        SampleSource::len(&*self.0)
    }
    fn stem(&self, index: usize) -> String {
        self.0.stem(index)
    }
    fn key(&self, index: usize) -> usize {
        self.0.key(index)
    }
    fn names(&self, index: usize) -> (PathBuf, PathBuf) {
        self.0.names(index)
    }
    fn decode(&self, index: usize, max_pixels: u64) -> Result<(RgbImage, GrayImage), LoadError> {
        self.0.decode(index, max_pixels)
    }
}

/// Decode sample `index` and apply the label map: RGB image and labels, before any transform.
pub fn decode_mapped<S: SampleSource + ?Sized>(
    source: &S,
    index: usize,
    lut: &LabelLut,
    max_pixels: u64,
) -> Result<(RgbImage, GrayImage), LoadError> {
    let (image, mut label) = source.decode(index, max_pixels)?;
    lut.apply(&mut label).map_err(|err| LoadError::Unmapped {
        file: source.names(index).1,
        err,
    })?;
    Ok((image, label))
}

fn transform_error<S: SampleSource + ?Sized>(source: &S, index: usize) -> impl FnOnce(AugmentError) -> LoadError + '_ {
    move |err| {
        let (image, annotation) = source.names(index);
        LoadError::Transform { image, annotation, err }
    }
}

/// Decode, label-map and transform sample `index` of `source` (what a worker does per sample).
pub fn load_sample<S: SampleSource + ?Sized>(
    source: &S,
    index: usize,
    lut: &LabelLut,
    cfg: &LoaderConfig,
    epoch: u64,
) -> Result<Sample, LoadError> {
    let (image, label) = decode_mapped(source, index, lut, cfg.max_pixels)?;
    transform_sample(source, index, &image, &label, cfg, epoch)
}

fn transform_sample<S: SampleSource + ?Sized>(
    source: &S,
    index: usize,
    image: &RgbImage,
    label: &GrayImage,
    cfg: &LoaderConfig,
    epoch: u64,
) -> Result<Sample, LoadError> {
    let sample = match cfg.mode {
        Mode::Train => {
            let mut rng = sample_rng(cfg.seed, epoch, source.key(index));
            train_transform(image, label, cfg.base_size, cfg.crop_size, &mut rng)
        }
        Mode::Validation => val_transform(image, label, cfg.crop_size),
        Mode::WholeImage => whole_transform(image, label),
    };
    sample.map_err(transform_error(source, index))
}

/// Everything that turns samples into a batch, besides the samples themselves (shared by [`Loader`] and
/// [`super::stream_loader::StreamLoader`]).
pub struct BatchRecipe {
    pub lut: Arc<LabelLut>,
    pub cfg: LoaderConfig,
    pub epoch: u64,
    /// Check every label (after the label map) against this: for sources nothing validated up front (Pipe mode).
    pub num_classes: Option<u32>,
}

impl BatchRecipe {
    /// Decode and label-map one sample, then check its labels when `num_classes` is set.
    fn decode<S: SampleSource + ?Sized>(&self, source: &S, index: usize) -> Result<(RgbImage, GrayImage), LoadError> {
        let (image, label) = decode_mapped(source, index, &self.lut, self.cfg.max_pixels)?;
        if let Some(num_classes) = self.num_classes {
            let bad = labels_out_of_range(&label, num_classes);
            if !bad.is_empty() {
                return Err(LoadError::LabelOutOfRange {
                    file: source.names(index).1,
                    labels: bad.iter().map(u8::to_string).collect::<Vec<_>>().join(", "),
                    num_classes,
                });
            }
        }
        Ok((image, label))
    }
}

/// The distinct labels in `label` that are neither below `num_classes` nor the ignore label, ascending.
pub fn labels_out_of_range(label: &GrayImage, num_classes: u32) -> Vec<u8> {
    let mut present = [false; 256];
    label.as_raw().iter().for_each(|&l| present[usize::from(l)] = true);
    (0..=255u8)
        .filter(|&l| present[usize::from(l)] && l != IGNORE_LABEL && u32::from(l) >= num_classes)
        .collect()
}

/// Decode, check and transform sample `index` for the fixed-size modes (Train, Validation), writing straight into
/// batch slices.
fn load_sample_into<S: SampleSource + ?Sized>(
    source: &S,
    index: usize,
    recipe: &BatchRecipe,
    out_image: &mut [f32],
    out_label: &mut [u8],
) -> Result<(), LoadError> {
    let cfg = &recipe.cfg;
    let (image, label) = recipe.decode(source, index)?;
    let done = match cfg.mode {
        Mode::Train => {
            let mut rng = sample_rng(cfg.seed, recipe.epoch, source.key(index));
            train_transform_into(
                &image,
                &label,
                cfg.base_size,
                cfg.crop_size,
                &mut rng,
                out_image,
                out_label,
            )
            .map(|_| ())
        }
        Mode::Validation | Mode::WholeImage => val_transform_into(&image, &label, cfg.crop_size, out_image, out_label),
    };
    done.map_err(transform_error(source, index))
}

struct State {
    next_claim: usize,
    yielded: usize,
}

struct Shared {
    state: Mutex<State>,
    cv: Condvar,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Job {
    source: Arc<dyn SampleSource>,
    recipe: BatchRecipe,
    order: Vec<usize>,
    num_batches: usize,
    window: usize,
}

/// An epoch of batches produced on background threads; iterate to receive them in order.
pub struct Loader {
    shared: Arc<Shared>,
    rx: Option<Receiver<(usize, Result<Batch, LoadError>)>>,
    threads: Vec<JoinHandle<()>>,
    pending: BTreeMap<usize, Result<Batch, LoadError>>,
    next: usize,
    num_batches: usize,
}

impl Loader {
    /// Start the workers for `epoch` over File-mode pairs. `lut` is the label map of this split (train or
    /// validation).
    pub fn spawn(
        samples: Arc<[SamplePair]>,
        lut: Arc<LabelLut>,
        cfg: LoaderConfig,
        epoch: u64,
    ) -> Result<Self, LoadError> {
        Self::spawn_source(Arc::new(SliceSource(samples)), lut, cfg, epoch)
    }

    /// Start the workers for `epoch` over any [`SampleSource`].
    pub fn spawn_source(
        source: Arc<dyn SampleSource>,
        lut: Arc<LabelLut>,
        cfg: LoaderConfig,
        epoch: u64,
    ) -> Result<Self, LoadError> {
        if cfg.batch_size == 0 {
            return Err(LoadError::Config("batch_size must be at least 1".to_string()));
        }
        if cfg.mode != Mode::WholeImage && cfg.crop_size == 0 {
            return Err(LoadError::Config("crop_size must be positive".to_string()));
        }
        if cfg.mode == Mode::Train && cfg.base_size == 0 {
            return Err(LoadError::Config("base_size must be positive".to_string()));
        }
        let workers = cfg.workers.max(1);
        let window = workers + cfg.queue_depth;
        let num_batches = batch_count(source.len(), cfg.batch_size, cfg.drop_last);
        let order = epoch_order(source.len(), cfg.seed, epoch, cfg.shuffle);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                next_claim: 0,
                yielded: 0,
            }),
            cv: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let job = Arc::new(Job {
            source,
            recipe: BatchRecipe {
                lut,
                cfg,
                epoch,
                num_classes: None,
            },
            order,
            num_batches,
            window,
        });
        let (tx, rx) = sync_channel(window);
        let mut loader = Self {
            shared: shared.clone(),
            rx: Some(rx),
            threads: Vec::with_capacity(workers),
            pending: BTreeMap::new(),
            next: 0,
            num_batches,
        };
        for i in 0..workers.min(num_batches.max(1)) {
            let (shared, job, tx) = (shared.clone(), job.clone(), tx.clone());
            let handle = std::thread::Builder::new()
                .name(format!("semseg-loader-{i}"))
                .spawn(move || worker(&shared, &job, &tx))
                .map_err(LoadError::Spawn)?; // dropping `loader` stops the threads already started
            loader.threads.push(handle);
        }
        Ok(loader)
    }

    /// Batches this epoch yields in total.
    pub fn num_batches(&self) -> usize {
        self.num_batches
    }

    /// Batches claimed by workers but not yet handed out (being built, queued or held for ordering).
    pub fn in_flight(&self) -> usize {
        let st = self.shared.lock();
        st.next_claim.saturating_sub(st.yielded)
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            let _st = self.shared.lock();
            self.shared.cv.notify_all();
        }
        self.rx = None; // a worker blocked in `send` wakes up with an error
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Iterator for Loader {
    type Item = Result<Batch, LoadError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.num_batches {
            return None;
        }
        loop {
            if let Some(res) = self.pending.remove(&self.next) {
                self.next += 1;
                let mut st = self.shared.lock();
                st.yielded = self.next;
                self.shared.cv.notify_all();
                return Some(res);
            }
            let received = self.rx.as_ref().map(|rx| rx.recv());
            match received {
                Some(Ok((b, res))) => {
                    self.pending.insert(b, res);
                }
                _ => {
                    let batch = self.next;
                    self.next = self.num_batches;
                    return Some(Err(LoadError::WorkersGone { batch }));
                }
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.num_batches - self.next.min(self.num_batches);
        (left, Some(left))
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.stop();
    }
}

fn worker(shared: &Shared, job: &Job, tx: &SyncSender<(usize, Result<Batch, LoadError>)>) {
    loop {
        let b = {
            let mut st = shared.lock();
            loop {
                if shared.stop.load(Ordering::SeqCst) || st.next_claim >= job.num_batches {
                    return;
                }
                if st.next_claim < st.yielded + job.window {
                    break;
                }
                st = shared.cv.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            st.next_claim += 1;
            st.next_claim - 1
        };
        let res = catch_unwind(AssertUnwindSafe(|| build_batch(shared, job, b))).unwrap_or_else(|p| {
            let message = crate::panics::message(p);
            Err(LoadError::WorkerPanicked { batch: b, message })
        });
        if tx.send((b, res)).is_err() {
            return;
        }
    }
}

fn build_batch(shared: &Shared, job: &Job, b: usize) -> Result<Batch, LoadError> {
    let lo = b * job.recipe.cfg.batch_size;
    let hi = (lo + job.recipe.cfg.batch_size).min(job.order.len());
    batch_of(&*job.source, &job.order[lo..hi], &job.recipe, &|| {
        shared.stop.load(Ordering::Relaxed)
    })
}

/// Samples `picks` of `source` as one batch; `cancelled` is polled between samples.
pub fn batch_of<S: SampleSource + ?Sized>(
    source: &S,
    picks: &[usize],
    recipe: &BatchRecipe,
    cancelled: &dyn Fn() -> bool,
) -> Result<Batch, LoadError> {
    let stems = picks.iter().map(|&i| source.stem(i)).collect();
    let indices: Vec<usize> = picks.iter().map(|&i| source.key(i)).collect();
    let cfg = &recipe.cfg;
    if cfg.mode == Mode::WholeImage {
        let mut samples = Vec::with_capacity(picks.len());
        for &i in picks {
            if cancelled() {
                return Err(LoadError::Cancelled);
            }
            let (image, label) = recipe.decode(source, i)?;
            samples.push(transform_sample(source, i, &image, &label, cfg, recipe.epoch)?);
        }
        return Ok(assemble(samples, stems, indices));
    }
    // Fixed-size crops: transform straight into the batch buffers.
    let crop = cfg.crop_size;
    let plane = (crop as usize) * (crop as usize);
    let n = picks.len();
    let mut images = vec![0f32; n * 3 * plane];
    let mut labels = vec![IGNORE_LABEL; n * plane];
    for ((&i, img), lab) in picks
        .iter()
        .zip(images.chunks_exact_mut(3 * plane))
        .zip(labels.chunks_exact_mut(plane))
    {
        if cancelled() {
            return Err(LoadError::Cancelled);
        }
        load_sample_into(source, i, recipe, img, lab)?;
    }
    Ok(Batch {
        images,
        labels,
        n,
        height: crop,
        width: crop,
        stems,
        indices,
    })
}

/// Stack samples into one batch, padding smaller ones (image 0 = mean colour, label 255) bottom/right.
fn assemble(samples: Vec<Sample>, stems: Vec<String>, indices: Vec<usize>) -> Batch {
    let n = samples.len();
    let height = samples.iter().map(|s| s.height).max().unwrap_or(0);
    let width = samples.iter().map(|s| s.width).max().unwrap_or(0);
    let (h, w) = (height as usize, width as usize);
    let plane = h * w;
    let mut images = vec![0f32; n * 3 * plane];
    let mut labels = vec![IGNORE_LABEL; n * plane];
    for (k, s) in samples.into_iter().enumerate() {
        let (sh, sw) = (s.height as usize, s.width as usize);
        if (sh, sw) == (h, w) {
            images[k * 3 * plane..(k + 1) * 3 * plane].copy_from_slice(&s.image);
            labels[k * plane..(k + 1) * plane].copy_from_slice(&s.label);
            continue;
        }
        for y in 0..sh {
            for c in 0..3 {
                let dst = k * 3 * plane + c * plane + y * w;
                let src = c * sh * sw + y * sw;
                images[dst..dst + sw].copy_from_slice(&s.image[src..src + sw]);
            }
            let dst = k * plane + y * w;
            labels[dst..dst + sw].copy_from_slice(&s.label[y * sw..(y + 1) * sw]);
        }
    }
    Batch {
        images,
        labels,
        n,
        height,
        width,
        stems,
        indices,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::label_map::LabelMap;
    use image::{Luma, Rgb};
    use std::path::Path;
    use std::time::{Duration, Instant};

    fn write_palette_png(path: &Path, label: &GrayImage) {
        let file = std::fs::File::create(path).expect("create");
        let mut enc = png::Encoder::new(std::io::BufWriter::new(file), label.width(), label.height());
        enc.set_color(png::ColorType::Indexed);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_palette(
            (0..=255u8)
                .flat_map(|i| [i.wrapping_mul(37), 255 - i, i / 2])
                .collect::<Vec<u8>>(),
        );
        let mut w = enc.write_header().expect("header");
        w.write_image_data(label.as_raw()).expect("data");
    }

    /// `n` pairs of varied sizes: PNG images (lossless, so tests can compare exactly) and palette annotations.
    fn dataset(dir: &Path, n: usize) -> Arc<[SamplePair]> {
        let mut pairs = Vec::new();
        for i in 0..n {
            let (w, h) = (40 + (i as u32 * 7) % 30, 30 + (i as u32 * 11) % 25);
            let img = RgbImage::from_fn(w, h, |x, y| {
                Rgb([(x * 5 + i as u32) as u8, (y * 7) as u8, (i * 20) as u8])
            });
            let lab = GrayImage::from_fn(w, h, |x, y| {
                Luma([if y == 0 {
                    255
                } else {
                    ((x / 10 + i as u32) % 4) as u8 * 2
                }])
            });
            let stem = format!("img_{i:03}");
            let image = dir.join(format!("{stem}.png"));
            let annotation = dir.join(format!("{stem}_ann.png"));
            img.save(&image).expect("save image");
            write_palette_png(&annotation, &lab);
            pairs.push(SamplePair {
                stem,
                image,
                annotation,
            });
        }
        pairs.into()
    }

    fn cfg(mode: Mode, batch_size: usize, workers: usize) -> LoaderConfig {
        LoaderConfig {
            batch_size,
            workers,
            queue_depth: 1,
            mode,
            shuffle: true,
            drop_last: false,
            seed: 7,
            base_size: 48,
            crop_size: 32,
            max_pixels: DEFAULT_MAX_PIXELS,
        }
    }

    fn collect(samples: &Arc<[SamplePair]>, lut: &Arc<LabelLut>, cfg: &LoaderConfig, epoch: u64) -> Vec<Batch> {
        Loader::spawn(samples.clone(), lut.clone(), cfg.clone(), epoch)
            .expect("spawn")
            .map(|b| b.expect("batch"))
            .collect()
    }

    #[test]
    fn identical_batches_for_any_worker_count() {
        let dir = tempfile::tempdir().expect("tempdir");
        let samples = dataset(dir.path(), 11);
        let lut = Arc::new(LabelLut::identity());
        for mode in [Mode::Train, Mode::Validation] {
            let one = collect(&samples, &lut, &cfg(mode, 3, 1), 2);
            let three = collect(&samples, &lut, &cfg(mode, 3, 3), 2);
            assert_eq!(one.len(), 4);
            assert_eq!(one, three, "{mode:?}");
            let again = collect(&samples, &lut, &cfg(mode, 3, 2), 2);
            assert_eq!(one, again);
        }
        let e2 = collect(&samples, &lut, &cfg(Mode::Train, 3, 2), 2);
        let e3 = collect(&samples, &lut, &cfg(Mode::Train, 3, 2), 3);
        assert_ne!(e2[0].indices, e3[0].indices, "each epoch has its own order");
    }

    #[test]
    fn order_shapes_and_drop_last() {
        let dir = tempfile::tempdir().expect("tempdir");
        let samples = dataset(dir.path(), 10);
        let lut = Arc::new(LabelLut::identity());
        let mut c = cfg(Mode::Train, 4, 2);
        c.shuffle = false;
        let batches = collect(&samples, &lut, &c, 0);
        assert_eq!(batches.iter().map(|b| b.n).collect::<Vec<_>>(), vec![4, 4, 2]);
        let stems: Vec<String> = batches.iter().flat_map(|b| b.stems.clone()).collect();
        let want: Vec<String> = (0..10).map(|i| format!("img_{i:03}")).collect();
        assert_eq!(stems, want);
        for b in &batches {
            assert_eq!((b.height, b.width), (32, 32));
            assert_eq!(b.images.len(), b.n * 3 * 32 * 32);
            assert_eq!(b.labels.len(), b.n * 32 * 32);
        }
        c.drop_last = true;
        let dropped = collect(&samples, &lut, &c, 0);
        assert_eq!(dropped.len(), 2);
        assert_eq!(batch_count(10, 4, true), 2);
        assert_eq!(batch_count(10, 4, false), 3);
        assert_eq!(batch_count(8, 4, false), 2);

        c.shuffle = true;
        c.drop_last = false;
        let shuffled = collect(&samples, &lut, &c, 5);
        let mut idx: Vec<usize> = shuffled.iter().flat_map(|b| b.indices.clone()).collect();
        assert_ne!(idx, (0..10).collect::<Vec<_>>(), "shuffled");
        idx.sort_unstable();
        assert_eq!(idx, (0..10).collect::<Vec<_>>(), "each sample exactly once");
        assert_eq!(
            epoch_order(10, 7, 5, true),
            shuffled.iter().flat_map(|b| b.indices.clone()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn samples_match_load_sample_and_label_map_is_applied() {
        let dir = tempfile::tempdir().expect("tempdir");
        let samples = dataset(dir.path(), 5);
        let lut = Arc::new(LabelMap::Scale(2).lut());
        let c = cfg(Mode::Train, 2, 2);
        let batches = collect(&samples, &lut, &c, 1);
        for b in &batches {
            for (k, &i) in b.indices.iter().enumerate() {
                let s = load_sample(&samples[..], i, &lut, &c, 1).expect("sample");
                let plane = 32 * 32;
                assert_eq!(&b.images[k * 3 * plane..(k + 1) * 3 * plane], &s.image[..]);
                assert_eq!(&b.labels[k * plane..(k + 1) * plane], &s.label[..]);
                assert!(
                    s.label.iter().all(|&l| l <= 3 || l == 255),
                    "raw 0,2,4,6 scaled to 0..3"
                );
                assert!(s.label.contains(&3));
            }
        }
    }

    #[test]
    fn whole_image_batches_pad_to_the_largest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let samples = dataset(dir.path(), 3);
        let lut = Arc::new(LabelLut::identity());
        let mut c = cfg(Mode::WholeImage, 2, 1);
        c.shuffle = false;
        let batches = collect(&samples, &lut, &c, 0);
        assert_eq!((batches[0].width, batches[0].height), (47, 41)); // sample 0: 40x30, sample 1: 47x41
        let plane = 47 * 41;
        assert_eq!(batches[0].labels[40], 255, "padding right of the 40-wide image");
        assert_eq!(batches[0].images[40], 0.0);
        assert_eq!(batches[0].labels[plane + 46 + 47], 2, "second image fills the width");
        assert_eq!((batches[1].width, batches[1].height, batches[1].n), (54, 52, 1));
        let one = collect(&samples, &lut, &LoaderConfig::validation(1, 32), 0);
        assert_eq!((one[0].width, one[0].height), (40, 30));
    }

    #[test]
    fn an_error_names_the_file_and_other_batches_still_arrive() {
        let dir = tempfile::tempdir().expect("tempdir");
        let samples = dataset(dir.path(), 6);
        std::fs::write(&samples[3].annotation, b"\x89PNG\r\n\x1a\nbroken").expect("corrupt");
        let lut = Arc::new(LabelLut::identity());
        let mut c = cfg(Mode::Validation, 2, 2);
        c.shuffle = false;
        let results: Vec<_> = Loader::spawn(samples.clone(), lut, c.clone(), 0)
            .expect("spawn")
            .collect();
        assert_eq!(results.len(), 3);
        assert!(results[0].is_ok() && results[2].is_ok());
        let msg = results[1].as_ref().expect_err("batch 1 holds sample 3").to_string();
        assert!(msg.contains("img_003_ann.png") && msg.contains("corrupt"), "{msg}");

        // Unmapped raw values under a `map` label map name the annotation and the value.
        let samples = dataset(dir.path(), 2);
        let map = LabelMap::parse(r#"{"map": {"0": 0, "1": 2, "2": 4}}"#)
            .expect("map")
            .lut();
        let results: Vec<_> = Loader::spawn(samples, Arc::new(map), c, 0).expect("spawn").collect();
        let msg = results[0].as_ref().expect_err("6 is unmapped").to_string();
        assert!(
            msg.contains("img_000_ann.png") && msg.contains("pixel value 6 has no entry"),
            "{msg}"
        );

        let missing: Arc<[SamplePair]> = vec![SamplePair {
            stem: "gone".into(),
            image: dir.path().join("gone.jpg"),
            annotation: dir.path().join("gone.png"),
        }]
        .into();
        let err = Loader::spawn(missing, Arc::new(LabelLut::identity()), cfg(Mode::Train, 1, 1), 0)
            .expect("spawn")
            .next()
            .expect("one batch")
            .expect_err("missing file");
        assert!(err.to_string().contains("gone.jpg"), "{err}");
    }

    #[test]
    fn memory_is_bounded_and_early_drop_stops_promptly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let samples = dataset(dir.path(), 4);
        // 4 files reused for 400 samples: plenty of batches.
        let many: Arc<[SamplePair]> = (0..400).map(|i| samples[i % 4].clone()).collect::<Vec<_>>().into();
        let lut = Arc::new(LabelLut::identity());
        let mut c = cfg(Mode::Train, 2, 3);
        c.queue_depth = 2;
        let mut loader = Loader::spawn(many, lut, c, 0).expect("spawn");
        assert_eq!(loader.num_batches(), 200);
        let first = loader.next().expect("first").expect("ok");
        assert_eq!(first.n, 2);
        std::thread::sleep(Duration::from_millis(300));
        let in_flight = loader.in_flight();
        assert!(
            in_flight <= 5,
            "at most workers + queue_depth batches in flight, got {in_flight}"
        );
        assert!(in_flight >= 1, "workers run ahead of the consumer");
        let t = Instant::now();
        drop(loader);
        assert!(t.elapsed() < Duration::from_secs(2), "drop took {:?}", t.elapsed());
    }

    #[test]
    fn bad_config_and_empty_inputs() {
        let lut = Arc::new(LabelLut::identity());
        let none: Arc<[SamplePair]> = Vec::new().into();
        assert!(Loader::spawn(none.clone(), lut.clone(), cfg(Mode::Train, 0, 1), 0).is_err());
        let mut c = cfg(Mode::Train, 2, 1);
        c.crop_size = 0;
        assert!(Loader::spawn(none.clone(), lut.clone(), c, 0).is_err());
        let mut l = Loader::spawn(none, lut, cfg(Mode::Train, 2, 4), 0).expect("empty is fine");
        assert!(l.next().is_none());
    }
}

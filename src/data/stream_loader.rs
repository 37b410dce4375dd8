//! Batches from a stream of encoded examples that cannot be indexed (Pipe mode), overlapping the training step.
//!
//! One reader thread opens the stream (waiting for a FIFO if need be), reads examples, mixes them in a bounded
//! [`ShuffleBuffer`] seeded by (seed, epoch), cuts them into batches and queues them; `workers` threads decode,
//! label-map, check and transform each batch exactly as [`super::loader::Loader`] does ([`batch_of`]); the iterator
//! hands batches out in order.
//!
//! - Bounded: the reader may only queue batch `b` while `b < yielded + workers + queue_depth`; with the shuffle buffer
//!   and the reader's partial batch, that bounds the encoded and decoded examples alive at once.
//! - Reproducible: a sample's random transform is seeded by (seed, epoch, its position in the stream), the shuffle by
//!   (seed, epoch): the same stream gives the same batches for any worker count.
//! - A read error (truncated stream, odd record count, FIFO that never appeared) arrives in order, after the batches
//!   before it, as an `Err`, and ends the epoch.
//! - Dropping the loader stops and joins the workers. The reader thread is left to end on its own: a read from a
//!   FIFO cannot be interrupted, and it stops at its next record.

use std::collections::{BTreeMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use super::loader::{batch_of, shuffle_rng, Batch, BatchRecipe, EncodedExample, LoadError};
use super::shuffle_buffer::ShuffleBuffer;

/// What workers and the reader send to the consumer.
enum Delivery {
    Batch(usize, Result<Batch, LoadError>),
    /// The epoch has this many batches (errors included).
    End(usize),
    /// The reader thread panicked (a bug): nothing more will be queued.
    ReaderCrashed(String),
}

struct Work {
    batch: usize,
    examples: Vec<EncodedExample>,
}

struct State {
    yielded: usize,
    queue: VecDeque<Work>,
    reader_done: bool,
}

struct Shared {
    state: Mutex<State>,
    cv: Condvar,
    stop: AtomicBool,
    window: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.cv.wait(guard).unwrap_or_else(|e| e.into_inner())
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// One epoch of a stream, as batches produced on background threads; iterate to receive them in order.
pub struct StreamLoader {
    shared: Arc<Shared>,
    rx: Option<Receiver<Delivery>>,
    workers: Vec<JoinHandle<()>>,
    pending: BTreeMap<usize, Result<Batch, LoadError>>,
    next: usize,
    total: Option<usize>,
}

impl StreamLoader {
    /// Start the threads. `open` runs on the reader thread and returns the stream's examples; `shuffle_buffer`
    /// examples are held back for shuffling when `recipe.cfg.shuffle` is set.
    pub fn spawn<I>(
        open: impl FnOnce() -> Result<I, LoadError> + Send + 'static,
        recipe: BatchRecipe,
        shuffle_buffer: usize,
    ) -> Result<Self, LoadError>
    where
        I: Iterator<Item = Result<EncodedExample, LoadError>>,
    {
        let cfg = &recipe.cfg;
        if cfg.batch_size == 0 {
            return Err(LoadError::Config("batch_size must be at least 1".to_string()));
        }
        if cfg.mode != super::loader::Mode::WholeImage && cfg.crop_size == 0 {
            return Err(LoadError::Config("crop_size must be positive".to_string()));
        }
        let workers = cfg.workers.max(1);
        let window = workers + cfg.queue_depth;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                yielded: 0,
                queue: VecDeque::new(),
                reader_done: false,
            }),
            cv: Condvar::new(),
            stop: AtomicBool::new(false),
            window,
        });
        let (tx, rx) = sync_channel(window);
        let mut loader = Self {
            shared: shared.clone(),
            rx: Some(rx),
            workers: Vec::with_capacity(workers),
            pending: BTreeMap::new(),
            next: 0,
            total: None,
        };
        let recipe = Arc::new(recipe);
        for i in 0..workers {
            let (shared, recipe, tx) = (shared.clone(), recipe.clone(), tx.clone());
            let handle = std::thread::Builder::new()
                .name(format!("semseg-stream-{i}"))
                .spawn(move || decode_worker(&shared, &recipe, &tx))
                .map_err(LoadError::Spawn)?; // dropping `loader` stops the threads already started
            loader.workers.push(handle);
        }
        let capacity = if recipe.cfg.shuffle { shuffle_buffer } else { 0 };
        let buffer = ShuffleBuffer::new(capacity, shuffle_rng(recipe.cfg.seed, recipe.epoch));
        let (batch_size, drop_last) = (recipe.cfg.batch_size, recipe.cfg.drop_last);
        std::thread::Builder::new()
            .name("semseg-stream-reader".to_string())
            .spawn(move || {
                let outcome = catch_unwind(AssertUnwindSafe(|| {
                    read_batches(&shared, open, buffer, batch_size, drop_last, &tx)
                }));
                if let Err(panic) = outcome {
                    let _ = tx.send(Delivery::ReaderCrashed(panic_message(&*panic)));
                }
                shared.lock().reader_done = true;
                shared.cv.notify_all();
            })
            .map_err(LoadError::Spawn)?;
        Ok(loader)
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            let _st = self.shared.lock();
            self.shared.cv.notify_all();
        }
        self.rx = None; // a worker blocked in `send` wakes up with an error
        for t in self.workers.drain(..) {
            let _ = t.join();
        }
    }
}

/// The reader thread: examples → shuffle buffer → batches of encoded examples on the work queue.
fn read_batches<I>(
    shared: &Shared,
    open: impl FnOnce() -> Result<I, LoadError>,
    mut buffer: ShuffleBuffer<EncodedExample>,
    batch_size: usize,
    drop_last: bool,
    tx: &SyncSender<Delivery>,
) where
    I: Iterator<Item = Result<EncodedExample, LoadError>>,
{
    let mut queued = 0;
    let fail = |batch: usize, err: LoadError| {
        let _ = tx.send(Delivery::Batch(batch, Err(err)));
        let _ = tx.send(Delivery::End(batch + 1));
    };
    let examples = match open() {
        Ok(examples) => examples,
        Err(err) => return fail(0, err),
    };
    let mut current = Vec::with_capacity(batch_size);
    let queue = |examples: Vec<EncodedExample>, queued: &mut usize| -> bool {
        let mut st = shared.lock();
        while !shared.stopped() && *queued >= st.yielded + shared.window {
            st = shared.wait(st);
        }
        if shared.stopped() {
            return false;
        }
        st.queue.push_back(Work {
            batch: *queued,
            examples,
        });
        *queued += 1;
        shared.cv.notify_all();
        true
    };
    for example in examples {
        if shared.stopped() {
            return;
        }
        match example {
            Ok(example) => {
                if let Some(out) = buffer.push(example) {
                    current.push(out);
                }
            }
            Err(err) => return fail(queued, err),
        }
        if current.len() == batch_size
            && !queue(
                std::mem::replace(&mut current, Vec::with_capacity(batch_size)),
                &mut queued,
            )
        {
            return;
        }
    }
    for example in buffer.drain() {
        current.push(example);
        if current.len() == batch_size
            && !queue(
                std::mem::replace(&mut current, Vec::with_capacity(batch_size)),
                &mut queued,
            )
        {
            return;
        }
    }
    if !current.is_empty() && !drop_last && !queue(current, &mut queued) {
        return;
    }
    let _ = tx.send(Delivery::End(queued));
}

fn decode_worker(shared: &Shared, recipe: &BatchRecipe, tx: &SyncSender<Delivery>) {
    loop {
        let work = {
            let mut st = shared.lock();
            loop {
                if shared.stopped() {
                    return;
                }
                if let Some(work) = st.queue.pop_front() {
                    break work;
                }
                if st.reader_done {
                    return;
                }
                st = shared.wait(st);
            }
        };
        let picks: Vec<usize> = (0..work.examples.len()).collect();
        let result = catch_unwind(AssertUnwindSafe(|| {
            batch_of(&work.examples[..], &picks, recipe, &|| shared.stopped())
        }))
        .unwrap_or_else(|panic| {
            Err(LoadError::WorkerPanicked {
                batch: work.batch,
                message: panic_message(&*panic),
            })
        });
        if tx.send(Delivery::Batch(work.batch, result)).is_err() {
            return;
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string())
}

impl Iterator for StreamLoader {
    type Item = Result<Batch, LoadError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.total.is_some_and(|total| self.next >= total) {
                return None;
            }
            if let Some(result) = self.pending.remove(&self.next) {
                self.next += 1;
                self.shared.lock().yielded = self.next;
                self.shared.cv.notify_all();
                return Some(result);
            }
            let received = self.rx.as_ref().map(Receiver::recv);
            match received {
                Some(Ok(Delivery::ReaderCrashed(message))) => {
                    let batch = self.next;
                    self.total = Some(batch);
                    return Some(Err(LoadError::WorkerPanicked { batch, message }));
                }
                Some(Ok(Delivery::Batch(batch, result))) => {
                    self.pending.insert(batch, result);
                }
                Some(Ok(Delivery::End(total))) => self.total = Some(total),
                _ => {
                    let batch = self.next;
                    self.total = Some(batch);
                    return Some(Err(LoadError::WorkersGone { batch }));
                }
            }
        }
    }
}

impl Drop for StreamLoader {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::dataset::SamplePair;
    use crate::data::image_io::DEFAULT_MAX_PIXELS;
    use crate::data::label_map::LabelLut;
    use crate::data::loader::{Loader, LoaderConfig, Mode};
    use image::{GrayImage, Luma, Rgb, RgbImage};
    use std::path::Path;
    use std::time::{Duration, Instant};

    /// `n` PNG pairs on disk (lossless, so batches can be compared exactly) with labels 0..=3 and 255.
    fn dataset(dir: &Path, n: usize) -> Vec<SamplePair> {
        (0..n)
            .map(|i| {
                let (w, h) = (40 + (i as u32 * 7) % 30, 30 + (i as u32 * 11) % 25);
                let image = dir.join(format!("img_{i:03}.png"));
                let annotation = dir.join(format!("img_{i:03}_ann.png"));
                RgbImage::from_fn(w, h, |x, y| {
                    Rgb([(x * 5 + i as u32) as u8, (y * 7) as u8, (i * 20) as u8])
                })
                .save(&image)
                .expect("save image");
                GrayImage::from_fn(w, h, |x, y| {
                    Luma([if y == 0 { 255 } else { ((x / 10 + i as u32) % 4) as u8 }])
                })
                .save(&annotation)
                .expect("save annotation");
                SamplePair {
                    stem: format!("img_{i:03}"),
                    image,
                    annotation,
                }
            })
            .collect()
    }

    fn encoded(pairs: &[SamplePair]) -> Vec<EncodedExample> {
        pairs
            .iter()
            .enumerate()
            .map(|(index, p)| EncodedExample {
                index,
                stem: p.stem.clone(),
                image_name: format!("record {} image", 2 * index),
                annotation_name: format!("record {} annotation", 2 * index + 1),
                image: std::fs::read(&p.image).expect("read"),
                annotation: std::fs::read(&p.annotation).expect("read"),
            })
            .collect()
    }

    fn cfg(mode: Mode, batch_size: usize, workers: usize, shuffle: bool) -> LoaderConfig {
        LoaderConfig {
            batch_size,
            workers,
            queue_depth: 1,
            mode,
            shuffle,
            drop_last: false,
            seed: 7,
            base_size: 48,
            crop_size: 32,
            max_pixels: DEFAULT_MAX_PIXELS,
        }
    }

    fn recipe(cfg: LoaderConfig, epoch: u64, num_classes: Option<u32>) -> BatchRecipe {
        BatchRecipe {
            lut: Arc::new(LabelLut::identity()),
            cfg,
            epoch,
            num_classes,
        }
    }

    fn stream(
        examples: Vec<Result<EncodedExample, LoadError>>,
        cfg: LoaderConfig,
        epoch: u64,
        buffer: usize,
    ) -> Vec<Result<Batch, LoadError>> {
        StreamLoader::spawn(move || Ok(examples.into_iter()), recipe(cfg, epoch, Some(4)), buffer)
            .expect("spawn")
            .collect()
    }

    fn ok(examples: &[EncodedExample]) -> Vec<Result<EncodedExample, LoadError>> {
        examples.iter().cloned().map(Ok).collect()
    }

    #[test]
    fn unshuffled_streams_give_the_file_loaders_batches() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pairs = dataset(dir.path(), 7);
        let examples = encoded(&pairs);
        for mode in [Mode::Train, Mode::Validation, Mode::WholeImage] {
            let c = cfg(mode, 3, 2, false);
            let files: Vec<Batch> = Loader::spawn(pairs.clone().into(), Arc::new(LabelLut::identity()), c.clone(), 4)
                .expect("spawn")
                .map(|b| b.expect("batch"))
                .collect();
            let streamed: Vec<Batch> = stream(ok(&examples), c, 4, 64)
                .into_iter()
                .map(|b| b.expect("batch"))
                .collect();
            assert_eq!(files, streamed, "{mode:?}");
        }
    }

    #[test]
    fn shuffled_streams_are_reproducible_whole_and_differ_per_epoch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let examples = encoded(&dataset(dir.path(), 9));
        let order = |workers: usize, epoch: u64, drop_last: bool| -> Vec<Vec<usize>> {
            let mut c = cfg(Mode::Train, 2, workers, true);
            c.drop_last = drop_last;
            stream(ok(&examples), c, epoch, 16)
                .into_iter()
                .map(|b| b.expect("batch").indices)
                .collect()
        };
        let one = order(1, 3, false);
        assert_eq!(one, order(3, 3, false), "worker count does not change the batches");
        let mut all: Vec<usize> = one.concat();
        assert_ne!(all, (0..9).collect::<Vec<_>>(), "shuffled");
        all.sort_unstable();
        assert_eq!(all, (0..9).collect::<Vec<_>>(), "each example exactly once");
        assert_ne!(one, order(1, 4, false), "each epoch has its own order");
        assert_eq!(order(2, 3, true).len(), 4, "the last partial batch is dropped");
    }

    #[test]
    fn read_and_decode_errors_arrive_in_order_and_end_the_epoch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let examples = encoded(&dataset(dir.path(), 6));
        let c = cfg(Mode::Validation, 2, 2, false);

        let mut items = ok(&examples[..5]);
        items.push(Err(LoadError::Config("the stream broke".into())));
        let results = stream(items, c.clone(), 0, 0);
        assert_eq!(results.len(), 3, "two whole batches, then the error");
        assert!(results[0].is_ok() && results[1].is_ok());
        assert!(results[2]
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("the stream broke"));

        let mut broken = examples.clone();
        broken[3].image = b"not an image at all".to_vec();
        let results = stream(ok(&broken), c.clone(), 0, 0);
        let err = results[1].as_ref().expect_err("example 3 is in batch 1").to_string();
        assert!(
            err.contains("record 6 image") && err.contains("not a JPEG or PNG"),
            "{err}"
        );

        // Labels after the label map are checked against num_classes (4 here): 7 is out of range.
        let mut out_of_range = examples.clone();
        let mut png = Vec::new();
        GrayImage::from_pixel(40, 30, Luma([7]))
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .expect("encode");
        out_of_range[0].annotation = png;
        let err = stream(ok(&out_of_range), c.clone(), 0, 0)
            .remove(0)
            .expect_err("label 7");
        assert!(
            err.to_string()
                .contains("record 1 annotation: labels 7 are >= num_classes (4)"),
            "{err}"
        );

        let failed_open = StreamLoader::spawn(
            || Err::<std::vec::IntoIter<Result<EncodedExample, LoadError>>, _>(LoadError::Cancelled),
            recipe(c, 0, None),
            0,
        )
        .expect("spawn")
        .collect::<Vec<_>>();
        assert!(matches!(failed_open[..], [Err(LoadError::Cancelled)]));
    }

    #[test]
    fn the_reader_stays_a_bounded_distance_ahead_and_drop_is_prompt() {
        let dir = tempfile::tempdir().expect("tempdir");
        let examples = encoded(&dataset(dir.path(), 2));
        let read = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = read.clone();
        let endless = (0..).map(move |i| {
            counter.fetch_add(1, Ordering::SeqCst);
            let mut e = examples[i % 2].clone();
            e.index = i;
            Ok(e)
        });
        let c = cfg(Mode::Train, 2, 2, true);
        let mut loader = StreamLoader::spawn(move || Ok(endless), recipe(c, 0, None), 8).expect("spawn");
        loader.next().expect("a batch").expect("ok");
        std::thread::sleep(Duration::from_millis(300));
        // Batch 0 yielded, batches 1..=3 queued (window: 2 workers + queue depth 1), 8 examples in the shuffle buffer,
        // and the 2 of batch 4, which waits for room: 18 examples read, no more.
        let ahead = read.load(Ordering::SeqCst);
        assert!((10..=18).contains(&ahead), "the reader read {ahead} examples");
        let started = Instant::now();
        drop(loader);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "drop took {:?}",
            started.elapsed()
        );
    }
}

//! Pipe mode: a channel's examples streamed through FIFOs `<ml-root>/input/data/<channel>_<n>`, one per reading of
//! the channel (the platform creates `_<n+1>` once `_<n>` has been drained and closed).
//!
//! With an augmented manifest (`RecordWrapperType: RecordIO`, `AttributeNames: ["source-ref", "<x>-ref"]`) every
//! manifest line arrives as two RecordIO records: the image's bytes, then the annotation's. [`ExampleReader`] pairs
//! them, one example at a time (an epoch is never held in memory), and names every problem by channel, epoch, record
//! index and byte offset, so a bad record can be found in the manifest.

use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::loader::EncodedExample;
use super::recordio::{RecordIoError, RecordReader};
use crate::sagemaker::MlRoot;

/// Environment variable: how many seconds to wait for a channel's next FIFO to appear.
pub const WAIT_ENV: &str = "SEMSEG_PIPE_WAIT_SECS";
/// Default wait for a FIFO: the platform may take a while to start streaming a large channel.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(600);
/// Environment variable: how many examples the shuffle buffer of a Pipe-mode training channel holds.
pub const SHUFFLE_ENV: &str = "SEMSEG_PIPE_SHUFFLE_BUFFER";
/// Default shuffle buffer: a whole epoch of a small dataset, a window of a large one, at most a few hundred MB of
/// encoded images.
pub const DEFAULT_SHUFFLE_BUFFER: usize = 256;
/// Read buffer in front of a FIFO: large reads keep the number of system calls per record low.
const READ_BUFFER: usize = 1 << 20;
/// How often the wait for a FIFO looks for it.
const POLL: Duration = Duration::from_millis(20);

/// The wait for a FIFO: [`WAIT_ENV`] seconds (fractions allowed), or [`DEFAULT_WAIT`].
pub fn wait_from_env() -> Result<Duration, String> {
    match std::env::var(WAIT_ENV) {
        Err(_) => Ok(DEFAULT_WAIT),
        Ok(text) => text
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(Duration::from_secs_f64)
            .ok_or_else(|| format!("{WAIT_ENV} is '{text}'; set it to a number of seconds, such as 600")),
    }
}

/// The shuffle buffer's size: [`SHUFFLE_ENV`] examples, or [`DEFAULT_SHUFFLE_BUFFER`].
pub fn shuffle_buffer_from_env() -> Result<usize, String> {
    match std::env::var(SHUFFLE_ENV) {
        Err(_) => Ok(DEFAULT_SHUFFLE_BUFFER),
        Ok(text) => text
            .trim()
            .parse()
            .map_err(|_| format!("{SHUFFLE_ENV} is '{text}'; set it to a number of examples, such as 256")),
    }
}

/// One Pipe-mode channel: where its FIFOs are, what its records hold, and which FIFO comes next.
#[derive(Debug)]
pub struct PipeChannel {
    pub channel: String,
    ml: MlRoot,
    /// The manifest attributes of each record pair, for messages: the image's, then the annotation's.
    pub attributes: [String; 2],
    pub wait: Duration,
    /// Examples held back for shuffling (1 or less: stream order).
    pub shuffle_buffer: usize,
    readings: AtomicUsize,
}

impl PipeChannel {
    pub fn new(ml: &MlRoot, channel: &str, attributes: [String; 2], wait: Duration, shuffle_buffer: usize) -> Self {
        Self {
            channel: channel.to_string(),
            ml: ml.clone(),
            attributes,
            wait,
            shuffle_buffer,
            readings: AtomicUsize::new(0),
        }
    }

    /// Claim the FIFO of this process's next reading of the channel. The platform numbers FIFOs per container,
    /// from `_0`: a job resumed from a checkpoint in a new container reads `_0` first, whatever its epoch.
    pub fn next_fifo(&self) -> PathBuf {
        let n = self.readings.fetch_add(1, Ordering::SeqCst);
        self.ml.channel_fifo(&self.channel, n)
    }
}

/// Which stream a record came from, for messages: `channel 'train', epoch 3 (FIFO /opt/ml/input/data/train_2)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamOrigin {
    pub channel: String,
    /// 1-based, as in the `#metrics epoch=` log lines.
    pub epoch: u64,
    pub fifo: PathBuf,
}

impl fmt::Display for StreamOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "channel '{}', epoch {} (FIFO {})",
            self.channel,
            self.epoch,
            self.fifo.display()
        )
    }
}

/// Why a Pipe-mode stream could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PipeError {
    #[error(
        "{origin}: the FIFO did not appear within {waited_s:.1} s; the platform creates it once the previous one is \
         drained. Check that the channel is configured in Pipe mode, or wait longer with {WAIT_ENV}"
    )]
    NoFifo { origin: StreamOrigin, waited_s: f64 },
    #[error("{origin}: cannot open the FIFO")]
    Open {
        origin: StreamOrigin,
        #[source]
        err: io::Error,
    },
    #[error("{origin}: the stream holds no records; an augmented manifest must list at least one image")]
    Empty { origin: StreamOrigin },
    #[error(
        "{origin}: record {record} (counting from 0; manifest line {line}) starting at byte {offset} is unreadable"
    )]
    Stream {
        origin: StreamOrigin,
        record: usize,
        line: usize,
        offset: u64,
        #[source]
        err: RecordIoError,
    },
    #[error(
        "{origin}: the stream ended after {records} records, an odd number: record {last} (counting from 0; \
         manifest line {line}) at byte {offset} is an image with no annotation record. In Pipe mode each manifest \
         line must send two records ({attributes}): check the channel's AttributeNames"
    )]
    OddRecordCount {
        origin: StreamOrigin,
        records: usize,
        last: usize,
        line: usize,
        offset: u64,
        attributes: String,
    },
}

/// Wait (bounded, logged once) for `origin.fifo` to exist, then open it for reading. Opening blocks until the
/// platform opens its end, as SageMaker's readers do; a regular file at that path is read as well.
pub fn open_fifo(origin: &StreamOrigin, wait: Duration) -> Result<BufReader<File>, PipeError> {
    let started = Instant::now();
    let mut logged = false;
    while !origin.fifo.exists() {
        if started.elapsed() >= wait {
            return Err(PipeError::NoFifo {
                origin: origin.clone(),
                waited_s: wait.as_secs_f64(),
            });
        }
        if !logged {
            tracing::info!(
                channel = %origin.channel,
                epoch = origin.epoch,
                "waiting up to {:.0} s for the Pipe-mode FIFO {} ({WAIT_ENV})",
                wait.as_secs_f64(),
                origin.fifo.display()
            );
            logged = true;
        }
        std::thread::sleep(POLL.min(wait.saturating_sub(started.elapsed())));
    }
    let file = File::open(&origin.fifo).map_err(|err| PipeError::Open {
        origin: origin.clone(),
        err,
    })?;
    tracing::debug!(fifo = %origin.fifo.display(), "reading the Pipe-mode FIFO");
    Ok(BufReader::with_capacity(READ_BUFFER, file))
}

/// Pairs of RecordIO records (image, annotation) as [`EncodedExample`]s, numbered in arrival order. Stops after the
/// first error.
pub struct ExampleReader<R> {
    records: RecordReader<R>,
    origin: Arc<StreamOrigin>,
    attributes: [String; 2],
    next_record: usize,
    next_example: usize,
    finished: bool,
}

impl<R: Read> ExampleReader<R> {
    pub fn new(reader: R, origin: StreamOrigin, attributes: [String; 2]) -> Self {
        Self {
            records: RecordReader::new(reader),
            origin: Arc::new(origin),
            attributes,
            next_record: 0,
            next_example: 0,
            finished: false,
        }
    }

    /// The next record with its index and starting byte; `None` at a clean end of the stream.
    fn record(&mut self) -> Result<Option<(Vec<u8>, usize, u64)>, PipeError> {
        let (index, offset) = (self.next_record, self.records.offset());
        match self.records.next_record() {
            Ok(Some(data)) => {
                self.next_record += 1;
                Ok(Some((data, index, offset)))
            }
            Ok(None) => Ok(None),
            Err(err) => Err(PipeError::Stream {
                origin: (*self.origin).clone(),
                record: index,
                line: index / 2 + 1,
                offset,
                err,
            }),
        }
    }

    fn example(&mut self) -> Result<Option<EncodedExample>, PipeError> {
        let Some((image, image_record, image_offset)) = self.record()? else {
            if self.next_record == 0 {
                return Err(PipeError::Empty {
                    origin: (*self.origin).clone(),
                });
            }
            return Ok(None);
        };
        let Some((annotation, annotation_record, annotation_offset)) = self.record()? else {
            return Err(PipeError::OddRecordCount {
                origin: (*self.origin).clone(),
                records: self.next_record,
                last: image_record,
                line: image_record / 2 + 1,
                offset: image_offset,
                attributes: self.attributes.join(", then "),
            });
        };
        let index = self.next_example;
        self.next_example += 1;
        let fifo_name = fifo_name(&self.origin.fifo);
        let name = |record: usize, offset: u64, attribute: &str| {
            format!(
                "{}, record {record} (counting from 0) at byte {offset}, the {attribute} of manifest line {}",
                self.origin,
                index + 1
            )
        };
        Ok(Some(EncodedExample {
            index,
            stem: format!("{fifo_name}#{index}"),
            image_name: name(image_record, image_offset, &self.attributes[0]),
            annotation_name: name(annotation_record, annotation_offset, &self.attributes[1]),
            image,
            annotation,
        }))
    }
}

impl<R: Read> Iterator for ExampleReader<R> {
    type Item = Result<EncodedExample, PipeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.finished {
            return None;
        }
        let next = self.example().transpose();
        if !matches!(next, Some(Ok(_))) {
            self.finished = true;
        }
        next
    }
}

/// Open `origin.fifo` (waiting for it) and read its examples.
pub fn read_examples(
    origin: StreamOrigin,
    attributes: [String; 2],
    wait: Duration,
) -> Result<ExampleReader<BufReader<File>>, PipeError> {
    let reader = open_fifo(&origin, wait)?;
    Ok(ExampleReader::new(reader, origin, attributes))
}

/// The FIFO path's file name (`train_3`), for stems and logs.
pub fn fifo_name(path: &Path) -> String {
    path.file_name()
        .map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::recordio::{RecordWriter, MAGIC};

    fn origin() -> StreamOrigin {
        StreamOrigin {
            channel: "train".into(),
            epoch: 2,
            fifo: PathBuf::from("/ml/input/data/train_1"),
        }
    }

    fn attributes() -> [String; 2] {
        ["source-ref".into(), "city-streets-ref".into()]
    }

    fn stream(records: &[&[u8]]) -> Vec<u8> {
        let mut writer = RecordWriter::dmlc_splitting(Vec::new());
        for r in records {
            writer.write_record(r).expect("writing to a Vec");
        }
        writer.into_inner()
    }

    fn read(bytes: &[u8]) -> Vec<Result<EncodedExample, PipeError>> {
        ExampleReader::new(bytes, origin(), attributes()).collect()
    }

    #[test]
    fn records_pair_into_numbered_examples_and_split_records_are_joined() {
        let magic = MAGIC.to_le_bytes();
        let split_image = [&b"imag"[..], &magic, b"e-0"].concat();
        let bytes = stream(&[&split_image, b"ann-0", b"image-1", b"ann-1"]);
        let examples: Vec<EncodedExample> = read(&bytes).into_iter().map(|e| e.expect("example")).collect();
        assert_eq!(examples.len(), 2);
        assert_eq!(examples[0].image, split_image);
        assert_eq!((examples[1].index, &examples[1].annotation[..]), (1, &b"ann-1"[..]));
        assert_eq!(examples[1].stem, "train_1#1");
        let name = &examples[1].annotation_name;
        assert!(
            name.contains("channel 'train', epoch 2")
                && name.contains("record 3 ")
                && name.contains("city-streets-ref of manifest line 2"),
            "{name}"
        );
        // Record 2 starts after record 0's two parts (8 + 4 bytes, 8 + 3 + 1 padding) and record 1 (8 + 5 + 3).
        assert!(
            examples[1].image_name.contains("at byte 40"),
            "{}",
            examples[1].image_name
        );
    }

    #[test]
    fn odd_counts_truncation_corruption_and_empty_streams_name_the_record() {
        let bytes = stream(&[b"image-0", b"ann-0", b"image-1"]);
        let results = read(&bytes);
        assert_eq!(results.len(), 2, "one example, then the error, then nothing");
        let err = results[1].as_ref().expect_err("odd").to_string();
        assert!(
            err.contains("ended after 3 records, an odd number: record 2")
                && err.contains("manifest line 2")
                && err.contains("source-ref, then city-streets-ref")
                && err.contains("FIFO /ml/input/data/train_1"),
            "{err}"
        );

        let whole = stream(&[b"image-0", b"ann-0", b"image-1", b"ann-1"]);
        let results = read(&whole[..whole.len() - 5]);
        let err = results.last().unwrap().as_ref().expect_err("truncated");
        assert!(matches!(err, PipeError::Stream { record: 3, .. }), "{err:?}");
        let chain = format!("{err}: {}", std::error::Error::source(err).unwrap());
        assert!(
            chain.contains("record 3 (counting from 0; manifest line 2) starting at byte 48")
                && chain.contains("truncated"),
            "{chain}"
        );

        let mut corrupt = whole.clone();
        corrupt[16] ^= 0xff; // the magic number of record 1
        let err = read(&corrupt).pop().unwrap().expect_err("bad magic");
        assert!(
            matches!(
                err,
                PipeError::Stream {
                    record: 1,
                    offset: 16,
                    ..
                }
            ),
            "{err:?}"
        );

        let err = read(&[]).pop().unwrap().expect_err("empty");
        assert!(err.to_string().contains("holds no records"), "{err}");
    }

    #[test]
    fn a_fifo_that_never_appears_fails_after_the_wait() {
        let dir = tempfile::tempdir().expect("tempdir");
        let origin = StreamOrigin {
            channel: "validation".into(),
            epoch: 4,
            fifo: dir.path().join("validation_3"),
        };
        let started = Instant::now();
        let err = open_fifo(&origin, Duration::from_millis(150)).expect_err("no FIFO");
        assert!(started.elapsed() >= Duration::from_millis(150));
        assert!(started.elapsed() < Duration::from_secs(5));
        let err = err.to_string();
        assert!(
            err.contains("channel 'validation', epoch 4") && err.contains("did not appear") && err.contains(WAIT_ENV),
            "{err}"
        );
        // A regular file at the FIFO's path is read like the FIFO.
        std::fs::write(&origin.fifo, stream(&[b"i", b"a"])).expect("write");
        let examples: Vec<_> = read_examples(origin, attributes(), Duration::ZERO)
            .expect("opens")
            .collect();
        assert_eq!(examples.len(), 1);
    }

    #[test]
    fn each_reading_claims_the_next_fifo() {
        let ml = MlRoot::new("/ml");
        let channel = PipeChannel::new(&ml, "train", attributes(), DEFAULT_WAIT, 8);
        assert_eq!(channel.next_fifo(), PathBuf::from("/ml/input/data/train_0"));
        assert_eq!(channel.next_fifo(), PathBuf::from("/ml/input/data/train_1"));
        assert_eq!(fifo_name(&channel.next_fifo()), "train_2");
    }
}

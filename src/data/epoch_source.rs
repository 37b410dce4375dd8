//! Where one split (train or validation) gets its examples, epoch after epoch: File-mode pairs listed up front (by
//! stem or from a manifest) or a Pipe-mode channel streamed anew for every reading. The training loop asks for an
//! epoch's batches and does not care which.

use std::sync::Arc;

use super::dataset::SamplePair;
use super::label_map::LabelLut;
use super::loader::{Batch, BatchRecipe, LoadError, Loader, LoaderConfig};
use super::pipe::{read_examples, PipeChannel, StreamOrigin};
use super::stream_loader::StreamLoader;

/// The examples of one split, with the label map that applies to them.
#[derive(Debug, Clone)]
pub struct EpochSource {
    examples: Examples,
    lut: Arc<LabelLut>,
}

#[derive(Debug, Clone)]
enum Examples {
    /// Validated before training; read from disk each epoch.
    Files(Arc<[SamplePair]>),
    /// Streamed; every example is checked as it arrives, its labels against `num_classes`.
    Pipe {
        channel: Arc<PipeChannel>,
        num_classes: u32,
    },
}

impl EpochSource {
    pub fn files(pairs: Vec<SamplePair>, lut: LabelLut) -> Self {
        Self {
            examples: Examples::Files(pairs.into()),
            lut: Arc::new(lut),
        }
    }

    pub fn pipe(channel: PipeChannel, lut: LabelLut, num_classes: u32) -> Self {
        Self {
            examples: Examples::Pipe {
                channel: Arc::new(channel),
                num_classes,
            },
            lut: Arc::new(lut),
        }
    }

    /// The number of examples when known before reading (File mode).
    // Not a collection's length (a stream's is unknown), so no `is_empty` beside it.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> Option<usize> {
        match &self.examples {
            Examples::Files(pairs) => Some(pairs.len()),
            Examples::Pipe { .. } => None,
        }
    }

    /// Start producing the batches of `epoch` (0-based; seeds the order and the random transforms). A Pipe-mode
    /// split reads its next FIFO: the wait for it happens on the reader thread, a FIFO that never appears is the
    /// first batch's error.
    pub fn batches(&self, epoch: u64, cfg: LoaderConfig) -> Result<EpochBatches, LoadError> {
        match &self.examples {
            Examples::Files(pairs) => Ok(EpochBatches::Files(Loader::spawn(
                pairs.clone(),
                self.lut.clone(),
                cfg,
                epoch,
            )?)),
            Examples::Pipe { channel, num_classes } => {
                let origin = StreamOrigin {
                    channel: channel.channel.clone(),
                    epoch: epoch + 1,
                    fifo: channel.next_fifo(),
                };
                let (attributes, wait) = (channel.attributes.clone(), channel.wait);
                let open = move || -> Result<_, LoadError> {
                    let examples = read_examples(origin, attributes, wait)?;
                    Ok(examples.map(|example| example.map_err(LoadError::from)))
                };
                let recipe = BatchRecipe {
                    lut: self.lut.clone(),
                    cfg,
                    epoch,
                    num_classes: Some(*num_classes),
                };
                Ok(EpochBatches::Stream(StreamLoader::spawn(
                    open,
                    recipe,
                    channel.shuffle_buffer,
                )?))
            }
        }
    }
}

/// One epoch's batches, in order, from either kind of source.
pub enum EpochBatches {
    Files(Loader),
    Stream(StreamLoader),
}

impl Iterator for EpochBatches {
    type Item = Result<Batch, LoadError>;

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Self::Files(loader) => loader.next(),
            Self::Stream(loader) => loader.next(),
        }
    }
}

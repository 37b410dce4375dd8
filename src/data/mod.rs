//! Files on disk → (image, label) samples → batches.
//!
//! - [`dataset`]: list a channel pair (images + annotations), pair them by stem and validate them up front;
//! - [`image_io`]: decode JPEG/PNG images to RGB ([`jpeg_end`]: refuse a truncated JPEG);
//! - [`annotation`]: decode annotation PNGs to raw pixel values (palette indices, never colours);
//! - [`decode_error`]: the file and the problem, the error type of both decoders;
//! - [`label_map`]: the optional `label_map` channel (`scale` / `map`) turning raw values into labels;
//! - [`augment`]: GluonCV-style random scale / pad / crop / flip and normalisation;
//! - [`manifest`]: File-mode augmented manifests (JSON lines of image and annotation references);
//! - [`loader`]: background threads that decode and augment into a bounded queue of batches;
//! - [`recordio`]: RecordIO framing (Pipe mode, recordio-protobuf responses);
//! - [`pipe`]: Pipe-mode FIFOs, one per epoch, read as pairs of RecordIO records (image, annotation);
//! - [`shuffle_buffer`]: seeded shuffling of a stream in bounded memory;
//! - [`stream_loader`]: the loader's work for streams (a reader thread, decode workers, batches in order);
//! - [`epoch_source`]: one split's batches per epoch, from files or a Pipe-mode stream.

pub mod annotation;
pub mod augment;
pub mod dataset;
pub mod decode_error;
pub mod epoch_source;
pub mod image_io;
pub mod jpeg_end;
pub mod label_map;
pub mod loader;
pub mod manifest;
pub mod pipe;
pub mod recordio;
pub mod shuffle_buffer;
pub mod stream_loader;

/// Label value that marks pixels to ignore in the loss and metrics (object borders in VOC-style data, padding).
pub const IGNORE_LABEL: u8 = 255;

/// The normalisation statistics, shared with serving (see [`crate::normalize`]).
pub use crate::normalize::{IMAGENET_MEAN, IMAGENET_STD};

//! The error of decoding one input: which file it came from (when it came from one) and what was wrong with it.
//! The image and the annotation decoders share it, so naming the file is written once; each has its own enum of
//! what can be wrong ([`super::image_io::ImageErrorKind`], [`super::annotation::AnnotationErrorKind`]).

use std::fmt;
use std::path::{Path, PathBuf};

/// What a decoder's kind of error says about its input, for the start of the message.
pub trait DecodeErrorKind: std::error::Error + 'static {
    /// Put before the file name: "" for images (the path says enough), "annotation " for annotations.
    const PREFIX: &'static str;
}

/// `kind` went wrong decoding `file` (or in-memory bytes, when `file` is `None`). Displays as
/// `<prefix><file or "image data">: <kind>`.
#[derive(Debug)]
pub struct DecodeError<K> {
    pub file: Option<PathBuf>,
    pub kind: K,
}

impl<K> DecodeError<K> {
    /// Attach a file path to an error produced from in-memory bytes.
    pub fn with_file(mut self, path: &Path) -> Self {
        self.file = Some(path.to_path_buf());
        self
    }

    /// The file this error is about, when known.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }
}

impl<K> From<K> for DecodeError<K> {
    fn from(kind: K) -> Self {
        Self { file: None, kind }
    }
}

impl<K: DecodeErrorKind> fmt::Display for DecodeError<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.file {
            Some(path) => write!(f, "{}{}: {}", K::PREFIX, path.display(), self.kind),
            None => write!(f, "{}image data: {}", K::PREFIX, self.kind),
        }
    }
}

impl<K: DecodeErrorKind> std::error::Error for DecodeError<K> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.kind.source()
    }
}

//! Why [`generate`](super::generate) refused or failed: one error type whose messages name the option or the file.

use std::io;
use std::path::{Path, PathBuf};

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

pub(super) fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SynthError + 'a {
    move |source| SynthError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

//! Listing and pairing a File-mode channel pair (images + annotations), validated before training starts.

use std::path::PathBuf;

/// One training or validation example on disk: an image and the annotation with the same stem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SamplePair {
    /// The stem both files share (`2007_000032` for `2007_000032.jpg` + `2007_000032.png`).
    pub stem: String,
    pub image: PathBuf,
    pub annotation: PathBuf,
}

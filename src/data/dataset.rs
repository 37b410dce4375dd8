//! Listing and pairing a File-mode channel pair (images + annotations), validated before training starts.
//!
//! Every problem is reported, never skipped: a missing partner, a duplicate stem, an empty channel. Each kind of
//! problem names the first few files and how many there are in all, so a FailureReason stays short but useful.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// One training or validation example on disk: an image and the annotation with the same stem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SamplePair {
    /// The stem both files share (`2007_000032` for `2007_000032.jpg` + `2007_000032.png`); for files in
    /// sub-directories it includes the relative directory (`city/0001`).
    pub stem: String,
    pub image: PathBuf,
    pub annotation: PathBuf,
}

/// Image file extensions read from the image channels.
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png"];
/// Annotation file extensions read from the annotation channels.
pub const ANNOTATION_EXTENSIONS: &[&str] = &["png"];
/// How many offending files a message names before it says "and N more".
pub const NAMED_FILES: usize = 5;

/// Problems found while listing and pairing; every field is reported, not just the first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PairingReport {
    pub images_without_annotation: Vec<String>,
    pub annotations_without_image: Vec<String>,
    pub duplicate_stems: Vec<String>,
    /// Files with extensions that the channel does not read (logged, not fatal).
    pub ignored_files: Vec<String>,
}

/// The listing and pairing of one split failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PairingError {
    #[error("cannot read channel '{channel}' at {path}: {reason}")]
    Unreadable {
        channel: String,
        path: PathBuf,
        reason: String,
    },
    #[error(
        "channel '{channel}' has no {kind} files ({extensions}) in {path}; put the {kind}s there or fix the \
         channel's S3 prefix"
    )]
    Empty {
        channel: String,
        kind: &'static str,
        extensions: String,
        path: PathBuf,
    },
    #[error("{0}")]
    Mismatched(String),
}

/// A short, bounded list: "a.jpg, b.jpg, c.jpg (and 12 more)".
pub fn name_some(names: &[String]) -> String {
    let mut text = names.iter().take(NAMED_FILES).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > NAMED_FILES {
        let _ = write!(text, " (and {} more)", names.len() - NAMED_FILES);
    }
    text
}

/// List `images_dir` and `annotations_dir` (recursively), pair files by stem and report every problem.
pub fn pair_channel(
    images_channel: &str,
    images_dir: &Path,
    annotations_channel: &str,
    annotations_dir: &Path,
) -> Result<(Vec<SamplePair>, PairingReport), PairingError> {
    let mut report = PairingReport::default();
    let images = list_by_stem(images_channel, images_dir, IMAGE_EXTENSIONS, &mut report)?;
    let annotations = list_by_stem(annotations_channel, annotations_dir, ANNOTATION_EXTENSIONS, &mut report)?;
    if images.is_empty() {
        return Err(empty(images_channel, "image", IMAGE_EXTENSIONS, images_dir));
    }
    if annotations.is_empty() {
        return Err(empty(
            annotations_channel,
            "annotation",
            ANNOTATION_EXTENSIONS,
            annotations_dir,
        ));
    }

    let mut pairs = Vec::with_capacity(images.len());
    for (stem, image) in &images {
        match annotations.get(stem) {
            Some(annotation) => pairs.push(SamplePair {
                stem: stem.clone(),
                image: image.clone(),
                annotation: annotation.clone(),
            }),
            None => report.images_without_annotation.push(relative_name(images_dir, image)),
        }
    }
    for (stem, annotation) in &annotations {
        if !images.contains_key(stem) {
            report
                .annotations_without_image
                .push(relative_name(annotations_dir, annotation));
        }
    }

    let mut problems = Vec::new();
    if !report.duplicate_stems.is_empty() {
        problems.push(format!(
            "{} files share a stem with another file in the same channel, so their pair is ambiguous: {}; rename \
             or remove one of each",
            report.duplicate_stems.len(),
            name_some(&report.duplicate_stems)
        ));
    }
    if !report.images_without_annotation.is_empty() {
        problems.push(format!(
            "{} of {} images in channel '{images_channel}' have no annotation with the same stem in channel \
             '{annotations_channel}': {}; add <stem>.png annotations or remove those images",
            report.images_without_annotation.len(),
            images.len(),
            name_some(&report.images_without_annotation)
        ));
    }
    if !report.annotations_without_image.is_empty() {
        problems.push(format!(
            "{} of {} annotations in channel '{annotations_channel}' have no image with the same stem in channel \
             '{images_channel}': {}; add the images or remove those annotations",
            report.annotations_without_image.len(),
            annotations.len(),
            name_some(&report.annotations_without_image)
        ));
    }
    if !problems.is_empty() {
        return Err(PairingError::Mismatched(problems.join("; ")));
    }
    Ok((pairs, report))
}

fn empty(channel: &str, kind: &'static str, extensions: &[&str], path: &Path) -> PairingError {
    PairingError::Empty {
        channel: channel.to_string(),
        kind,
        extensions: extensions
            .iter()
            .map(|e| format!(".{e}"))
            .collect::<Vec<_>>()
            .join(", "),
        path: path.to_path_buf(),
    }
}

/// Files under `dir` with one of `extensions`, keyed by their path relative to `dir` without the extension.
/// Hidden files (`.DS_Store`, `._x.jpg` from macOS archives) are skipped; other extensions are reported.
fn list_by_stem(
    channel: &str,
    dir: &Path,
    extensions: &[&str],
    report: &mut PairingReport,
) -> Result<BTreeMap<String, PathBuf>, PairingError> {
    let unreadable = |path: &Path, e: std::io::Error| PairingError::Unreadable {
        channel: channel.to_string(),
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let mut by_stem = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        let entries = std::fs::read_dir(&current).map_err(|e| unreadable(&current, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| unreadable(&current, e))?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            // Follow symlinks: SageMaker local mode and users often link data in.
            let metadata = std::fs::metadata(&path).map_err(|e| unreadable(&path, e))?;
            if metadata.is_dir() {
                pending.push(path);
                continue;
            }
            let extension = path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase());
            if !extension.is_some_and(|e| extensions.contains(&e.as_str())) {
                report.ignored_files.push(relative_name(dir, &path));
                continue;
            }
            let stem = relative_name(dir, &path.with_extension(""));
            if let Some(previous) = by_stem.insert(stem, path.clone()) {
                report.duplicate_stems.push(relative_name(dir, &previous));
                report.duplicate_stems.push(relative_name(dir, &path));
            }
        }
    }
    Ok(by_stem)
}

/// `dir/a/b.jpg` → `a/b.jpg`, with `/` separators on every platform.
fn relative_name(dir: &Path, path: &Path) -> String {
    let relative = path.strip_prefix(dir).unwrap_or(path);
    relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(dir: &Path, names: &[&str]) {
        for name in names {
            let path = dir.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, b"x").unwrap();
        }
    }

    fn setup(images: &[&str], annotations: &[&str]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("train")).unwrap();
        std::fs::create_dir_all(root.path().join("train_annotation")).unwrap();
        touch(&root.path().join("train"), images);
        touch(&root.path().join("train_annotation"), annotations);
        root
    }

    fn pair(root: &Path) -> Result<(Vec<SamplePair>, PairingReport), PairingError> {
        pair_channel(
            "train",
            &root.join("train"),
            "train_annotation",
            &root.join("train_annotation"),
        )
    }

    #[test]
    fn pairs_by_stem_across_extensions_and_subdirectories() {
        let root = setup(
            &["a.jpg", "b.JPEG", "c.png", "sub/d.jpg", ".DS_Store", "notes.txt"],
            &["a.png", "b.png", "c.png", "sub/d.png"],
        );
        let (pairs, report) = pair(root.path()).unwrap();
        let stems: Vec<&str> = pairs.iter().map(|p| p.stem.as_str()).collect();
        assert_eq!(stems, ["a", "b", "c", "sub/d"]);
        assert_eq!(pairs[1].image, root.path().join("train/b.JPEG"));
        assert_eq!(pairs[3].annotation, root.path().join("train_annotation/sub/d.png"));
        assert_eq!(report.ignored_files, ["notes.txt"]);
    }

    #[test]
    fn missing_partners_are_named_with_a_count() {
        let images: Vec<String> = (0..8).map(|i| format!("img{i}.jpg")).collect();
        let image_refs: Vec<&str> = images.iter().map(String::as_str).collect();
        let root = setup(&image_refs, &["img0.png", "orphan.png"]);
        let err = pair(root.path()).unwrap_err().to_string();
        assert!(
            err.contains("7 of 8 images in channel 'train' have no annotation"),
            "{err}"
        );
        assert!(
            err.contains("img1.jpg, img2.jpg, img3.jpg, img4.jpg, img5.jpg (and 2 more)"),
            "{err}"
        );
        assert!(
            err.contains("1 of 2 annotations in channel 'train_annotation' have no image"),
            "{err}"
        );
        assert!(err.contains("orphan.png"), "{err}");
    }

    #[test]
    fn duplicate_stems_are_ambiguous() {
        let root = setup(&["a.jpg", "a.png"], &["a.png"]);
        let err = pair(root.path()).unwrap_err().to_string();
        assert!(
            err.contains("share a stem") && err.contains("a.jpg") && err.contains("a.png"),
            "{err}"
        );
    }

    #[test]
    fn empty_and_missing_channels_are_errors() {
        let root = setup(&["readme.txt"], &["a.png"]);
        let err = pair(root.path()).unwrap_err().to_string();
        assert!(
            err.contains("channel 'train' has no image files (.jpg, .jpeg, .png)"),
            "{err}"
        );
        let root = setup(&["a.jpg"], &[]);
        let err = pair(root.path()).unwrap_err().to_string();
        assert!(
            err.contains("channel 'train_annotation' has no annotation files (.png)"),
            "{err}"
        );
        let err = pair_channel("train", Path::new("/nonexistent/x"), "a", Path::new("/nonexistent/y"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot read channel 'train' at /nonexistent/x"), "{err}");
    }
}

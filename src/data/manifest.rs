//! File-mode augmented manifests: a channel holding one `*.manifest` file (JSON lines) lists its examples instead of
//! pairing image and annotation channels by stem.
//!
//! Each line is one example: `source-ref` (the image) plus exactly one other `*-ref` attribute (the annotation),
//! or the two attributes named by the channel's `AttributeNames`; other attributes (`*-metadata`) are ignored.
//! References are paths relative to the channel directory, absolute paths, `file://` URIs (resolved the same way) or
//! `s3://` URIs, which a [`RemoteRefs`] stages to a local file. Every bad line is reported with the manifest's path and
//! its line number.

use std::path::{Path, PathBuf};

use super::dataset::{name_some, SamplePair};

/// The attribute that names the image in SageMaker Ground Truth manifests.
pub const SOURCE_REF: &str = "source-ref";
/// The file extension of an augmented manifest.
pub const MANIFEST_EXTENSION: &str = "manifest";

/// Turns a remote reference (`s3://bucket/key`) into a local file holding the object.
pub trait RemoteRefs: Sync {
    fn stage(&self, uri: &str) -> anyhow::Result<PathBuf>;
}

/// For builds and jobs without S3 access: every `s3://` reference is an error that says so.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoRemoteRefs;

impl RemoteRefs for NoRemoteRefs {
    fn stage(&self, uri: &str) -> anyhow::Result<PathBuf> {
        anyhow::bail!(
            "{uri}: s3:// refs need the S3 support, which is not available to this job; copy the objects into the \
             channel and refer to them by relative paths"
        )
    }
}

/// Why a channel's manifest could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read channel '{channel}' at {}: {reason}", path.display())]
    Unreadable {
        channel: String,
        path: PathBuf,
        reason: String,
    },
    #[error(
        "channel '{channel}' holds {} manifest files ({}); a File-mode channel holds one augmented manifest or \
         image files, so remove the others",
        files.len(),
        name_some(files)
    )]
    Several { channel: String, files: Vec<String> },
    #[error("manifest {} lists no examples; add JSON lines with {SOURCE_REF} and an annotation reference", path.display())]
    Empty { path: PathBuf },
    #[error("manifest {} has {} bad lines: {}", path.display(), problems.len(), name_some(problems))]
    BadLines { path: PathBuf, problems: Vec<String> },
}

/// The one `*.manifest` file at the top of `dir`, if any.
pub fn find_manifest(channel: &str, dir: &Path) -> Result<Option<PathBuf>, ManifestError> {
    let unreadable = |e: std::io::Error| ManifestError::Unreadable {
        channel: channel.to_string(),
        path: dir.to_path_buf(),
        reason: e.to_string(),
    };
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(unreadable)? {
        let path = entry.map_err(unreadable)?.path();
        let is_manifest = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case(MANIFEST_EXTENSION));
        let hidden = path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if is_manifest && !hidden && path.is_file() {
            found.push(path);
        }
    }
    found.sort();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err(ManifestError::Several {
            channel: channel.to_string(),
            files: found
                .iter()
                .map(|p| p.file_name().unwrap_or_default().to_string_lossy().into_owned())
                .collect(),
        }),
    }
}

/// Read `path` (a manifest in `channel_dir`) into image/annotation pairs. `attributes` are the channel's
/// AttributeNames (image, annotation) when it has them.
pub fn read_manifest(
    path: &Path,
    channel_dir: &Path,
    attributes: Option<&[String; 2]>,
    remote: &dyn RemoteRefs,
) -> Result<Vec<SamplePair>, ManifestError> {
    let text = std::fs::read_to_string(path).map_err(|e| ManifestError::Unreadable {
        channel: channel_dir
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned(),
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut pairs = Vec::new();
    let mut problems = Vec::new();
    for (number, line) in text.lines().enumerate().map(|(i, l)| (i + 1, l.trim())) {
        if line.is_empty() {
            continue;
        }
        let pair = references(line, attributes).and_then(|[(image_attr, image), (annotation_attr, annotation)]| {
            Ok(SamplePair {
                stem: stem_of(&image),
                image: resolve(&image_attr, &image, channel_dir, remote)?,
                annotation: resolve(&annotation_attr, &annotation, channel_dir, remote)?,
            })
        });
        match pair {
            Ok(pair) => pairs.push(pair),
            Err(problem) => problems.push(format!("line {number}: {problem}")),
        }
    }
    if !problems.is_empty() {
        return Err(ManifestError::BadLines {
            path: path.to_path_buf(),
            problems,
        });
    }
    if pairs.is_empty() {
        return Err(ManifestError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(pairs)
}

/// The (attribute, reference) of the image and of the annotation on one line.
fn references(line: &str, attributes: Option<&[String; 2]>) -> Result<[(String, String); 2], String> {
    let value: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("not JSON ({e})"))?;
    let object = value.as_object().ok_or("not a JSON object")?;
    let string = |name: &str| -> Result<(String, String), String> {
        match object.get(name) {
            Some(serde_json::Value::String(reference)) => Ok((name.to_string(), reference.clone())),
            Some(other) => Err(format!("'{name}' is {other}, not a string reference")),
            None => Err(format!("no '{name}' attribute")),
        }
    };
    if let Some([image, annotation]) = attributes {
        return Ok([string(image)?, string(annotation)?]);
    }
    let image = string(SOURCE_REF)?;
    let candidates: Vec<&String> = object
        .keys()
        .filter(|k| k.ends_with("-ref") && k.as_str() != SOURCE_REF)
        .collect();
    match candidates[..] {
        [annotation] => Ok([image, string(annotation)?]),
        [] => Err(format!(
            "no annotation reference: add one '<name>-ref' attribute besides '{SOURCE_REF}'"
        )),
        _ => Err(format!(
            "{} candidate annotation references ({}); keep one, or name the image's and the annotation's \
             attributes in the channel's AttributeNames",
            candidates.len(),
            candidates
                .iter()
                .map(|c| format!("'{c}'"))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// A local file for `reference`: relative paths and `file://` URIs against the channel directory, absolute paths as
/// they are, `s3://` URIs through `remote`.
fn resolve(attribute: &str, reference: &str, channel_dir: &Path, remote: &dyn RemoteRefs) -> Result<PathBuf, String> {
    let path = if reference.starts_with("s3://") {
        remote.stage(reference).map_err(|e| format!("{attribute}: {e:#}"))?
    } else {
        let local = reference.strip_prefix("file://").unwrap_or(reference);
        if local.contains("://") {
            return Err(format!(
                "{attribute} '{reference}' is neither a path, a file:// URI nor an s3:// URI"
            ));
        }
        channel_dir.join(local) // an absolute `local` replaces the directory
    };
    if !path.is_file() {
        return Err(format!("{attribute} '{reference}': {} does not exist", path.display()));
    }
    Ok(path)
}

/// `s3://b/dir/img_01.jpg` → `img_01`.
fn stem_of(reference: &str) -> String {
    let name = reference.rsplit('/').next().unwrap_or(reference);
    name.rsplit_once('.').map_or(name, |(stem, _)| stem).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channel() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        for name in ["img/a.jpg", "ann/a.png", "img/b.jpg", "ann/b.png"] {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, b"x").unwrap();
        }
        dir
    }

    fn read(dir: &Path, lines: &str, attributes: Option<&[String; 2]>) -> Result<Vec<SamplePair>, ManifestError> {
        let path = dir.join("train.manifest");
        std::fs::write(&path, lines).unwrap();
        read_manifest(&path, dir, attributes, &NoRemoteRefs)
    }

    #[test]
    fn relative_absolute_and_file_uri_references_resolve_against_the_channel() {
        let dir = channel();
        let absolute = dir.path().join("ann/b.png");
        let lines = format!(
            "{{\"source-ref\": \"img/a.jpg\", \"city-streets-ref\": \"file://ann/a.png\", \"city-streets-metadata\": {{\"x\": 1}}}}\n\
             \n\
             {{\"source-ref\": \"file://{}\", \"city-streets-ref\": \"{}\"}}\n",
            dir.path().join("img/b.jpg").display(),
            absolute.display()
        );
        let pairs = read(dir.path(), &lines, None).expect("valid manifest");
        assert_eq!(pairs.len(), 2);
        assert_eq!(pairs[0].image, dir.path().join("img/a.jpg"));
        assert_eq!(pairs[0].annotation, dir.path().join("ann/a.png"));
        assert_eq!((pairs[1].stem.as_str(), &pairs[1].annotation), ("b", &absolute));

        let attributes = ["picture".to_string(), "mask".to_string()];
        let pairs = read(
            dir.path(),
            r#"{"picture": "img/a.jpg", "mask": "ann/a.png", "other-ref": "x"}"#,
            Some(&attributes),
        )
        .expect("AttributeNames choose the attributes");
        assert_eq!(pairs[0].annotation, dir.path().join("ann/a.png"));
    }

    #[test]
    fn every_bad_line_is_named_with_the_manifest_and_its_number() {
        let dir = channel();
        let lines = [
            r#"{"source-ref": "img/a.jpg", "x-ref": "ann/a.png"}"#,
            "not json",
            r#"["source-ref"]"#,
            r#"{"x-ref": "ann/a.png"}"#,
            r#"{"source-ref": "img/a.jpg", "x-ref": "ann/a.png", "y-ref": "ann/b.png"}"#,
            r#"{"source-ref": "img/missing.jpg", "x-ref": "ann/a.png"}"#,
            r#"{"source-ref": "img/a.jpg"}"#,
            r#"{"source-ref": 5, "x-ref": "ann/a.png"}"#,
            r#"{"source-ref": "s3://bucket/a.jpg", "x-ref": "ann/a.png"}"#,
            r#"{"source-ref": "http://host/a.jpg", "x-ref": "ann/a.png"}"#,
        ]
        .join("\n");
        let err = read(dir.path(), &lines, None).expect_err("bad lines");
        let ManifestError::BadLines { path, problems } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(path, &dir.path().join("train.manifest"));
        let expected = [
            "line 2: not JSON",
            "line 3: not a JSON object",
            "line 4: no 'source-ref' attribute",
            "line 5: 2 candidate annotation references ('x-ref', 'y-ref')",
            "line 6: source-ref 'img/missing.jpg'",
            "line 7: no annotation reference",
            "line 8: 'source-ref' is 5, not a string",
            "line 9: source-ref: s3://bucket/a.jpg: s3:// refs need the S3 support",
            "line 10: source-ref 'http://host/a.jpg' is neither",
        ];
        assert_eq!(problems.len(), expected.len(), "{problems:?}");
        for (problem, want) in problems.iter().zip(expected) {
            assert!(problem.starts_with(want), "{problem} should start with {want}");
        }
        assert!(
            problems[4].contains("img/missing.jpg does not exist"),
            "{}",
            problems[4]
        );
        let message = err.to_string();
        assert!(
            message.contains("train.manifest has 9 bad lines: line 2") && message.contains("(and 4 more)"),
            "{message}"
        );

        assert!(matches!(
            read(dir.path(), "\n\n", None),
            Err(ManifestError::Empty { .. })
        ));
    }

    #[test]
    fn a_channel_has_at_most_one_manifest() {
        let dir = channel();
        assert_eq!(find_manifest("train", dir.path()).unwrap(), None);
        std::fs::write(dir.path().join("train.manifest"), "").unwrap();
        std::fs::write(dir.path().join(".hidden.manifest"), "").unwrap();
        assert_eq!(
            find_manifest("train", dir.path()).unwrap(),
            Some(dir.path().join("train.manifest"))
        );
        std::fs::write(dir.path().join("more.MANIFEST"), "").unwrap();
        let err = find_manifest("train", dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("channel 'train' holds 2 manifest files (more.MANIFEST, train.manifest)"),
            "{err}"
        );
    }
}

//! Finding and unpacking a trained model: the one place that knows a model may arrive as `model.tar.gz` (what
//! SageMaker packs `/opt/ml/model` into) or as the artifact's files themselves ([`super::artifact`]).
//!
//! SageMaker hosting extracts `model.tar.gz` into `/opt/ml/model` itself; local runs, `docker run ... serve` with a
//! mounted training output and the `model` channel of incremental training may hand over the tarball as is.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::artifact::{META_FILE, WEIGHTS_FILE};

/// The tarball a training job's `model/` directory becomes.
pub const MODEL_TARBALL: &str = "model.tar.gz";

/// For serving and `predict`: the directory to load the artifact from. That is `dir` itself, after extracting
/// `dir/model.tar.gz` into it when present; if `dir` is read-only the tarball goes to a fresh temporary directory
/// instead, which is returned.
pub fn unpack_in_place(dir: &Path) -> Result<PathBuf> {
    anyhow::ensure!(
        dir.is_dir(),
        "the model directory {} does not exist; put the trained artifact (or its model.tar.gz) there",
        dir.display()
    );
    let tarball = dir.join(MODEL_TARBALL);
    if !tarball.is_file() {
        return Ok(dir.to_path_buf());
    }
    match extract(&tarball, dir) {
        Ok(()) => {
            tracing::info!(tarball = %tarball.display(), "extracted the model tarball");
            Ok(dir.to_path_buf())
        }
        Err(error) => {
            let fallback = std::env::temp_dir().join(format!("semseg-model-{}", std::process::id()));
            tracing::warn!(
                "cannot extract {} into {} ({error:#}); extracting into {} instead",
                tarball.display(),
                dir.display(),
                fallback.display()
            );
            std::fs::create_dir_all(&fallback).with_context(|| format!("cannot create {}", fallback.display()))?;
            extract(&tarball, &fallback)?;
            Ok(fallback)
        }
    }
}

/// For incremental training: the directory holding the artifact in `channel_dir`, which is the channel itself when it
/// holds the artifact's files, or `scratch` (emptied first) after extracting the channel's `model.tar.gz`. The
/// channel is left untouched (it may be read-only).
pub fn unpack_to_scratch(channel_dir: &Path, scratch: &Path) -> Result<PathBuf> {
    if channel_dir.join(META_FILE).is_file() && channel_dir.join(WEIGHTS_FILE).is_file() {
        return Ok(channel_dir.to_path_buf());
    }
    let tarball = channel_dir.join(MODEL_TARBALL);
    if !tarball.is_file() {
        bail!(
            "the model channel {} holds neither {MODEL_TARBALL} nor {META_FILE} + {WEIGHTS_FILE}; point it at the \
             {MODEL_TARBALL} of an earlier semseg training job",
            channel_dir.display()
        );
    }
    if scratch.exists() {
        std::fs::remove_dir_all(scratch).with_context(|| format!("cannot clear {}", scratch.display()))?;
    }
    std::fs::create_dir_all(scratch).with_context(|| format!("cannot create {}", scratch.display()))?;
    extract(&tarball, scratch)?;
    Ok(scratch.to_path_buf())
}

/// Extract a gzip-compressed tar into `into`; entries escaping `into` (absolute paths, `..`) are refused by `tar`.
fn extract(tarball: &Path, into: &Path) -> Result<()> {
    let file = File::open(tarball).with_context(|| format!("cannot open {}", tarball.display()))?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    archive.set_overwrite(true);
    archive.set_preserve_permissions(false);
    archive
        .unpack(into)
        .with_context(|| format!("cannot extract {} (is it a gzip-compressed tar?)", tarball.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_tarball(path: &Path, files: &[(&str, &[u8])]) -> Result<()> {
        let file = File::create(path)?;
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(file, flate2::Compression::fast()));
        for (name, data) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder.append_data(&mut header, name, *data)?;
        }
        builder.into_inner()?.finish()?;
        Ok(())
    }

    #[test]
    fn extracts_a_tarball_in_place() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let data = br#"{"num_classes": 3}"#;
        write_tarball(&dir.path().join(MODEL_TARBALL), &[("model.json", data)])?;
        let ready = unpack_in_place(dir.path())?;
        assert_eq!(ready, dir.path());
        assert_eq!(std::fs::read(dir.path().join("model.json"))?, data);
        Ok(())
    }

    #[test]
    fn a_plain_directory_is_used_as_is_and_a_missing_one_is_an_error() -> Result<()> {
        let dir = tempfile::tempdir()?;
        assert_eq!(unpack_in_place(dir.path())?, dir.path());
        let missing = dir.path().join("nope");
        let err = unpack_in_place(&missing)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("does not exist"), "{err}");
        let bad = dir.path().join(MODEL_TARBALL);
        std::fs::write(&bad, b"not a tarball")?;
        assert!(unpack_in_place(dir.path()).is_err());
        Ok(())
    }

    #[test]
    fn a_channel_tarball_goes_to_a_fresh_scratch_directory() -> Result<()> {
        let channel = tempfile::tempdir()?;
        let scratch = tempfile::tempdir()?;
        std::fs::write(scratch.path().join("stale"), b"from an earlier run")?;
        write_tarball(
            &channel.path().join(MODEL_TARBALL),
            &[(META_FILE, b"{}"), (WEIGHTS_FILE, b"w")],
        )?;
        assert_eq!(unpack_to_scratch(channel.path(), scratch.path())?, scratch.path());
        assert!(scratch.path().join(WEIGHTS_FILE).is_file());
        assert!(!scratch.path().join("stale").exists());
        assert!(
            !channel.path().join(META_FILE).exists(),
            "the channel is not written to"
        );

        // Files already extracted in the channel are used where they are.
        let extracted = tempfile::tempdir()?;
        std::fs::write(extracted.path().join(META_FILE), b"{}")?;
        std::fs::write(extracted.path().join(WEIGHTS_FILE), b"w")?;
        assert_eq!(unpack_to_scratch(extracted.path(), scratch.path())?, extracted.path());

        let empty = tempfile::tempdir()?;
        let err = unpack_to_scratch(empty.path(), scratch.path())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("holds neither model.tar.gz"), "{err}");
        Ok(())
    }
}

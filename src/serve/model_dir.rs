//! Getting the model directory ready to load. SageMaker hosting extracts `model.tar.gz` into `/opt/ml/model` itself;
//! local runs (and `docker run ... serve` with a mounted training output) may hand over the tarball as is, so a
//! `model.tar.gz` found there is extracted first.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// The tarball training output becomes.
pub const MODEL_TARBALL: &str = "model.tar.gz";

/// Returns the directory to load the artifact from: `dir` itself, after extracting `dir/model.tar.gz` into it when
/// present. If `dir` is read-only the tarball goes to a fresh temporary directory instead, which is returned.
pub fn prepare(dir: &Path) -> anyhow::Result<PathBuf> {
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

/// Extract a gzip-compressed tar into `into`; entries escaping `into` (absolute paths, `..`) are refused by `tar`.
fn extract(tarball: &Path, into: &Path) -> anyhow::Result<()> {
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

    #[test]
    fn extracts_a_tarball_in_place() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let file = File::create(dir.path().join(MODEL_TARBALL))?;
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(file, flate2::Compression::fast()));
        let data = br#"{"num_classes": 3}"#;
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, "model.json", &data[..])?;
        builder.into_inner()?.finish()?;
        let ready = prepare(dir.path())?;
        assert_eq!(ready, dir.path());
        assert_eq!(std::fs::read(dir.path().join("model.json"))?, data);
        Ok(())
    }

    #[test]
    fn a_plain_directory_is_used_as_is_and_a_missing_one_is_an_error() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        assert_eq!(prepare(dir.path())?, dir.path());
        let missing = dir.path().join("nope");
        let err = prepare(&missing).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("does not exist"), "{err}");
        let bad = dir.path().join(MODEL_TARBALL);
        std::fs::write(&bad, b"not a tarball")?;
        assert!(prepare(dir.path()).is_err());
        Ok(())
    }
}

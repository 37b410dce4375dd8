//! The job's results as SageMaker ships them: `model.tar.gz` (the model directory, files at the archive root) and
//! `output.tar.gz` (`output/data` plus the failure file, if any), uploaded under the `--output` prefix.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::ops;
use super::{S3Store, S3Uri, StorageError};
use crate::sagemaker::MlRoot;

pub const MODEL_ARCHIVE: &str = "model.tar.gz";
pub const OUTPUT_ARCHIVE: &str = "output.tar.gz";

/// Pack and upload the job's artifacts under `destination`; returns the objects written. The model archive is
/// skipped when the model directory is empty (a job that failed before its first save); the output archive is
/// always written, so a failed job's reason reaches S3.
pub fn upload_job_artifacts(store: &S3Store, ml: &MlRoot, destination: &S3Uri) -> Result<Vec<S3Uri>, StorageError> {
    let staging = ml.root().join("tmp/s3-artifacts");
    std::fs::create_dir_all(&staging).map_err(|e| StorageError::io("cannot create", &staging, e))?;
    let mut uploaded = Vec::new();

    let model_files = files_under(&ml.model_dir())?;
    if model_files.is_empty() {
        tracing::warn!("{} is empty: no {MODEL_ARCHIVE} to upload", ml.model_dir().display());
    } else {
        uploaded.push(pack_and_upload(
            store,
            &staging,
            MODEL_ARCHIVE,
            &model_files,
            destination,
        )?);
    }

    let mut output_entries = files_under(&ml.output_data_dir())?;
    if ml.failure_file().is_file() {
        output_entries.push((ml.failure_file(), "failure".to_string()));
    }
    uploaded.push(pack_and_upload(
        store,
        &staging,
        OUTPUT_ARCHIVE,
        &output_entries,
        destination,
    )?);
    let _ = std::fs::remove_dir_all(&staging);
    Ok(uploaded)
}

fn pack_and_upload(
    store: &S3Store,
    staging: &Path,
    archive: &str,
    entries: &[(PathBuf, String)],
    destination: &S3Uri,
) -> Result<S3Uri, StorageError> {
    let local = staging.join(archive);
    pack(entries, &local)?;
    let remote = destination.join(archive);
    let options = store.options();
    let size = store.block_on(super::sync::with_retries(options.attempts, &remote.to_string(), || {
        ops::upload(
            store.client(),
            &local,
            &remote,
            store.endpoint(),
            options.part_size,
            options.concurrency,
        )
    }))?;
    tracing::info!(files = entries.len(), bytes = size, "uploaded {remote}");
    Ok(remote)
}

/// Write a gzip-compressed tar of `entries` (local path, name in the archive) to `archive`.
pub fn pack(entries: &[(PathBuf, String)], archive: &Path) -> Result<(), StorageError> {
    let file = File::create(archive).map_err(|e| StorageError::io("cannot create", archive, e))?;
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(file, flate2::Compression::fast()));
    for (path, name) in entries {
        builder
            .append_path_with_name(path, name)
            .map_err(|e| StorageError::io("cannot add to the archive", path, e))?;
    }
    builder
        .into_inner()
        .and_then(|gz| gz.finish())
        .map_err(|e| StorageError::io("cannot write", archive, e))?;
    Ok(())
}

/// Every regular file below `dir` as (path, `/`-separated name relative to `dir`), sorted; none when `dir` is missing.
pub fn files_under(dir: &Path) -> Result<Vec<(PathBuf, String)>, StorageError> {
    let mut found = Vec::new();
    if dir.is_dir() {
        walk(dir, "", &mut found)?;
    }
    found.sort_by(|a, b| a.1.cmp(&b.1));
    Ok(found)
}

fn walk(dir: &Path, prefix: &str, found: &mut Vec<(PathBuf, String)>) -> Result<(), StorageError> {
    let entries = std::fs::read_dir(dir).map_err(|e| StorageError::io("cannot list", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| StorageError::io("cannot list", dir, e))?;
        let path = entry.path();
        let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
        let kind = entry
            .file_type()
            .map_err(|e| StorageError::io("cannot stat", &path, e))?;
        if kind.is_dir() {
            walk(&path, &format!("{name}/"), found)?;
        } else if kind.is_file() {
            found.push((path, name));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archives_hold_the_files_at_their_root() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        std::fs::create_dir_all(model.join("sub")).unwrap();
        std::fs::write(model.join("model.json"), b"{}").unwrap();
        std::fs::write(model.join("sub/extra.txt"), b"x").unwrap();
        let entries = files_under(&model).unwrap();
        let names: Vec<_> = entries.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(names, ["model.json", "sub/extra.txt"]);

        let archive = dir.path().join("model.tar.gz");
        pack(&entries, &archive).unwrap();
        let mut unpacked = tar::Archive::new(flate2::read::GzDecoder::new(File::open(&archive).unwrap()));
        let mut listed: Vec<String> = unpacked
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        listed.sort();
        assert_eq!(listed, ["model.json", "sub/extra.txt"]);
        assert!(files_under(&dir.path().join("missing")).unwrap().is_empty());
    }
}

//! `semseg serve --model s3://...` and `semseg predict --model s3://...`: the model fetched into a local directory
//! first, then loaded the usual way (a `model.tar.gz` there is extracted by [`crate::serve::model_dir::prepare`]).

use std::path::{Path, PathBuf};

use super::sync::download_prefix;
use super::{ops, S3Store, S3Uri, StorageError};
use crate::model::package::MODEL_TARBALL;

/// Fetch the model at `uri` into `into` and return the directory to load. `uri` is either an object (a
/// `model.tar.gz`, as training uploads it, under any name) or a prefix holding the artifact's files.
pub fn fetch_model(store: &S3Store, uri: &S3Uri, into: &Path) -> Result<PathBuf, StorageError> {
    std::fs::create_dir_all(into).map_err(|e| StorageError::io("cannot create", into, e))?;
    let record = record_path(into);
    if uri.file_name().is_none() {
        download_prefix(store, uri, into, &record)?;
        return Ok(into.to_path_buf());
    }
    // Whatever the object is called, the loader looks for model.tar.gz.
    let local = into.join(MODEL_TARBALL);
    match store.block_on(ops::download(store.client(), uri, &local, store.endpoint())) {
        Ok(info) => {
            tracing::info!(bytes = info.size, "fetched the model {uri} into {}", into.display());
            Ok(into.to_path_buf())
        }
        // `s3://b/run` may name a prefix without its trailing slash.
        Err(StorageError::NoSuchKey { .. }) if !uri.key.ends_with(".tar.gz") => {
            match download_prefix(store, uri, into, &record) {
                Ok(_) => Ok(into.to_path_buf()),
                Err(StorageError::EmptyPrefix { .. }) => Err(StorageError::NoSuchKey {
                    bucket: uri.bucket.clone(),
                    key: uri.key.clone(),
                    action: "fetching the model",
                }),
                Err(other) => Err(other),
            }
        }
        Err(error) => Err(error),
    }
}

/// A model fetched into a directory of its own under the system's temporary directory, removed when dropped.
pub struct FetchedModel {
    dir: PathBuf,
}

impl FetchedModel {
    /// Fetch `uri` (see [`fetch_model`]) into a fresh temporary directory.
    pub fn fetch(store: &S3Store, uri: &S3Uri) -> Result<Self, StorageError> {
        let dir = std::env::temp_dir().join(format!("semseg-s3-model-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let fetched = Self { dir };
        fetch_model(store, uri, &fetched.dir)?;
        Ok(fetched)
    }

    /// The directory to load the model from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for FetchedModel {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(record_path(&self.dir));
    }
}

/// The staging record of a model fetched as a prefix, beside (not inside) the model directory.
fn record_path(dir: &Path) -> PathBuf {
    let name = dir.file_name().map_or_else(|| "model".into(), |n| n.to_string_lossy());
    dir.with_file_name(format!("{name}.s3-record.json"))
}

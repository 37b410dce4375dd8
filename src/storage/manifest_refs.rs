//! `s3://` references in File-mode augmented manifests (`source-ref: s3://bucket/images/0001.jpg`): each object is
//! downloaded once into `<ml-root>/input/s3-refs/<bucket>/<key>` and the manifest entry then reads that local file,
//! so every File-mode check applies to it as to any other. An object already there (a rerun, or an entry named by
//! two lines) is not fetched again. The S3 client is built on the first `s3://` reference only, so a job whose
//! manifests are local never needs credentials.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::Context;

use super::{S3Store, S3Uri, StorageError, TransferOptions};
use crate::data::manifest::RemoteRefs;
use crate::sagemaker::MlRoot;

/// Stages manifest references from S3 under one directory.
pub struct S3ManifestRefs {
    dir: PathBuf,
    store: OnceLock<S3Store>,
}

impl S3ManifestRefs {
    /// References staged under `<ml-root>/input/s3-refs`.
    pub fn for_job(ml: &MlRoot) -> Self {
        Self::new(ml.root().join("input/s3-refs"))
    }

    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            store: OnceLock::new(),
        }
    }

    fn store(&self) -> Result<&S3Store, StorageError> {
        if let Some(store) = self.store.get() {
            return Ok(store);
        }
        let store = S3Store::from_env(TransferOptions::default())?;
        Ok(self.store.get_or_init(|| store))
    }

    /// Where `uri`'s object is kept: `<dir>/<bucket>/<key>`; keys with `..` or absolute parts are refused.
    fn local_path(&self, uri: &S3Uri) -> Result<PathBuf, StorageError> {
        let whole_bucket = S3Uri::new(uri.bucket.clone(), String::new());
        whole_bucket
            .local_path(&uri.key, &self.dir.join(&uri.bucket))?
            .ok_or_else(|| StorageError::UnsafeKey {
                bucket: uri.bucket.clone(),
                key: uri.key.clone(),
                reason: "it names a folder, not an object".to_string(),
            })
    }
}

impl RemoteRefs for S3ManifestRefs {
    fn stage(&self, reference: &str) -> anyhow::Result<PathBuf> {
        let uri: S3Uri = reference.parse()?;
        let dest = self.local_path(&uri)?;
        if dest.is_file() {
            return Ok(dest);
        }
        let parent = dest.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        // Downloaded beside its final name and renamed, so a killed job never leaves half an object that a rerun
        // would take as whole.
        let partial = dest.with_extension("semseg-partial");
        self.store()?.download_file(&uri, &partial)?;
        std::fs::rename(&partial, &dest)
            .with_context(|| format!("cannot move {} to {}", partial.display(), dest.display()))?;
        Ok(dest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_land_under_their_bucket_and_unsafe_keys_are_refused() {
        let refs = S3ManifestRefs::new("/ml/input/s3-refs");
        let path = refs.local_path(&S3Uri::new("data", "seg/images/a.jpg")).ok();
        assert_eq!(path, Some(PathBuf::from("/ml/input/s3-refs/data/seg/images/a.jpg")));
        for key in ["seg/../../etc/passwd", "seg/images/", "/abs"] {
            let result = refs.local_path(&S3Uri::new("data", key));
            assert!(result.is_err(), "{key}: {result:?}");
        }
    }
}

//! S3 outside SageMaker (EC2, AWS Batch, Kubernetes, or an S3-compatible store): what SageMaker's platform does around
//! a training job or an endpoint, done by the binary itself.
//!
//! - [`stage`]: `train --channel NAME=s3://...` copies each channel into `<ml-root>/input/data/NAME`;
//! - [`artifacts`]: `train --output s3://...` uploads `model.tar.gz` and `output.tar.gz` at the end;
//! - [`checkpoints`]: `train --checkpoints s3://...` mirrors `checkpoints/` after every save and restores it;
//! - [`model`]: `serve --model s3://...` and `predict --model s3://...` fetch the model first;
//! - [`manifest_refs`]: `s3://` references in File-mode manifests, downloaded before the job checks them;
//! - [`fetch_object`]: one object's bytes.
//!
//! Everything here is synchronous for its callers: the async SDK runs on a small runtime owned by [`S3Store`].
//! Transfers are parallel, retried with backoff, multipart above [`TransferOptions::part_size`], and every failure
//! is a [`StorageError`] naming the bucket and key.

pub mod artifacts;
pub mod checkpoints;
mod client;
mod error;
pub mod manifest_refs;
pub mod model;
mod ops;
pub mod stage;
pub mod sync;
pub mod uri;

use std::sync::OnceLock;

pub use checkpoints::CheckpointMirror;
pub use client::{S3Store, TransferOptions, DEFAULT_PART_SIZE, MIN_PART_SIZE};
pub use error::StorageError;
pub use ops::ObjectInfo;
pub use sync::TransferSummary;
pub use uri::S3Uri;

impl S3Store {
    /// One object's bytes.
    pub fn get_bytes(&self, uri: &S3Uri) -> Result<Vec<u8>, StorageError> {
        self.block_on(ops::get_bytes(self.client(), uri, self.endpoint()))
    }

    /// Download one object to `dest`.
    pub fn download_file(&self, uri: &S3Uri, dest: &std::path::Path) -> Result<ObjectInfo, StorageError> {
        self.block_on(ops::download(self.client(), uri, dest, self.endpoint()))
    }

    /// Upload `src` to `uri` (multipart above the part size); returns the bytes sent.
    pub fn upload_file(&self, src: &std::path::Path, uri: &S3Uri) -> Result<u64, StorageError> {
        let options = self.options();
        self.block_on(ops::upload(
            self.client(),
            src,
            uri,
            self.endpoint(),
            options.part_size,
            options.concurrency,
        ))
    }

    /// Every object under `prefix`.
    pub fn list(&self, prefix: &S3Uri) -> Result<Vec<ObjectInfo>, StorageError> {
        self.block_on(ops::list(self.client(), prefix, self.endpoint()))
    }
}

/// The bytes of the object at `uri` (`s3://bucket/key`), through a client shared by every call in the process (for
/// File-mode manifests whose entries reference S3 objects).
pub fn fetch_object(uri: &S3Uri) -> Result<Vec<u8>, StorageError> {
    static SHARED: OnceLock<S3Store> = OnceLock::new();
    let store = match SHARED.get() {
        Some(store) => store,
        None => {
            let store = S3Store::from_env(TransferOptions::default())?;
            SHARED.get_or_init(|| store)
        }
    };
    store.get_bytes(uri)
}

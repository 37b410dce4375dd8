//! Spot-style checkpointing outside SageMaker: the local `checkpoints/` directory mirrored to an S3 prefix after every
//! save, and restored from it when a job starts with an empty local directory.
//!
//! The mirror keeps the local save's atomicity: the tensor files go up first, `checkpoint.json` (which names them)
//! last, and only then are remote files the new checkpoint no longer needs deleted. A job killed mid-sync leaves the
//! previous remote checkpoint whole.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use super::artifacts::files_under;
use super::ops;
use super::sync::{download_prefix, with_retries, TransferSummary};
use super::{S3Store, S3Uri, StorageError};
use crate::train::checkpoint::STATE_FILE;

/// A local checkpoint directory's copy on S3.
pub struct CheckpointMirror {
    store: Arc<S3Store>,
    remote: S3Uri,
    /// (size, modification time) of each file as last uploaded or restored: unchanged files are not sent again.
    synced: Mutex<HashMap<String, (u64, Option<SystemTime>)>>,
}

impl CheckpointMirror {
    pub fn new(store: Arc<S3Store>, remote: &S3Uri) -> Self {
        Self {
            store,
            remote: remote.as_prefix(),
            synced: Mutex::new(HashMap::new()),
        }
    }

    pub fn remote(&self) -> &S3Uri {
        &self.remote
    }

    /// When `local_dir` holds no file, download the remote checkpoint into it. Returns what was restored, or `None`
    /// when nothing was (local files present, or nothing remote yet).
    pub fn restore_if_empty(&self, local_dir: &Path) -> Result<Option<TransferSummary>, StorageError> {
        if !files_under(local_dir)?.is_empty() {
            tracing::info!(
                "{} already holds a checkpoint; not restoring from {}",
                local_dir.display(),
                self.remote
            );
            return Ok(None);
        }
        let remote = self
            .store
            .block_on(ops::list(self.store.client(), &self.remote, self.store.endpoint()))?;
        if remote.is_empty() {
            tracing::info!("no checkpoint under {} yet: starting a new job", self.remote);
            return Ok(None);
        }
        let record = local_dir.with_file_name(".checkpoints-s3-record.json");
        let summary = download_prefix(&self.store, &self.remote, local_dir, &record)?;
        self.remember(local_dir)?;
        tracing::info!(
            objects = summary.transferred,
            bytes = summary.bytes,
            "restored the checkpoint from {} into {}",
            self.remote,
            local_dir.display()
        );
        Ok(Some(summary))
    }

    /// Make the remote prefix a copy of `local_dir`: upload new or changed files (the checkpoint state last), then
    /// delete remote objects with no local counterpart. Half-written `*.tmp` files are never sent.
    pub fn sync(&self, local_dir: &Path) -> Result<TransferSummary, StorageError> {
        let local: Vec<_> = files_under(local_dir)?
            .into_iter()
            .filter(|(_, name)| !name.ends_with(".tmp"))
            .collect();
        let remote: BTreeMap<String, u64> = self
            .store
            .block_on(ops::list(self.store.client(), &self.remote, self.store.endpoint()))?
            .into_iter()
            .map(|o| (o.key, o.size))
            .collect();
        let mut summary = TransferSummary::default();
        let (state, tensors): (Vec<_>, Vec<_>) = local.iter().partition(|(_, name)| name == STATE_FILE);
        for (path, name) in tensors.into_iter().chain(state) {
            let stamp = file_stamp(path)?;
            let key = self.remote.join(name);
            let unchanged = self.synced_stamp(name) == Some(stamp) && remote.get(&key.key) == Some(&stamp.0);
            if unchanged {
                summary.skipped += 1;
                continue;
            }
            let options = self.store.options();
            let bytes = self
                .store
                .block_on(with_retries(options.attempts, &key.to_string(), || {
                    ops::upload(
                        self.store.client(),
                        path,
                        &key,
                        self.store.endpoint(),
                        options.part_size,
                        options.concurrency,
                    )
                }))?;
            self.set_synced(name, stamp);
            summary.transferred += 1;
            summary.bytes += bytes;
        }
        let kept: Vec<String> = local.iter().map(|(_, name)| self.remote.join(name).key).collect();
        for key in remote.keys().filter(|k| !kept.contains(k)) {
            let uri = S3Uri::new(self.remote.bucket.clone(), key.clone());
            self.store
                .block_on(ops::delete(self.store.client(), &uri, self.store.endpoint()))?;
            summary.removed += 1;
        }
        tracing::info!(
            uploaded = summary.transferred,
            unchanged = summary.skipped,
            deleted = summary.removed,
            bytes = summary.bytes,
            "checkpoint mirrored to {}",
            self.remote
        );
        Ok(summary)
    }

    fn remember(&self, local_dir: &Path) -> Result<(), StorageError> {
        for (path, name) in files_under(local_dir)? {
            self.set_synced(&name, file_stamp(&path)?);
        }
        Ok(())
    }

    fn synced_stamp(&self, name: &str) -> Option<(u64, Option<SystemTime>)> {
        self.synced.lock().unwrap_or_else(|p| p.into_inner()).get(name).copied()
    }

    fn set_synced(&self, name: &str, stamp: (u64, Option<SystemTime>)) {
        self.synced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), stamp);
    }
}

fn file_stamp(path: &Path) -> Result<(u64, Option<SystemTime>), StorageError> {
    let meta = std::fs::metadata(path).map_err(|e| StorageError::io("cannot read", path, e))?;
    Ok((meta.len(), meta.modified().ok()))
}

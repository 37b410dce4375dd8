//! Copying a whole prefix into a local directory: in parallel, each object retried with backoff, and objects already
//! there (same size and ETag as recorded when they were downloaded) skipped, so a rerun transfers nothing.
//!
//! The record of what was downloaded (relative path → size and ETag) is a small JSON file kept outside the directory
//! itself, so it never shows up among a channel's data files.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ops::{self, ObjectInfo};
use super::{S3Store, S3Uri, StorageError};

/// What a transfer did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransferSummary {
    /// Objects copied.
    pub transferred: usize,
    /// Objects already in place and unchanged.
    pub skipped: usize,
    /// Bytes copied.
    pub bytes: u64,
    /// Objects removed because their counterpart is gone.
    pub removed: usize,
}

/// The sidecar record of one staged prefix.
#[derive(Debug, Default, Serialize, Deserialize)]
struct StagingRecord {
    source: String,
    objects: BTreeMap<String, RecordedObject>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct RecordedObject {
    size: u64,
    etag: String,
}

impl StagingRecord {
    fn load(path: &Path) -> Self {
        std::fs::read(path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    fn save(&self, path: &Path) -> Result<(), StorageError> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| StorageError::io("cannot create", parent, e))?;
        }
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| StorageError::Setup(e.to_string()))?;
        std::fs::write(path, bytes).map_err(|e| StorageError::io("cannot write the staging record", path, e))
    }
}

/// Make `dir` hold every object under `prefix` (read as a directory), downloading only what is missing or changed,
/// and removing files an earlier staging put there whose object is gone. `record` is the sidecar file (outside
/// `dir`). Fails with [`StorageError::EmptyPrefix`] when the prefix holds no object.
pub fn download_prefix(
    store: &S3Store,
    prefix: &S3Uri,
    dir: &Path,
    record: &Path,
) -> Result<TransferSummary, StorageError> {
    let prefix = prefix.as_prefix();
    let objects = store.block_on(ops::list(store.client(), &prefix, store.endpoint()))?;
    let mut wanted = Vec::new();
    for object in objects {
        if let Some(path) = prefix.local_path(&object.key, dir)? {
            wanted.push((object, path));
        }
    }
    if wanted.is_empty() {
        return Err(StorageError::EmptyPrefix {
            bucket: prefix.bucket.clone(),
            key: prefix.key.clone(),
            action: "staging",
        });
    }
    let previous = StagingRecord::load(record);
    let mut next = StagingRecord {
        source: prefix.to_string(),
        objects: BTreeMap::new(),
    };
    let mut summary = TransferSummary::default();
    let mut to_fetch = Vec::new();
    for (object, path) in wanted {
        let relative = relative_name(&prefix, &object);
        let recorded = RecordedObject {
            size: object.size,
            etag: object.etag.clone(),
        };
        let unchanged = previous.objects.get(&relative) == Some(&recorded)
            && std::fs::metadata(&path).is_ok_and(|m| m.is_file() && m.len() == object.size);
        if unchanged {
            summary.skipped += 1;
            next.objects.insert(relative, recorded);
        } else {
            to_fetch.push((object, path, relative));
        }
    }
    // Files an earlier staging of this directory wrote whose object no longer exists (under any source).
    for (relative, _) in previous.objects.iter().filter(|(r, _)| !next.objects.contains_key(*r)) {
        if to_fetch.iter().any(|(_, _, r)| r == relative) {
            continue;
        }
        let stale = dir.join(relative);
        if stale.is_file() {
            std::fs::remove_file(&stale).map_err(|e| StorageError::io("cannot remove the stale file", &stale, e))?;
            summary.removed += 1;
        }
    }

    let fetched = store.block_on(fetch_all(store, &prefix.bucket, to_fetch))?;
    for (relative, listed, downloaded) in fetched {
        summary.transferred += 1;
        summary.bytes += downloaded.size;
        // Recorded as listed, since the next run compares against a listing (stores may format a GET's ETag
        // differently); an object replaced between the listing and the GET differs in size or ETag next time.
        next.objects.insert(
            relative,
            RecordedObject {
                size: listed.size,
                etag: listed.etag,
            },
        );
    }
    next.save(record)?;
    Ok(summary)
}

/// Download every `(object, path)` with at most `concurrency` at once, each retried.
async fn fetch_all(
    store: &S3Store,
    bucket: &str,
    jobs: Vec<(ObjectInfo, PathBuf, String)>,
) -> Result<Vec<(String, ObjectInfo, ObjectInfo)>, StorageError> {
    let options = store.options().clone();
    let slots = Arc::new(tokio::sync::Semaphore::new(options.concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    for (object, path, relative) in jobs {
        let client = store.client().clone();
        let endpoint = store.endpoint().to_string();
        let slots = slots.clone();
        let attempts = options.attempts;
        let uri = S3Uri::new(bucket, object.key.clone());
        tasks.spawn(async move {
            let _slot = slots.acquire_owned().await;
            let downloaded = with_retries(attempts, &uri.to_string(), || {
                ops::download(&client, &uri, &path, &endpoint)
            })
            .await?;
            Ok::<_, StorageError>((relative, object, downloaded))
        });
    }
    let mut done = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        match joined.map_err(|e| StorageError::Setup(format!("a download task failed: {e}")))? {
            Ok(item) => done.push(item),
            Err(error) => {
                tasks.abort_all();
                return Err(error);
            }
        }
    }
    Ok(done)
}

/// Run `attempt` until it succeeds, fails with a permanent error, or `attempts` tries are spent (backoff 0.5 s, 1 s,
/// 2 s, ...).
pub(crate) async fn with_retries<T, F, Fut>(attempts: u32, what: &str, mut attempt: F) -> Result<T, StorageError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StorageError>>,
{
    let mut tried = 0;
    loop {
        tried += 1;
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(error) if error.is_transient() && tried < attempts => {
                let wait = Duration::from_millis(500) * 2u32.saturating_pow(tried - 1);
                tracing::warn!("{what}: {error}; try {} of {attempts} in {wait:?}", tried + 1);
                tokio::time::sleep(wait).await;
            }
            Err(error) => return Err(error),
        }
    }
}

fn relative_name(prefix: &S3Uri, object: &ObjectInfo) -> String {
    object
        .key
        .strip_prefix(prefix.key.as_str())
        .unwrap_or(&object.key)
        .to_string()
}

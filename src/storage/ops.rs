//! One-object S3 operations (list, download, upload single or multipart, delete), each mapping the SDK's error to a
//! [`StorageError`] that names the bucket and key.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use tokio::io::AsyncWriteExt;

use super::{S3Uri, StorageError};

/// An object found by listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    /// As S3 returns it, quotes removed; empty when the store gave none.
    pub etag: String,
}

/// What a request was doing, for error messages.
#[derive(Debug, Clone)]
pub(crate) struct Target<'a> {
    pub action: &'static str,
    pub uri: &'a S3Uri,
    pub endpoint: &'a str,
}

/// Map an SDK error to a [`StorageError`] for `target`.
pub(crate) fn classify<E>(error: SdkError<E, aws_sdk_s3::config::http::HttpResponse>, target: &Target) -> StorageError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let (bucket, key, action) = (target.uri.bucket.clone(), target.uri.key.clone(), target.action);
    let detail = DisplayErrorContext(&error).to_string();
    let unreachable = || StorageError::Unreachable {
        endpoint: target.endpoint.to_string(),
        bucket: target.uri.bucket.clone(),
        key: target.uri.key.clone(),
        action,
        detail: detail.clone(),
    };
    match &error {
        SdkError::TimeoutError(_) => return unreachable(),
        SdkError::DispatchFailure(failure) if failure.is_io() || failure.is_timeout() => return unreachable(),
        SdkError::DispatchFailure(_) | SdkError::ConstructionFailure(_) if detail.contains("credentials") => {
            return StorageError::NoCredentials {
                bucket,
                key,
                action,
                detail,
            }
        }
        _ => {}
    }
    let status = error.raw_response().map(|r| r.status().as_u16());
    let code = error.code().map(str::to_string);
    let message = error.message().unwrap_or_default().to_string();
    match (code.as_deref(), status) {
        (Some("NoSuchBucket"), _) => StorageError::NoSuchBucket { bucket, key, action },
        (Some("NoSuchKey" | "NotFound"), _) | (None, Some(404)) => StorageError::NoSuchKey { bucket, key, action },
        (Some("AccessDenied" | "AllAccessDisabled"), _) | (None, Some(403)) => {
            StorageError::AccessDenied { bucket, key, action }
        }
        (
            Some(
                code @ ("InvalidAccessKeyId"
                | "SignatureDoesNotMatch"
                | "ExpiredToken"
                | "InvalidToken"
                | "TokenRefreshRequired"
                | "InvalidSecurity"),
            ),
            _,
        ) => StorageError::BadCredentials {
            bucket,
            key,
            action,
            code: code.to_string(),
            message,
        },
        _ => StorageError::Service {
            bucket,
            key,
            action,
            detail,
        },
    }
}

/// Some stores answer a GET in a missing bucket with NoSuchKey: ask about the bucket before saying which is missing.
async fn missing_object_or_bucket(client: &Client, error: StorageError, uri: &S3Uri) -> StorageError {
    let StorageError::NoSuchKey { action, .. } = &error else {
        return error;
    };
    match client.head_bucket().bucket(&uri.bucket).send().await {
        Err(head) if head.raw_response().is_some_and(|r| r.status().as_u16() == 404) => StorageError::NoSuchBucket {
            bucket: uri.bucket.clone(),
            key: uri.key.clone(),
            action,
        },
        _ => error,
    }
}

/// Every object under `prefix` (paginated).
pub(crate) async fn list(client: &Client, prefix: &S3Uri, endpoint: &str) -> Result<Vec<ObjectInfo>, StorageError> {
    let target = Target {
        action: "listing",
        uri: prefix,
        endpoint,
    };
    let mut objects = Vec::new();
    let mut pages = client
        .list_objects_v2()
        .bucket(&prefix.bucket)
        .prefix(&prefix.key)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| classify(e, &target))?;
        for object in page.contents() {
            let Some(key) = object.key() else { continue };
            objects.push(ObjectInfo {
                key: key.to_string(),
                size: object.size().unwrap_or(0).max(0) as u64,
                etag: object.e_tag().unwrap_or_default().trim_matches('"').to_string(),
            });
        }
    }
    Ok(objects)
}

/// The object's response, its body not read yet; a missing object says whether the key or the bucket is missing.
async fn get_object(
    client: &Client,
    uri: &S3Uri,
    endpoint: &str,
) -> Result<aws_sdk_s3::operation::get_object::GetObjectOutput, StorageError> {
    let target = Target {
        action: "downloading",
        uri,
        endpoint,
    };
    match client.get_object().bucket(&uri.bucket).key(&uri.key).send().await {
        Ok(response) => Ok(response),
        Err(error) => Err(missing_object_or_bucket(client, classify(error, &target), uri).await),
    }
}

/// Download `uri` into `dest` (through a temporary file renamed into place, so a broken transfer never leaves a
/// partial file under the real name). Returns the object's ETag and size.
pub(crate) async fn download(
    client: &Client,
    uri: &S3Uri,
    dest: &Path,
    endpoint: &str,
) -> Result<ObjectInfo, StorageError> {
    let response = get_object(client, uri, endpoint).await?;
    let etag = response.e_tag().unwrap_or_default().trim_matches('"').to_string();
    if let Some(parent) = dest.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| StorageError::io("cannot create the directory", parent, e))?;
    }
    let partial = partial_path(dest);
    let mut file = tokio::fs::File::create(&partial)
        .await
        .map_err(|e| StorageError::io("cannot create", &partial, e))?;
    let mut body = response.body;
    let mut size = 0u64;
    loop {
        let chunk = body.try_next().await.map_err(|e| StorageError::Service {
            bucket: uri.bucket.clone(),
            key: uri.key.clone(),
            action: "downloading",
            detail: format!("the transfer broke after {size} bytes: {}", DisplayErrorContext(&e)),
        });
        let chunk = match chunk {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(error) => {
                let _ = tokio::fs::remove_file(&partial).await;
                return Err(error);
            }
        };
        size += chunk.len() as u64;
        file.write_all(&chunk)
            .await
            .map_err(|e| StorageError::io("cannot write", &partial, e))?;
    }
    file.flush()
        .await
        .map_err(|e| StorageError::io("cannot write", &partial, e))?;
    drop(file);
    tokio::fs::rename(&partial, dest)
        .await
        .map_err(|e| StorageError::io("cannot move the download into place at", dest, e))?;
    Ok(ObjectInfo {
        key: uri.key.clone(),
        size,
        etag,
    })
}

/// The whole object in memory.
pub(crate) async fn get_bytes(client: &Client, uri: &S3Uri, endpoint: &str) -> Result<Vec<u8>, StorageError> {
    let response = get_object(client, uri, endpoint).await?;
    let bytes = response.body.collect().await.map_err(|e| StorageError::Service {
        bucket: uri.bucket.clone(),
        key: uri.key.clone(),
        action: "downloading",
        detail: format!("the transfer broke: {}", DisplayErrorContext(&e)),
    })?;
    Ok(bytes.to_vec())
}

/// Upload the file `src` to `uri`: one PUT up to `part_size`, a multipart upload (parts of `part_size`, up to
/// `concurrency` at a time) above it. A failed multipart upload is aborted so its parts do not linger (and cost).
pub(crate) async fn upload(
    client: &Client,
    src: &Path,
    uri: &S3Uri,
    endpoint: &str,
    part_size: u64,
    concurrency: usize,
) -> Result<u64, StorageError> {
    let size = tokio::fs::metadata(src)
        .await
        .map_err(|e| StorageError::io("cannot read", src, e))?
        .len();
    let target = Target {
        action: "uploading",
        uri,
        endpoint,
    };
    if size <= part_size {
        let body = ByteStream::from_path(src)
            .await
            .map_err(|e| StorageError::io("cannot read", src, std::io::Error::other(e)))?;
        client
            .put_object()
            .bucket(&uri.bucket)
            .key(&uri.key)
            .content_length(size as i64)
            .body(body)
            .send()
            .await
            .map_err(|e| classify(e, &target))?;
        return Ok(size);
    }
    let created = client
        .create_multipart_upload()
        .bucket(&uri.bucket)
        .key(&uri.key)
        .send()
        .await
        .map_err(|e| classify(e, &target))?;
    let upload_id = created.upload_id().unwrap_or_default().to_string();
    let result = upload_parts(client, src, uri, endpoint, &upload_id, size, part_size, concurrency).await;
    match result {
        Ok(parts) => {
            client
                .complete_multipart_upload()
                .bucket(&uri.bucket)
                .key(&uri.key)
                .upload_id(&upload_id)
                .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
                .send()
                .await
                .map_err(|e| classify(e, &target))?;
            tracing::debug!(%uri, size, part_size, "multipart upload complete");
            Ok(size)
        }
        Err(error) => {
            if let Err(abort) = client
                .abort_multipart_upload()
                .bucket(&uri.bucket)
                .key(&uri.key)
                .upload_id(&upload_id)
                .send()
                .await
            {
                tracing::warn!(%uri, "cannot abort the failed multipart upload {upload_id}: {}", DisplayErrorContext(&abort));
            }
            Err(error)
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn upload_parts(
    client: &Client,
    src: &Path,
    uri: &S3Uri,
    endpoint: &str,
    upload_id: &str,
    size: u64,
    part_size: u64,
    concurrency: usize,
) -> Result<Vec<CompletedPart>, StorageError> {
    let slots = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    let parts = size.div_ceil(part_size);
    for index in 0..parts {
        let offset = index * part_size;
        let length = part_size.min(size - offset);
        let part_number = (index + 1) as i32;
        let (client, src, uri, endpoint, upload_id) = (
            client.clone(),
            src.to_path_buf(),
            uri.clone(),
            endpoint.to_string(),
            upload_id.to_string(),
        );
        let slots = slots.clone();
        tasks.spawn(async move {
            let _slot = slots.acquire_owned().await;
            let target = Target {
                action: "uploading a part of",
                uri: &uri,
                endpoint: &endpoint,
            };
            let body = ByteStream::read_from()
                .path(&src)
                .offset(offset)
                .length(Length::Exact(length))
                .build()
                .await
                .map_err(|e| StorageError::io("cannot read", &src, std::io::Error::other(e)))?;
            let uploaded = client
                .upload_part()
                .bucket(&uri.bucket)
                .key(&uri.key)
                .upload_id(&upload_id)
                .part_number(part_number)
                .content_length(length as i64)
                .body(body)
                .send()
                .await
                .map_err(|e| classify(e, &target))?;
            Ok::<_, StorageError>(
                CompletedPart::builder()
                    .part_number(part_number)
                    .set_e_tag(uploaded.e_tag().map(str::to_string))
                    .build(),
            )
        });
    }
    let mut completed = Vec::with_capacity(parts as usize);
    while let Some(joined) = tasks.join_next().await {
        let part = joined.map_err(|e| StorageError::Setup(format!("an upload task failed: {e}")))??;
        completed.push(part);
    }
    completed.sort_by_key(|p| p.part_number());
    Ok(completed)
}

/// Delete one object.
pub(crate) async fn delete(client: &Client, uri: &S3Uri, endpoint: &str) -> Result<(), StorageError> {
    let target = Target {
        action: "deleting",
        uri,
        endpoint,
    };
    client
        .delete_object()
        .bucket(&uri.bucket)
        .key(&uri.key)
        .send()
        .await
        .map_err(|e| classify(e, &target))?;
    Ok(())
}

/// Where a download is written before it is renamed into place.
pub(crate) fn partial_path(dest: &Path) -> PathBuf {
    let mut name = dest.as_os_str().to_owned();
    name.push(".s3-partial");
    PathBuf::from(name)
}

//! What can go wrong talking to S3, each case naming the bucket and key and saying what to check.

use std::path::PathBuf;

/// An S3 failure, classified from the SDK's error so the message says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("'{uri}' is not a usable S3 address: {reason}")]
    InvalidUri { uri: String, reason: String },

    #[error("the object s3://{bucket}/{key} cannot be staged: {reason}")]
    UnsafeKey {
        bucket: String,
        key: String,
        reason: String,
    },

    #[error("the bucket '{bucket}' does not exist (NoSuchBucket while {action} s3://{bucket}/{key}); check the name and the region/endpoint")]
    NoSuchBucket {
        bucket: String,
        key: String,
        action: &'static str,
    },

    #[error("no object s3://{bucket}/{key} (NoSuchKey while {action}); check the key")]
    NoSuchKey {
        bucket: String,
        key: String,
        action: &'static str,
    },

    #[error("no objects under s3://{bucket}/{key} (while {action}); check the prefix")]
    EmptyPrefix {
        bucket: String,
        key: String,
        action: &'static str,
    },

    #[error("access denied to s3://{bucket}/{key} (while {action}): the credentials in use are not allowed to do this; check the IAM policy or bucket policy")]
    AccessDenied {
        bucket: String,
        key: String,
        action: &'static str,
    },

    #[error("the S3 credentials were rejected ({code}: {message}) while {action} s3://{bucket}/{key}; check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the profile) and the clock")]
    BadCredentials {
        bucket: String,
        key: String,
        action: &'static str,
        code: String,
        message: String,
    },

    #[error("no AWS credentials for s3://{bucket}/{key} (while {action}): {detail}; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run with an instance/task role")]
    NoCredentials {
        bucket: String,
        key: String,
        action: &'static str,
        detail: String,
    },

    #[error(
        "cannot reach the S3 endpoint {endpoint} for s3://{bucket}/{key} (while {action}, retries exhausted): {detail}"
    )]
    Unreachable {
        endpoint: String,
        bucket: String,
        key: String,
        action: &'static str,
        detail: String,
    },

    #[error("S3 refused {action} s3://{bucket}/{key}: {detail}")]
    Service {
        bucket: String,
        key: String,
        action: &'static str,
        detail: String,
    },

    #[error("{what} {}: {error}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },

    #[error("cannot set up the S3 client: {0}")]
    Setup(String),
}

impl StorageError {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Self::Io {
            what,
            path: path.into(),
            error,
        }
    }

    /// Whether trying the same transfer again may succeed (a broken stream, a local write): the SDK already retried
    /// the request itself, and a wrong name, permission or credential will not fix itself.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Io { .. } | Self::Service { .. })
    }
}

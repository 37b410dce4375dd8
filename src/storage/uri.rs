//! `s3://bucket/key` addresses: parsing (with the reason a string is not one), and the keys of a prefix's objects.

use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use super::StorageError;

const SCHEME: &str = "s3://";

/// An S3 object or prefix: `s3://bucket/key`. The key may be empty (the whole bucket).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct S3Uri {
    pub bucket: String,
    pub key: String,
}

impl S3Uri {
    pub fn new(bucket: impl Into<String>, key: impl Into<String>) -> Self {
        Self {
            bucket: bucket.into(),
            key: key.into(),
        }
    }

    /// Whether `text` is meant as an S3 address (then [`S3Uri::from_str`] says what is wrong with it, if anything).
    pub fn is_s3(text: &str) -> bool {
        text.get(..SCHEME.len()).is_some_and(|s| s.eq_ignore_ascii_case(SCHEME))
    }

    /// The S3 address a path-typed argument holds, if it holds one (`--model s3://...`).
    pub fn from_path(path: &Path) -> Option<Result<Self, StorageError>> {
        let text = path.to_str()?;
        Self::is_s3(text).then(|| text.parse())
    }

    /// The same address read as a "directory": the key ends with `/` (unless it is the whole bucket), so
    /// `s3://b/data` does not also take in `s3://b/data-old/...`.
    pub fn as_prefix(&self) -> Self {
        let mut key = self.key.clone();
        if !key.is_empty() && !key.ends_with('/') {
            key.push('/');
        }
        Self::new(self.bucket.clone(), key)
    }

    /// The object `relative` (a `/`-separated path) under this prefix.
    pub fn join(&self, relative: &str) -> Self {
        Self::new(self.bucket.clone(), format!("{}{relative}", self.as_prefix().key))
    }

    /// The local path under `dir` for `key`, an object below this prefix; `None` for "directory marker" keys
    /// (ending in `/`). Keys that would land outside `dir` (`..`, absolute parts) are refused.
    pub fn local_path(&self, key: &str, dir: &Path) -> Result<Option<PathBuf>, StorageError> {
        let prefix = self.as_prefix();
        let relative = key
            .strip_prefix(prefix.key.as_str())
            .ok_or_else(|| StorageError::UnsafeKey {
                bucket: self.bucket.clone(),
                key: key.to_string(),
                reason: format!("it is not below the prefix '{}'", prefix.key),
            })?;
        if relative.is_empty() || relative.ends_with('/') {
            return Ok(None);
        }
        let relative = Path::new(relative);
        if !relative.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(StorageError::UnsafeKey {
                bucket: self.bucket.clone(),
                key: key.to_string(),
                reason: "its path has '..', '.' or an absolute part and would be written outside the local directory"
                    .to_string(),
            });
        }
        Ok(Some(dir.join(relative)))
    }

    /// The last path segment of the key (`model.tar.gz` for `s3://b/run/model.tar.gz`).
    pub fn file_name(&self) -> Option<&str> {
        self.key.rsplit('/').next().filter(|name| !name.is_empty())
    }
}

impl FromStr for S3Uri {
    type Err = StorageError;

    fn from_str(text: &str) -> Result<Self, StorageError> {
        let invalid = |reason: &str| StorageError::InvalidUri {
            uri: text.to_string(),
            reason: reason.to_string(),
        };
        if !Self::is_s3(text) {
            return Err(invalid("it does not start with s3://"));
        }
        let rest = &text[SCHEME.len()..];
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(invalid("the bucket name is empty (expected s3://bucket/prefix/)"));
        }
        // S3's bucket naming rules, checked loosely: enough to catch a swapped argument or a typo'd scheme.
        let bucket_chars_ok = bucket
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.' | '_'));
        if !bucket_chars_ok || bucket.len() < 3 || bucket.len() > 63 {
            return Err(invalid(
                "the bucket name must be 3 to 63 characters of lowercase letters, digits, '-', '.' or '_'",
            ));
        }
        Ok(Self::new(bucket, key))
    }
}

impl fmt::Display for S3Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}/{}", self.bucket, self.key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bucket_and_key() {
        let uri: S3Uri = "s3://my-bucket/data/train/".parse().unwrap();
        assert_eq!(uri, S3Uri::new("my-bucket", "data/train/"));
        assert_eq!(uri.to_string(), "s3://my-bucket/data/train/");
        let bucket_only: S3Uri = "S3://my-bucket".parse().unwrap();
        assert_eq!(bucket_only, S3Uri::new("my-bucket", ""));
        assert_eq!(bucket_only.as_prefix().key, "");
    }

    #[test]
    fn rejects_what_is_not_an_s3_address_with_the_reason() {
        for (text, reason) in [
            ("https://bucket/key", "does not start with s3://"),
            ("s3:///key", "bucket name is empty"),
            ("s3://My_Bucket/key", "lowercase"),
            ("s3://ab/key", "3 to 63"),
        ] {
            let error = text.parse::<S3Uri>().unwrap_err().to_string();
            assert!(error.contains(text) && error.contains(reason), "{text}: {error}");
        }
    }

    #[test]
    fn a_prefix_is_read_as_a_directory() {
        let uri = S3Uri::new("b", "data/train");
        assert_eq!(uri.as_prefix().key, "data/train/");
        assert_eq!(uri.join("a/b.png"), S3Uri::new("b", "data/train/a/b.png"));
        assert_eq!(S3Uri::new("b", "run/model.tar.gz").file_name(), Some("model.tar.gz"));
        assert_eq!(S3Uri::new("b", "run/").file_name(), None);
    }

    #[test]
    fn local_paths_stay_inside_the_directory() {
        let uri = S3Uri::new("b", "data/");
        let dir = Path::new("/tmp/channel");
        assert_eq!(
            uri.local_path("data/x/1.png", dir).unwrap(),
            Some(PathBuf::from("/tmp/channel/x/1.png"))
        );
        assert_eq!(uri.local_path("data/x/", dir).unwrap(), None);
        let escape = uri.local_path("data/../../etc/passwd", dir).unwrap_err().to_string();
        assert!(
            escape.contains("s3://b/data/../../etc/passwd") && escape.contains(".."),
            "{escape}"
        );
        assert!(uri.local_path("other/1.png", dir).is_err());
    }

    #[test]
    fn path_arguments_holding_s3_addresses_are_recognised() {
        assert_eq!(
            S3Uri::from_path(Path::new("s3://bucket/run/model.tar.gz")).map(|r| r.unwrap()),
            Some(S3Uri::new("bucket", "run/model.tar.gz"))
        );
        assert!(S3Uri::from_path(Path::new("/opt/ml/model")).is_none());
    }
}

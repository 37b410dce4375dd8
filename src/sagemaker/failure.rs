//! The failure file: SageMaker shows its first 1024 characters as the job's FailureReason.

use std::fmt::Write as _;
use std::path::Path;

/// SageMaker keeps this many characters of the failure file as FailureReason.
pub const FAILURE_REASON_CHARS: usize = 1024;

/// Render an error and its causes, outermost first, as one line per cause ("what failed: why").
pub fn describe(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for (depth, cause) in error.chain().enumerate() {
        if depth > 0 {
            text.push_str(": ");
        }
        let _ = write!(text, "{cause}");
    }
    text
}

/// Write the failure reason. The message is written whole (the log and the file keep all details); callers put the
/// problem and its fix first so that the first 1024 characters stand on their own.
pub fn write_failure(path: &Path, message: &str) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn causes_are_joined_outermost_first() {
        let error = Err::<(), _>(anyhow::anyhow!("inner cause"))
            .context("outer step")
            .unwrap_err();
        assert_eq!(describe(&error), "outer step: inner cause");
    }

    #[test]
    fn failure_file_is_created_with_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("output/failure");
        write_failure(&path, "bad thing").unwrap();
        assert_eq!(std::fs::read_to_string(path).unwrap(), "bad thing");
    }
}

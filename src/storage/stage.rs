//! `semseg train --channel NAME=s3://bucket/prefix/`: each channel's objects staged into `<ml-root>/input/data/NAME`
//! (as SageMaker's File mode would), and declared in `inputdataconfig.json` when the file does not declare them.

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Context, Result};

use super::sync::download_prefix;
use super::{S3Store, S3Uri};
use crate::sagemaker::{ChannelName, MlRoot};

/// One `--channel NAME=s3://...` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelSource {
    pub name: ChannelName,
    pub uri: S3Uri,
}

impl FromStr for ChannelSource {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (name, uri) = text
            .split_once('=')
            .ok_or_else(|| format!("'{text}' is not NAME=s3://bucket/prefix/"))?;
        let name = ChannelName::parse(name.trim()).ok_or_else(|| {
            let known: Vec<_> = ChannelName::ALL.iter().map(|c| c.as_str()).collect();
            format!(
                "'{name}' is not a channel of this algorithm; use one of {}",
                known.join(", ")
            )
        })?;
        let uri = uri.trim().parse().map_err(|e: super::StorageError| e.to_string())?;
        Ok(Self { name, uri })
    }
}

impl fmt::Display for ChannelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.name, self.uri)
    }
}

/// Stage every channel, then declare them (File mode) in `inputdataconfig.json`.
pub fn stage_channels(store: &S3Store, ml: &MlRoot, channels: &[ChannelSource]) -> Result<()> {
    for channel in channels {
        let name = channel.name.as_str();
        let dir = ml.channel_dir(name);
        let record = ml.root().join("input/s3-staging").join(format!("{name}.json"));
        let started = std::time::Instant::now();
        let summary = download_prefix(store, &channel.uri, &dir, &record)
            .with_context(|| format!("cannot stage the channel '{name}' from {}", channel.uri))?;
        tracing::info!(
            channel = name,
            seconds = started.elapsed().as_secs_f64(),
            "staged {} into {}: {} objects transferred ({} bytes), {} already present, {} stale removed",
            channel.uri,
            dir.display(),
            summary.transferred,
            summary.bytes,
            summary.skipped,
            summary.removed
        );
    }
    declare_file_channels(ml, channels.iter().map(|c| c.name))
}

/// Add `{"TrainingInputMode": "File"}` entries to `inputdataconfig.json` (creating it if needed) for the channels it
/// does not declare; a channel it declares in another mode is an error, since staged files are File mode.
pub fn declare_file_channels(ml: &MlRoot, names: impl IntoIterator<Item = ChannelName>) -> Result<()> {
    let path = ml.input_data_config_file();
    let mut config: serde_json::Map<String, serde_json::Value> = match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not a JSON object of channel name → settings", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::Map::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut changed = false;
    for name in names {
        match config.get(name.as_str()) {
            Some(entry) => {
                let mode = entry
                    .get("TrainingInputMode")
                    .and_then(|m| m.as_str())
                    .unwrap_or("File");
                if !mode.eq_ignore_ascii_case("File") {
                    bail!(
                        "{} declares the channel '{name}' in {mode} mode, but --channel stages it as files: \
                         remove the channel's entry or set its TrainingInputMode to File",
                        path.display()
                    );
                }
            }
            None => {
                config.insert(
                    name.as_str().to_string(),
                    serde_json::json!({"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated"}),
                );
                changed = true;
            }
        }
    }
    if changed {
        let dir = ml.config_dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        std::fs::write(&path, serde_json::to_vec_pretty(&config)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_arguments_parse_and_bad_ones_say_why() {
        let source: ChannelSource = "train=s3://bucket/data/train/".parse().unwrap();
        assert_eq!(source.name, ChannelName::Train);
        assert_eq!(source.uri, S3Uri::new("bucket", "data/train/"));
        assert!("train".parse::<ChannelSource>().unwrap_err().contains("NAME=s3://"));
        assert!("trian=s3://bucket/x"
            .parse::<ChannelSource>()
            .unwrap_err()
            .contains("'trian' is not a channel"));
        assert!("train=/local/dir"
            .parse::<ChannelSource>()
            .unwrap_err()
            .contains("s3://"));
    }

    #[test]
    fn staged_channels_are_declared_in_file_mode_and_existing_entries_kept() {
        let dir = tempfile::tempdir().unwrap();
        let ml = MlRoot::new(dir.path());
        std::fs::create_dir_all(ml.config_dir()).unwrap();
        std::fs::write(
            ml.input_data_config_file(),
            r#"{"validation": {"ContentType": "image/jpeg", "TrainingInputMode": "File"}}"#,
        )
        .unwrap();
        declare_file_channels(&ml, [ChannelName::Train, ChannelName::Validation]).unwrap();
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(ml.input_data_config_file()).unwrap()).unwrap();
        assert_eq!(config["train"]["TrainingInputMode"], "File");
        assert_eq!(config["validation"]["ContentType"], "image/jpeg");

        std::fs::write(
            ml.input_data_config_file(),
            r#"{"train": {"TrainingInputMode": "Pipe"}}"#,
        )
        .unwrap();
        let error = declare_file_channels(&ml, [ChannelName::Train])
            .unwrap_err()
            .to_string();
        assert!(error.contains("'train' in Pipe mode"), "{error}");
    }
}

//! The two configuration files besides the hyperparameters: `inputdataconfig.json` (per-channel input settings) and
//! `resourceconfig.json` (the hosts of the job). Every field is optional: SageMaker's local mode writes only some.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// How SageMaker delivers a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputMode {
    /// Files copied to `input/data/<channel>/` before the job starts.
    File,
    /// Files streamed on demand at the same path, read-only.
    FastFile,
    /// RecordIO streamed through FIFOs `input/data/<channel>_<epoch>`.
    Pipe,
}

impl FromStr for InputMode {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s.trim().to_ascii_lowercase().as_str() {
            "file" => Ok(Self::File),
            "fastfile" => Ok(Self::FastFile),
            "pipe" => Ok(Self::Pipe),
            _ => Err(()),
        }
    }
}

impl fmt::Display for InputMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::File => "File",
            Self::FastFile => "FastFile",
            Self::Pipe => "Pipe",
        })
    }
}

/// One channel's entry in `inputdataconfig.json`. Unknown fields are ignored: the platform adds new ones over time.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ChannelConfig {
    pub content_type: Option<String>,
    pub training_input_mode: Option<String>,
    #[serde(rename = "S3DistributionType")]
    pub s3_distribution_type: Option<String>,
    pub record_wrapper_type: Option<String>,
    /// Augmented manifests: the attributes each line contributes, in order (`["source-ref", "city-streets-ref"]`:
    /// the image, then the annotation).
    pub attribute_names: Option<Vec<String>>,
}

impl ChannelConfig {
    /// The channel's input mode; File when unspecified.
    pub fn mode(&self, channel: &str) -> Result<InputMode> {
        match &self.training_input_mode {
            None => Ok(InputMode::File),
            Some(text) => text.parse().map_err(|_| {
                anyhow::anyhow!(
                    "inputdataconfig.json: channel '{channel}' has TrainingInputMode '{text}'; \
                     use File, FastFile or Pipe"
                )
            }),
        }
    }
}

/// `inputdataconfig.json`: channel name → settings. Absent file = no declared channels (File mode is assumed for
/// whatever directories exist under input/data).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InputDataConfig {
    pub channels: BTreeMap<String, ChannelConfig>,
}

impl InputDataConfig {
    pub fn parse(text: &str) -> Result<Self> {
        let channels: BTreeMap<String, ChannelConfig> = serde_json::from_str(text).context(
            "inputdataconfig.json is not a JSON object of channel name → {ContentType, TrainingInputMode, ...}",
        )?;
        Ok(Self { channels })
    }

    pub fn load(path: &Path) -> Result<Self> {
        match read_optional(path)? {
            Some(text) => Self::parse(&text).with_context(|| format!("reading {}", path.display())),
            None => Ok(Self::default()),
        }
    }
}

/// `resourceconfig.json`. Absent file = one host.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ResourceConfig {
    #[serde(default = "default_host")]
    pub current_host: String,
    #[serde(default = "default_hosts")]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub network_interface_name: Option<String>,
}

fn default_host() -> String {
    "algo-1".to_string()
}

fn default_hosts() -> Vec<String> {
    vec![default_host()]
}

impl Default for ResourceConfig {
    fn default() -> Self {
        Self {
            current_host: default_host(),
            hosts: default_hosts(),
            network_interface_name: None,
        }
    }
}

impl ResourceConfig {
    pub fn parse(text: &str) -> Result<Self> {
        serde_json::from_str(text).context("resourceconfig.json is not a JSON object with current_host and hosts")
    }

    pub fn load(path: &Path) -> Result<Self> {
        match read_optional(path)? {
            Some(text) => Self::parse(&text).with_context(|| format!("reading {}", path.display())),
            None => Ok(Self::default()),
        }
    }

    /// Training runs on one machine, like the built-in algorithm.
    pub fn require_single_host(&self) -> Result<()> {
        if self.hosts.len() > 1 {
            bail!(
                "this algorithm trains on one instance, but the job has {} hosts ({}); set InstanceCount to 1",
                self.hosts.len(),
                self.hosts.join(", ")
            );
        }
        Ok(())
    }
}

fn read_optional(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_and_sparse_input_data_configs_parse() {
        let config = InputDataConfig::parse(
            r#"{"train": {"ContentType": "image/jpeg", "TrainingInputMode": "File",
                          "S3DistributionType": "FullyReplicated", "RecordWrapperType": "None", "Extra": 1},
                "validation": {"TrainingInputMode": "Pipe", "RecordWrapperType": "RecordIO",
                               "AttributeNames": ["source-ref", "city-streets-ref"]},
                "label_map": {}}"#,
        )
        .unwrap();
        assert_eq!(config.channels["train"].content_type.as_deref(), Some("image/jpeg"));
        assert_eq!(
            config.channels["train"].s3_distribution_type.as_deref(),
            Some("FullyReplicated")
        );
        assert_eq!(config.channels["train"].mode("train").unwrap(), InputMode::File);
        assert_eq!(
            config.channels["validation"].mode("validation").unwrap(),
            InputMode::Pipe
        );
        assert_eq!(config.channels["label_map"].mode("label_map").unwrap(), InputMode::File);
        assert_eq!(
            config.channels["validation"].attribute_names.as_deref(),
            Some(&["source-ref".to_string(), "city-streets-ref".to_string()][..])
        );
        assert_eq!(config.channels["train"].attribute_names, None);
    }

    #[test]
    fn unknown_modes_and_malformed_files_are_errors() {
        let config = InputDataConfig::parse(r#"{"train": {"TrainingInputMode": "Stream"}}"#).unwrap();
        let err = config.channels["train"].mode("train").unwrap_err().to_string();
        assert!(err.contains("'train'") && err.contains("'Stream'") && err.contains("File, FastFile or Pipe"));
        assert!(InputDataConfig::parse("[]").is_err());
    }

    #[test]
    fn missing_files_mean_defaults() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            InputDataConfig::load(&dir.path().join("none.json")).unwrap(),
            InputDataConfig::default()
        );
        let resources = ResourceConfig::load(&dir.path().join("none.json")).unwrap();
        assert_eq!(resources.hosts, vec!["algo-1"]);
        resources.require_single_host().unwrap();
    }

    #[test]
    fn several_hosts_are_refused_with_the_fix() {
        let config = ResourceConfig::parse(
            r#"{"current_host": "algo-1", "hosts": ["algo-1", "algo-2"], "network_interface_name": "eth0"}"#,
        )
        .unwrap();
        let err = config.require_single_host().unwrap_err().to_string();
        assert!(err.contains("2 hosts") && err.contains("InstanceCount to 1"), "{err}");
    }

    #[test]
    fn input_modes_parse_case_insensitively() {
        assert_eq!("File".parse(), Ok(InputMode::File));
        assert_eq!("fastfile".parse(), Ok(InputMode::FastFile));
        assert_eq!("PIPE".parse(), Ok(InputMode::Pipe));
        assert_eq!("Stream".parse::<InputMode>(), Err(()));
    }
}

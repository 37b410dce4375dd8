//! Channels of a training job: which ones this algorithm knows, how each one is delivered (File, FastFile, Pipe) and
//! where its data is.

use std::fmt;
use std::path::PathBuf;

use anyhow::{bail, Result};

use super::config::{InputDataConfig, InputMode};
use super::paths::MlRoot;

/// The channels this algorithm reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ChannelName {
    Train,
    Validation,
    TrainAnnotation,
    ValidationAnnotation,
    LabelMap,
    /// An earlier run's model.tar.gz, for incremental training.
    Model,
    /// ImageNet backbone weights, for use_pretrained_model.
    Pretrained,
}

impl ChannelName {
    pub const ALL: [ChannelName; 7] = [
        Self::Train,
        Self::Validation,
        Self::TrainAnnotation,
        Self::ValidationAnnotation,
        Self::LabelMap,
        Self::Model,
        Self::Pretrained,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Train => "train",
            Self::Validation => "validation",
            Self::TrainAnnotation => "train_annotation",
            Self::ValidationAnnotation => "validation_annotation",
            Self::LabelMap => "label_map",
            Self::Model => "model",
            Self::Pretrained => "pretrained",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == name)
    }
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A channel resolved against the ml-root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Channel {
    pub name: ChannelName,
    pub mode: InputMode,
    /// File/FastFile: the channel directory. Pipe: the FIFO path prefix (`input/data/<channel>`; epoch N is `_N`).
    pub path: PathBuf,
    pub content_type: Option<String>,
    /// `RecordWrapperType` (`RecordIO` for augmented manifests in Pipe mode).
    pub record_wrapper_type: Option<String>,
    /// `AttributeNames` of an augmented manifest (image attribute, then annotation attribute).
    pub attribute_names: Option<Vec<String>>,
}

/// The channels present for one job, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Channels {
    channels: Vec<Channel>,
    /// Names in inputdataconfig.json this algorithm does not read (logged, not fatal).
    pub unknown: Vec<String>,
}

impl Channels {
    /// Resolve channels from `inputdataconfig.json` plus, for channels it does not declare, the directories that
    /// exist under `input/data` (local runs often have no config file at all).
    pub fn resolve(ml: &MlRoot, config: &InputDataConfig) -> Result<Self> {
        let mut resolved = Channels::default();
        for (name, channel_config) in &config.channels {
            let Some(channel) = ChannelName::parse(name) else {
                resolved.unknown.push(name.clone());
                continue;
            };
            resolved.channels.push(Channel {
                name: channel,
                mode: channel_config.mode(name)?,
                path: ml.channel_dir(name),
                content_type: channel_config.content_type.clone(),
                record_wrapper_type: channel_config.record_wrapper_type.clone(),
                attribute_names: channel_config.attribute_names.clone(),
            });
        }
        for channel in ChannelName::ALL {
            let dir = ml.channel_dir(channel.as_str());
            if resolved.get(channel).is_none() && dir.is_dir() {
                resolved.channels.push(Channel {
                    name: channel,
                    mode: InputMode::File,
                    path: dir,
                    content_type: None,
                    record_wrapper_type: None,
                    attribute_names: None,
                });
            }
        }
        resolved.channels.sort_by_key(|c| c.name);
        Ok(resolved)
    }

    pub fn get(&self, name: ChannelName) -> Option<&Channel> {
        self.channels.iter().find(|c| c.name == name)
    }

    /// A channel the job cannot run without, with the fix in the message.
    pub fn require(&self, name: ChannelName) -> Result<&Channel> {
        match self.get(name) {
            Some(channel) => Ok(channel),
            None => bail!(
                "the required channel '{name}' is missing: add an input channel named '{name}' to the training job \
                 (locally: create the directory input/data/{name})"
            ),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Channel> {
        self.channels.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_channels_take_their_mode_and_undeclared_directories_are_file_mode() {
        let dir = tempfile::tempdir().unwrap();
        let ml = MlRoot::new(dir.path());
        std::fs::create_dir_all(ml.channel_dir("train_annotation")).unwrap();
        std::fs::create_dir_all(ml.channel_dir("not_a_channel")).unwrap();
        let config = InputDataConfig::parse(
            r#"{"train": {"TrainingInputMode": "Pipe", "ContentType": "application/x-recordio"},
                "validation": {"TrainingInputMode": "FastFile"}, "extra": {}}"#,
        )
        .unwrap();
        let channels = Channels::resolve(&ml, &config).unwrap();
        let train = channels.require(ChannelName::Train).unwrap();
        assert_eq!(
            (train.mode, train.content_type.as_deref()),
            (InputMode::Pipe, Some("application/x-recordio"))
        );
        assert_eq!(train.path, ml.channel_dir("train"));
        assert_eq!(
            channels.require(ChannelName::Validation).unwrap().mode,
            InputMode::FastFile
        );
        assert_eq!(
            channels.require(ChannelName::TrainAnnotation).unwrap().mode,
            InputMode::File
        );
        assert_eq!(channels.unknown, vec!["extra"]);
        let err = channels
            .require(ChannelName::ValidationAnnotation)
            .unwrap_err()
            .to_string();
        assert!(err.contains("'validation_annotation' is missing"), "{err}");
        assert!(channels.get(ChannelName::LabelMap).is_none());
    }
}

//! The fixed layout under the ml-root (`/opt/ml` in a container, any directory in tests and on a laptop).

use std::path::{Path, PathBuf};

/// Default ml-root inside a SageMaker container.
pub const DEFAULT_ML_ROOT: &str = "/opt/ml";

/// Paths SageMaker reads from and writes to, relative to one root directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MlRoot {
    root: PathBuf,
}

impl MlRoot {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `input/config/`: hyperparameters.json, inputdataconfig.json, resourceconfig.json.
    pub fn config_dir(&self) -> PathBuf {
        self.root.join("input/config")
    }

    pub fn hyperparameters_file(&self) -> PathBuf {
        self.config_dir().join("hyperparameters.json")
    }

    pub fn input_data_config_file(&self) -> PathBuf {
        self.config_dir().join("inputdataconfig.json")
    }

    pub fn resource_config_file(&self) -> PathBuf {
        self.config_dir().join("resourceconfig.json")
    }

    /// `input/data/`: one directory per File-mode channel, or FIFOs `<channel>_<epoch>` in Pipe mode.
    pub fn data_dir(&self) -> PathBuf {
        self.root.join("input/data")
    }

    pub fn channel_dir(&self, channel: &str) -> PathBuf {
        self.data_dir().join(channel)
    }

    /// The Pipe-mode FIFO for one epoch of a channel.
    pub fn channel_fifo(&self, channel: &str, epoch: usize) -> PathBuf {
        self.data_dir().join(format!("{channel}_{epoch}"))
    }

    /// `model/`: becomes model.tar.gz after training; holds the artifact that serving loads.
    pub fn model_dir(&self) -> PathBuf {
        self.root.join("model")
    }

    /// `checkpoints/`: synced with S3 by SageMaker and restored when a (spot) job restarts.
    pub fn checkpoints_dir(&self) -> PathBuf {
        self.root.join("checkpoints")
    }

    pub fn output_dir(&self) -> PathBuf {
        self.root.join("output")
    }

    /// `output/data/`: becomes output.tar.gz; reports meant for people.
    pub fn output_data_dir(&self) -> PathBuf {
        self.output_dir().join("data")
    }

    /// `output/failure`: its first 1024 characters become the job's FailureReason.
    pub fn failure_file(&self) -> PathBuf {
        self.output_dir().join("failure")
    }
}

impl Default for MlRoot {
    fn default() -> Self {
        Self::new(DEFAULT_ML_ROOT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_follows_the_sagemaker_contract() {
        let ml = MlRoot::new("/tmp/ml");
        assert_eq!(
            ml.hyperparameters_file(),
            Path::new("/tmp/ml/input/config/hyperparameters.json")
        );
        assert_eq!(
            ml.input_data_config_file(),
            Path::new("/tmp/ml/input/config/inputdataconfig.json")
        );
        assert_eq!(
            ml.resource_config_file(),
            Path::new("/tmp/ml/input/config/resourceconfig.json")
        );
        assert_eq!(ml.channel_dir("train"), Path::new("/tmp/ml/input/data/train"));
        assert_eq!(ml.channel_fifo("train", 3), Path::new("/tmp/ml/input/data/train_3"));
        assert_eq!(ml.model_dir(), Path::new("/tmp/ml/model"));
        assert_eq!(ml.checkpoints_dir(), Path::new("/tmp/ml/checkpoints"));
        assert_eq!(ml.output_data_dir(), Path::new("/tmp/ml/output/data"));
        assert_eq!(ml.failure_file(), Path::new("/tmp/ml/output/failure"));
        assert_eq!(MlRoot::default().root(), Path::new("/opt/ml"));
    }
}

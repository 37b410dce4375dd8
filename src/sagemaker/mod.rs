//! The SageMaker platform contract: where things live under the ml-root, the configuration files the platform writes
//! before a training job starts, the typed hyperparameters, and the failure file it reads when a job fails.

pub mod channels;
pub mod config;
pub mod failure;
pub mod hyperparameters;
pub mod paths;

pub use channels::{Channel, ChannelName};
pub use config::{InputDataConfig, InputMode, ResourceConfig};
pub use hyperparameters::Hyperparameters;
pub use paths::MlRoot;

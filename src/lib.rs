//! semseg: a SageMaker-compatible semantic-segmentation trainer and server in one binary.
//!
//! The folders follow the two journeys through the program:
//! - [`sagemaker`]: the platform contract (ml-root paths, config files, hyperparameters, failure file);
//! - [`data`]: files → decoded images and labels → augmented batches;
//! - [`synth`]: a seeded generator of complete synthetic datasets in the SageMaker channel layout (`semseg synth`);
//! - [`model`]: the networks (ResNet backbones, FCN / PSPNet / DeepLabV3 heads), their ops and the model artifact;
//! - [`infer`]: one image → probabilities → mask, the inference path shared by `serve`, `predict` and `demo`
//!   (training's validation scores batches with the training network instead: [`train::validation`]);
//! - [`serve`]: SageMaker's inference-container contract (HTTP server); [`predict`]: the same inference on files;
//! - [`train`]: the training job; [`storage`]: S3 outside SageMaker (staging, artifacts, checkpoints, models);
//! - [`export`]: a trained model as an ONNX file, for runtimes other than semseg;
//! - [`demo`]: synthetic data → training → serving in one command, the README's first.

pub mod allocator;
pub mod compute;
pub mod cuda_libraries;
pub mod data;
pub mod demo;
pub mod export;
pub mod free_memory;
pub mod gpu_utilisation;
pub mod infer;
pub mod model;
pub mod normalize;
pub mod panics;
pub mod predict;
pub mod process;
pub mod sagemaker;
pub mod serve;
pub mod storage;
pub mod synth;
pub mod train;

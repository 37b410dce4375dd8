//! `semseg train`: the whole training job. Prepare and validate the inputs, build the network, then per epoch train
//! on augmented crops, validate on the validation channel, log the metric lines SageMaker scrapes, keep the best model
//! in `model/`, checkpoint to `checkpoints/`, and stop early or on SIGTERM.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;

use super::checkpoint::{self, CheckpointState, EpochRecord};
use super::early_stopping::EarlyStopping;
use super::inputs::TrainingInputs;
use super::loss::{cross_entropy, Targets};
use super::metrics::{ConfusionMatrix, Scores};
use super::optim::{Optimizer, OptimizerConfig};
use super::schedule::Schedule;
use crate::data::loader::{Loader, LoaderConfig};
use crate::model::artifact::{self, ModelMeta, TrainingMetrics};
use crate::model::config::{ModelConfig, OutputStride};
use crate::model::seeded_init::seeded_var_builder;
use crate::model::segmenter::Segmenter;
use crate::model::weights;
use crate::sagemaker::{ChannelName, Hyperparameters, MlRoot};
use crate::storage::CheckpointMirror;

/// Weight of the auxiliary head's loss (GluonCV and torchvision use 0.4).
pub const AUX_LOSS_WEIGHT: f64 = 0.4;
/// Where the training image keeps ImageNet backbone weights (`<backbone>.safetensors`, e.g. resnet-50.safetensors).
pub const DEFAULT_PRETRAINED_DIR: &str = "/opt/semseg/pretrained";

/// How the job ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Completed {
        epochs: u32,
        best_miou: f64,
    },
    EarlyStopped {
        epochs: u32,
        best_miou: f64,
    },
    /// SIGTERM: the last completed epoch is checkpointed and the best model so far is in `model/`.
    Interrupted {
        epochs: u32,
    },
}

/// Run the training job under `ml`. `stop` is raised by SIGTERM.
pub fn run(ml: &MlRoot, stop: &AtomicBool) -> Result<Outcome> {
    run_mirrored(ml, stop, None)
}

/// [`run`], copying `checkpoints/` to S3 through `mirror` after every checkpoint save (`train --checkpoints`).
pub fn run_mirrored(ml: &MlRoot, stop: &AtomicBool, mirror: Option<&CheckpointMirror>) -> Result<Outcome> {
    let inputs = TrainingInputs::prepare(ml)?;
    let hp = inputs.hyperparameters.clone();
    let device = select_device()?;

    let config = ModelConfig::new(
        hp.algorithm,
        hp.backbone,
        hp.num_classes as usize,
        OutputStride::try_from(hp.output_stride)?,
        true,
    )?;
    let varmap = VarMap::new();
    // Weights drawn from the job's seed, so the same hyperparameters train the same network.
    let model = Segmenter::new(&config, seeded_var_builder(&varmap, hp.seed, DType::F32, &device))?;
    tracing::info!(model = %config, device = ?device, "network built");

    let mut optimizer = Optimizer::new(optimizer_config(&hp), weights::trainable_vars(&varmap));
    let checkpoints = ml.checkpoints_dir();
    let hp_json = serde_json::to_value(&hp)?;
    let mut state = match checkpoint::load(&checkpoints)? {
        Some(found) => {
            if found.state.hyperparameters != hp_json {
                bail!(
                    "{} holds a checkpoint made with different hyperparameters; delete it to start a new job or \
                     restore the original hyperparameters",
                    checkpoints.display()
                );
            }
            weights::load_into_varmap(&varmap, &found.weights, "the checkpoint", |n| Some(n.to_string()))?;
            optimizer.load_state(&found.optimizer, found.state.optimizer_steps);
            tracing::info!(
                epochs_done = found.state.epochs_done,
                "resuming from the checkpoint in {}",
                checkpoints.display()
            );
            found.state
        }
        None => {
            initialise_weights(ml, &inputs, &varmap)?;
            CheckpointState {
                epochs_done: 0,
                iterations_done: 0,
                optimizer_steps: 0,
                best_miou: None,
                best_epoch: None,
                epochs_without_improvement: 0,
                history: Vec::new(),
                hyperparameters: hp_json,
                tensors_file: String::new(),
            }
        }
    };

    let train_samples: Arc<[_]> = inputs.train.clone().into();
    let validation_samples: Arc<[_]> = inputs.validation.clone().into();
    let train_lut = Arc::new(inputs.label_maps.train.lut());
    let validation_lut = Arc::new(inputs.label_maps.validation.lut());
    let batch_size = (hp.mini_batch_size as usize).min(train_samples.len());
    if batch_size < hp.mini_batch_size as usize {
        tracing::warn!(
            "mini_batch_size {} is larger than the {} training images; using batches of {batch_size}",
            hp.mini_batch_size,
            train_samples.len()
        );
    }
    let schedule = Schedule {
        kind: hp.lr_scheduler,
        base_lr: hp.learning_rate,
        iterations_per_epoch: hp.num_training_samples.div_ceil(u64::from(hp.mini_batch_size)),
        epochs: hp.epochs,
        steps: hp.lr_scheduler_step.clone(),
        factor: hp.lr_scheduler_factor,
    };
    let mut early_stopping = EarlyStopping::new(
        hp.early_stopping,
        hp.early_stopping_min_epochs,
        hp.early_stopping_patience,
        hp.early_stopping_tolerance,
    );
    early_stopping.restore(state.best_miou, state.epochs_without_improvement);
    let meta = {
        let mut meta = ModelMeta::new(&config);
        meta.crop_size = Some(hp.crop_size);
        meta.hyperparameters = Some(state.hyperparameters.clone());
        meta
    };

    for epoch in state.epochs_done..hp.epochs {
        let epoch_number = epoch + 1;
        let started = Instant::now();
        let train_config = LoaderConfig {
            base_size: hp.base_size,
            crop_size: hp.crop_size,
            ..LoaderConfig::train(batch_size, hp.seed)
        };
        let loader = Loader::spawn(train_samples.clone(), train_lut.clone(), train_config, u64::from(epoch))?;
        let (mut loss_sum, mut batches, mut images) = (0.0f64, 0usize, 0usize);
        let mut learning_rate = schedule.learning_rate(epoch, state.iterations_done);
        for batch in loader {
            if stop.load(Ordering::SeqCst) {
                tracing::warn!("SIGTERM: abandoning epoch {epoch_number}; the checkpoint of the previous epoch stands");
                return Ok(Outcome::Interrupted {
                    epochs: state.epochs_done,
                });
            }
            let batch = batch?;
            let (h, w) = (batch.height as usize, batch.width as usize);
            let x = Tensor::from_vec(batch.images, (batch.n, 3, h, w), &device)?;
            let targets = Targets::new(&batch.labels, batch.n, h, w, &device)?;
            crate::model::layers::seed_dropout(hp.seed, state.iterations_done, &device)?;
            let output = model.forward_t(&x, true)?;
            let mut loss = cross_entropy(&output.out, &targets)?;
            if let Some(aux) = &output.aux {
                loss = (loss + (cross_entropy(aux, &targets)? * AUX_LOSS_WEIGHT)?)?;
            }
            let loss_value = f64::from(loss.to_scalar::<f32>()?);
            if !loss_value.is_finite() {
                bail!(
                    "the training loss became {loss_value} at epoch {epoch_number}; lower learning_rate (now {})",
                    hp.learning_rate
                );
            }
            learning_rate = schedule.learning_rate(epoch, state.iterations_done);
            optimizer.step(&loss.backward()?, learning_rate)?;
            state.iterations_done += 1;
            loss_sum += loss_value;
            batches += 1;
            images += batch.n;
        }
        let train_seconds = started.elapsed().as_secs_f64();
        let train_loss = loss_sum / batches.max(1) as f64;
        let throughput = images as f64 / train_seconds.max(1e-9);

        let scores = validate(&model, &validation_samples, &validation_lut, &hp, &device, stop)?;
        let Some(scores) = scores else {
            tracing::warn!("SIGTERM during validation of epoch {epoch_number}; the previous checkpoint stands");
            return Ok(Outcome::Interrupted {
                epochs: state.epochs_done,
            });
        };
        log_metrics(
            epoch_number,
            train_loss,
            throughput,
            learning_rate,
            &scores,
            started.elapsed().as_secs_f64(),
        );

        let improved = state.best_miou.is_none_or(|best| scores.miou > best);
        if improved {
            state.best_miou = Some(scores.miou);
            state.best_epoch = Some(epoch_number);
            let meta = ModelMeta {
                metrics: Some(TrainingMetrics {
                    epoch: epoch_number,
                    train_loss,
                    validation_miou: scores.miou,
                    validation_pixel_accuracy: scores.pixel_accuracy,
                    class_iou: scores.class_iou.clone(),
                }),
                ..meta.clone()
            };
            artifact::save_varmap(&ml.model_dir(), &meta, &varmap)?;
            write_class_iou(ml, epoch_number, &scores)?;
            tracing::info!(
                epoch = epoch_number,
                miou = scores.miou,
                "best model so far saved to {}",
                ml.model_dir().display()
            );
        }
        let stop_early = early_stopping.should_stop(epoch_number, scores.miou);
        state.epochs_without_improvement = early_stopping.state().1;
        state.epochs_done = epoch_number;
        state.optimizer_steps = optimizer.steps();
        state.history.push(EpochRecord {
            epoch: epoch_number,
            train_loss,
            validation_miou: scores.miou,
            validation_pixel_accuracy: scores.pixel_accuracy,
            images_per_second: throughput,
            learning_rate,
        });
        state.tensors_file = format!("checkpoint-{epoch_number}.safetensors");
        let (optimizer_state, _) = optimizer.state_tensors();
        checkpoint::save(&checkpoints, &state, &varmap_tensors(&varmap), &optimizer_state)?;
        if let Some(mirror) = mirror {
            mirror.sync(&checkpoints)?;
        }
        write_history(ml, &state)?;
        if stop_early {
            tracing::info!(
                epoch = epoch_number,
                "early stopping: validation mIOU stopped improving"
            );
            return Ok(Outcome::EarlyStopped {
                epochs: epoch_number,
                best_miou: state.best_miou.unwrap_or(0.0),
            });
        }
    }
    Ok(Outcome::Completed {
        epochs: state.epochs_done,
        best_miou: state.best_miou.unwrap_or(0.0),
    })
}

/// Score the network on the whole validation channel; `None` when SIGTERM arrived meanwhile.
pub fn validate(
    model: &Segmenter,
    samples: &Arc<[crate::data::dataset::SamplePair]>,
    lut: &Arc<crate::data::label_map::LabelLut>,
    hp: &Hyperparameters,
    device: &Device,
    stop: &AtomicBool,
) -> Result<Option<Scores>> {
    let config = LoaderConfig::validation(hp.validation_mini_batch_size as usize, hp.crop_size);
    let loader = Loader::spawn(samples.clone(), lut.clone(), config, 0)?;
    let mut confusion = ConfusionMatrix::new(hp.num_classes as usize);
    for batch in loader {
        if stop.load(Ordering::SeqCst) {
            return Ok(None);
        }
        let batch = batch?;
        let (h, w) = (batch.height as usize, batch.width as usize);
        let x = Tensor::from_vec(batch.images, (batch.n, 3, h, w), device)?;
        let prediction = model.forward_t(&x, false)?.out.argmax(1)?.to_dtype(DType::U8)?; // [N, H, W]
        confusion.update(&batch.labels, &prediction.flatten_all()?.to_vec1::<u8>()?);
    }
    Ok(Some(confusion.scores()))
}

/// The metric lines, one per epoch, in the format the README's MetricDefinitions match.
fn log_metrics(epoch: u32, loss: f64, throughput: f64, lr: f64, scores: &Scores, seconds: f64) {
    tracing::info!(
        "#metrics epoch={epoch} train:loss={loss:.6} train:throughput={throughput:.3} images/s learning_rate={lr:.6e} \
         epoch_seconds={seconds:.1}"
    );
    tracing::info!(
        "#metrics epoch={epoch} validation:mIOU={:.6} validation:pixel_accuracy={:.6}",
        scores.miou,
        scores.pixel_accuracy
    );
}

fn optimizer_config(hp: &Hyperparameters) -> OptimizerConfig {
    OptimizerConfig {
        kind: hp.optimizer,
        momentum: hp.momentum,
        weight_decay: hp.weight_decay,
        gamma1: hp.gamma1,
        gamma2: hp.gamma2,
    }
}

/// CUDA when built with it and a GPU is present, else the CPU. Chosen once and logged.
pub fn select_device() -> Result<Device> {
    #[cfg(feature = "cuda")]
    {
        match Device::new_cuda(0) {
            Ok(device) => {
                tracing::info!("training on CUDA device 0");
                return Ok(device);
            }
            Err(e) => tracing::warn!("no usable GPU ({e}); training on the CPU"),
        }
    }
    tracing::info!(threads = candle_core::utils::get_num_threads(), "training on the CPU");
    Ok(Device::Cpu)
}

/// Start weights: an earlier model from the `model` channel (incremental training), or ImageNet backbone weights
/// (use_pretrained_model), or torchvision's random initialisation.
fn initialise_weights(ml: &MlRoot, inputs: &TrainingInputs, varmap: &VarMap) -> Result<()> {
    let hp = &inputs.hyperparameters;
    if let Some(channel) = inputs.channels.get(ChannelName::Model) {
        return super::incremental::load(&channel.path, hp, varmap, &ml.root().join("tmp/model-channel"));
    }
    if !hp.use_pretrained_model {
        tracing::info!("use_pretrained_model=False: training from randomly initialised weights");
        return Ok(());
    }
    // torchvision's checkpoint as downloaded (scripts/fetch-pretrained.sh), or the same tensors as safetensors.
    let file_names = [format!("{}.safetensors", hp.backbone), format!("{}.pth", hp.backbone)];
    let channel_dir = inputs.channels.get(ChannelName::Pretrained).map(|c| c.path.clone());
    let baked_dir =
        std::env::var_os("SEMSEG_PRETRAINED_DIR").map_or_else(|| PathBuf::from(DEFAULT_PRETRAINED_DIR), PathBuf::from);
    let candidates: Vec<PathBuf> = channel_dir
        .iter()
        .chain([&baked_dir])
        .flat_map(|dir| file_names.iter().map(move |name| dir.join(name)))
        .collect();
    let Some(path) = candidates.iter().find(|p| p.is_file()) else {
        bail!(
            "use_pretrained_model=True needs ImageNet weights for {} but none were found (looked for {}); add a \
             'pretrained' channel holding {} (torchvision's ResNet checkpoint, as scripts/fetch-pretrained.sh \
             downloads it), use a training image built with them, or set use_pretrained_model=False",
            hp.backbone,
            candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            file_names[1],
        );
    };
    let tensors = artifact::read_state_dict(path)?;
    let loaded = weights::load_backbone_into_varmap(varmap, &tensors, hp.backbone)
        .with_context(|| format!("loading ImageNet weights from {}", path.display()))?;
    tracing::info!(
        tensors = loaded,
        "ImageNet backbone weights loaded from {}",
        path.display()
    );
    Ok(())
}

fn varmap_tensors(varmap: &VarMap) -> HashMap<String, Tensor> {
    let data = match varmap.data().lock() {
        Ok(data) => data,
        Err(poisoned) => poisoned.into_inner(),
    };
    data.iter()
        .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
        .collect()
}

/// `output/data/class_iou.json`: per-class IoU of the best epoch, for people.
fn write_class_iou(ml: &MlRoot, epoch: u32, scores: &Scores) -> Result<()> {
    let dir = ml.output_data_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let report = serde_json::json!({
        "epoch": epoch,
        "mIOU": scores.miou,
        "pixel_accuracy": scores.pixel_accuracy,
        "class_iou": scores.class_iou,
    });
    write_json(&dir.join("class_iou.json"), &report)
}

/// `output/data/history.json` (every epoch's figures) and `training.png` (the same as curves).
fn write_history(ml: &MlRoot, state: &CheckpointState) -> Result<()> {
    let dir = ml.output_data_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    write_json(
        &dir.join("history.json"),
        &serde_json::json!({ "epochs": state.history }),
    )?;
    let plot = dir.join("training.png");
    super::report::plot(&state.history)
        .save(&plot)
        .with_context(|| format!("cannot write {}", plot.display()))
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    std::fs::write(path, serde_json::to_vec_pretty(value)?).with_context(|| format!("cannot write {}", path.display()))
}

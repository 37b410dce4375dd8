//! `semseg train`: the whole training job. Prepare and validate the inputs, build the network and start (or resume
//! from a checkpoint), then per epoch: train on augmented crops, validate on the validation channel, log the metric
//! lines SageMaker scrapes, keep the best model in `model/`, checkpoint to `checkpoints/`, stop early or on SIGTERM.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;

use super::batch_upload::Upload;
use super::checkpoint::{self, CheckpointState, EpochRecord};
use super::early_stopping::EarlyStopping;
use super::inputs::TrainingInputs;
use super::loss::{training_loss, EpochLoss, TargetUploads, Targets};
use super::memory_check;
use super::metrics::Scores;
use super::optim::{Optimizer, OptimizerConfig};
use super::schedule::Schedule;
use super::{incremental, pretrained, report, validation};
use crate::compute::{Compute, DeviceChoice, Workload};
use crate::data::epoch_source::EpochSource;
use crate::data::loader::LoaderConfig;
use crate::gpu_utilisation;
use crate::model::artifact::{self, ModelMeta, TrainingMetrics};
use crate::model::config::ModelConfig;
use crate::model::seeded_init::seeded_var_builder;
use crate::model::{weights, SegmentationModel};
use crate::sagemaker::{ChannelName, Hyperparameters, MlRoot};
use crate::storage::manifest_refs::S3ManifestRefs;
use crate::storage::CheckpointMirror;

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
pub fn run(ml: &MlRoot, stop: &AtomicBool, device: DeviceChoice) -> Result<Outcome> {
    run_mirrored(ml, stop, device, None)
}

/// [`run`], copying `checkpoints/` to S3 through `mirror` after every checkpoint save (`train --checkpoints`).
pub fn run_mirrored(
    ml: &MlRoot,
    stop: &AtomicBool,
    device: DeviceChoice,
    mirror: Option<&CheckpointMirror>,
) -> Result<Outcome> {
    // s3:// references in File-mode manifests are downloaded here, before the inputs are checked.
    let inputs = TrainingInputs::prepare_with(ml, &S3ManifestRefs::for_job(ml))?;
    let compute = Compute::open(device, inputs.hyperparameters.precision, Workload::Training)?;
    let hp = &inputs.hyperparameters;
    memory_check::check(&model_config(hp)?, hp, batch_size(&inputs), &compute)?;
    let mut job = TrainingJob::start_or_resume(ml, &inputs, &compute, mirror)?;
    for epoch in job.state.epochs_done..job.hp.epochs {
        let epoch_number = epoch + 1;
        let started = Instant::now();
        crate::compute::gpu_tensor_memory_high(&job.device); // starts this epoch's period
        let Some(trained) = job.train_one_epoch(epoch, stop)? else {
            tracing::warn!("SIGTERM: abandoning epoch {epoch_number}; the checkpoint of the previous epoch stands");
            return Ok(job.interrupted());
        };
        let Some(scores) = job.validate(epoch, stop)? else {
            tracing::warn!("SIGTERM during validation of epoch {epoch_number}; the previous checkpoint stands");
            return Ok(job.interrupted());
        };
        let record = EpochRecord {
            epoch: epoch_number,
            train_loss: trained.loss,
            validation_miou: scores.miou,
            validation_pixel_accuracy: scores.pixel_accuracy,
            images_per_second: trained.images_per_second,
            learning_rate: trained.learning_rate,
        };
        report::log_metrics(&record, started.elapsed().as_secs_f64());
        if let Some(bytes) = trained.gpu_memory_max {
            tracing::info!(
                epoch = epoch_number,
                gpu_memory_max_gib = memory_check::gib_two_places(bytes),
                tensors_max_gib = trained
                    .gpu_tensor_memory_max
                    .map(memory_check::gib_two_places)
                    .unwrap_or_default(),
                gpu_utilisation_percent = trained
                    .gpu_utilisation
                    .map(|u| format!("{:.0}", u.mean_percent))
                    .unwrap_or_default(),
                "GPU: memory in use at its highest sample this epoch (after a forward or a backward; pooled memory \
                 and the CUDA context included), the most this epoch's training tensors held at once, and the mean \
                 share of the epoch's training time in which a kernel ran (NVML, as nvidia-smi)"
            );
        }
        if job.end_epoch(record, &scores)? == Continue::StopEarly {
            tracing::info!(
                epoch = epoch_number,
                "early stopping: validation mIOU stopped improving"
            );
            return Ok(Outcome::EarlyStopped {
                epochs: epoch_number,
                best_miou: job.best_miou(),
            });
        }
    }
    Ok(Outcome::Completed {
        epochs: job.state.epochs_done,
        best_miou: job.best_miou(),
    })
}

/// `semseg check`: the job's inputs checked as `train` checks them, then the memory a training step will need
/// logged, so an instance can be chosen before the job runs (check opens no device: nothing is compared).
pub fn check(ml: &MlRoot) -> Result<()> {
    let inputs = TrainingInputs::prepare_with(ml, &S3ManifestRefs::for_job(ml))?;
    let hp = &inputs.hyperparameters;
    memory_check::report(&model_config(hp)?, hp, batch_size(&inputs))
}

/// Where a training step's time goes, with `SEMSEG_PROFILE_STEPS=1`: waiting for the batch, upload + forward +
/// loss, backward, optimiser update. Each phase ends with a device synchronisation, so on a GPU the figures are
/// the device's time and the steps run slightly slower; off by default (no synchronisation added).
struct StepPhases {
    enabled: bool,
    mark: Instant,
    totals: [std::time::Duration; 4],
}

impl StepPhases {
    const NAMES: [&'static str; 4] = ["batch wait", "forward+loss", "backward", "update"];

    fn from_env() -> Self {
        let enabled = std::env::var("SEMSEG_PROFILE_STEPS").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false"));
        Self {
            enabled,
            mark: Instant::now(),
            totals: Default::default(),
        }
    }

    fn start(&mut self) {
        self.mark = Instant::now();
    }

    /// Ends phase `i` (after the device has finished its work) and starts the next.
    fn end(&mut self, i: usize, device: &Device) -> Result<()> {
        if self.enabled {
            device.synchronize()?;
            let now = Instant::now();
            self.totals[i] += now - self.mark;
            self.mark = now;
        }
        Ok(())
    }

    fn log(&self, epoch: u32, steps: usize) {
        if !self.enabled || steps == 0 {
            return;
        }
        let per_step: Vec<String> = Self::NAMES
            .iter()
            .zip(&self.totals)
            .map(|(name, total)| format!("{name} {:.1}", total.as_secs_f64() * 1e3 / steps as f64))
            .collect();
        tracing::info!(epoch, steps, "step phases, ms per step: {}", per_step.join(", "));
    }
}

/// One epoch's training figures.
struct EpochTraining {
    /// Mean loss over the epoch's batches.
    loss: f64,
    images_per_second: f64,
    /// The most GPU memory in use at any sample of the epoch (None on the CPU).
    gpu_memory_max: Option<u64>,
    /// The most bytes the epoch's tensors held at once (the allocator's high-water mark; None on the CPU).
    gpu_tensor_memory_max: Option<u64>,
    /// How busy the GPU was while the epoch trained (None on the CPU or without NVML).
    gpu_utilisation: Option<gpu_utilisation::Utilisation>,
    /// The rate of the epoch's last step.
    learning_rate: f64,
}

/// Whether training goes on after an epoch.
#[derive(Debug, PartialEq, Eq)]
enum Continue {
    Yes,
    StopEarly,
}

/// A training job between epochs: the network, the optimizer and the loop state that checkpoints carry.
struct TrainingJob<'a> {
    ml: &'a MlRoot,
    hp: &'a Hyperparameters,
    device: Device,
    model: SegmentationModel,
    varmap: VarMap,
    optimizer: Optimizer,
    schedule: Schedule,
    early_stopping: EarlyStopping,
    state: CheckpointState,
    /// What `model/model.json` records besides the metrics of the saved epoch.
    meta: ModelMeta,
    train: &'a EpochSource,
    validation: &'a EpochSource,
    batch_size: usize,
    /// Where each checkpoint is copied after it is saved, when the job mirrors them to S3.
    mirror: Option<&'a CheckpointMirror>,
    /// The log has said why the GPU's utilisation cannot be sampled.
    utilisation_unavailable_said: bool,
    /// How each step's batch reaches the device, kept from step to step (on a GPU: pinned staging buffers).
    uploads: BatchUploads,
}

/// A step's uploads: the images and the loss's targets.
struct BatchUploads {
    images: Upload<f32>,
    targets: TargetUploads,
}

impl<'a> TrainingJob<'a> {
    /// Build the network and the optimizer, then resume from `checkpoints/` when it holds a checkpoint of this job,
    /// or start from the initial weights ([`initialise_weights`]).
    fn start_or_resume(
        ml: &'a MlRoot,
        inputs: &'a TrainingInputs,
        compute: &Compute,
        mirror: Option<&'a CheckpointMirror>,
    ) -> Result<Self> {
        let hp = &inputs.hyperparameters;
        let device = compute.device.clone();
        let config = model_config(hp)?;
        let varmap = VarMap::new();
        // Weights drawn from the job's seed, so the same hyperparameters train the same network.
        // f32 master weights in every precision; the activations take the compute dtype.
        let model = SegmentationModel::new(&config, seeded_var_builder(&varmap, hp.seed, DType::F32, &device))?
            .with_compute_dtype(compute.mode.compute_dtype);
        tracing::info!(model = %config, device = ?device, "network built");
        let mut optimizer = Optimizer::new(optimizer_config(hp), weights::trainable_vars(&varmap));

        let hp_json = serde_json::to_value(hp)?;
        let checkpoints = ml.checkpoints_dir();
        let state = match checkpoint::load(&checkpoints)? {
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
                initialise_weights(ml, inputs, &varmap)?;
                CheckpointState::fresh(hp_json)
            }
        };

        let mut early_stopping = EarlyStopping::new(
            hp.early_stopping,
            hp.early_stopping_min_epochs,
            hp.early_stopping_patience,
            hp.early_stopping_tolerance,
        );
        early_stopping.restore(state.best_miou, state.epochs_without_improvement);
        let schedule = Schedule::for_job(hp);
        let mut meta = ModelMeta::new(&config);
        meta.crop_size = Some(hp.crop_size);
        meta.hyperparameters = Some(state.hyperparameters.clone());

        let batch_size = batch_size(inputs);
        if batch_size < hp.mini_batch_size as usize {
            tracing::warn!(
                "mini_batch_size {} is larger than the {} training images; using batches of {batch_size}",
                hp.mini_batch_size,
                inputs.train_examples()
            );
        }
        Ok(Self {
            ml,
            hp,
            device,
            model,
            varmap,
            optimizer,
            schedule,
            early_stopping,
            state,
            meta,
            train: &inputs.train,
            validation: &inputs.validation,
            batch_size,
            mirror,
            utilisation_unavailable_said: false,
            uploads: BatchUploads {
                images: Upload::new("images"),
                targets: TargetUploads::default(),
            },
        })
    }

    /// Train on one epoch of augmented crops (`epoch` counted from 0); `None` when SIGTERM arrived meanwhile.
    fn train_one_epoch(&mut self, epoch: u32, stop: &AtomicBool) -> Result<Option<EpochTraining>> {
        let hp = self.hp;
        let started = Instant::now();
        let loader_config = LoaderConfig {
            base_size: hp.base_size,
            crop_size: hp.crop_size,
            ..LoaderConfig::train(self.batch_size, hp.seed)
        };
        let loader = self.train.batches(u64::from(epoch), loader_config)?;
        let mut epoch_loss = EpochLoss::new(&self.device);
        let (mut batches, mut images) = (0usize, 0usize);
        let mut learning_rate = self.schedule.learning_rate(epoch, self.state.iterations_done);
        // GPU memory in use, sampled after each forward (activations held) and backward (gradients held).
        let mut gpu_memory_max: Option<u64> = None;
        let mut sample_gpu_memory = |device: &Device| {
            if let Some(used) = crate::compute::gpu_memory_used(device) {
                gpu_memory_max = Some(gpu_memory_max.map_or(used, |m| m.max(used)));
            }
        };
        let mut phases = StepPhases::from_env();
        let utilisation = self.start_utilisation_sampler();
        let mut loader = loader.into_iter();
        loop {
            phases.start();
            let Some(batch) = loader.next() else { break };
            if stop.load(Ordering::SeqCst) {
                return Ok(None);
            }
            let batch = batch?;
            phases.end(0, &self.device)?;
            let (h, w) = (batch.height as usize, batch.width as usize);
            let x = self
                .uploads
                .images
                .tensor(batch.images, (batch.n, 3, h, w), &self.device)?; // [N, 3, H, W]
            let targets = Targets::upload(&batch.labels, (batch.n, h, w), &self.device, &mut self.uploads.targets)?;
            crate::model::layers::seed_dropout(hp.seed, self.state.iterations_done);
            let loss = training_loss(&self.model.forward_t(&x, true)?, &targets)?;
            phases.end(1, &self.device)?;
            sample_gpu_memory(&self.device);
            learning_rate = self.schedule.learning_rate(epoch, self.state.iterations_done);
            let grads = loss.backward()?;
            phases.end(2, &self.device)?;
            sample_gpu_memory(&self.device);
            self.optimizer.step(&grads, learning_rate)?;
            // The loss is read back after the update is queued, and on a GPU only every few steps (EpochLoss):
            // each read waits for the device. A non-finite loss has already spoilt the updates since, but the job
            // stops at once and keeps nothing of them (the model and checkpoints are written at an epoch's end).
            let non_finite = epoch_loss.push(&loss)?;
            phases.end(3, &self.device)?;
            Self::fail_on_non_finite(non_finite, epoch, hp)?;
            self.state.iterations_done += 1;
            batches += 1;
            images += batch.n;
        }
        Self::fail_on_non_finite(epoch_loss.read()?, epoch, hp)?;
        phases.log(epoch + 1, batches);
        Ok(Some(EpochTraining {
            loss: epoch_loss.mean(),
            images_per_second: images as f64 / started.elapsed().as_secs_f64().max(1e-9),
            learning_rate,
            gpu_memory_max,
            gpu_tensor_memory_max: crate::compute::gpu_tensor_memory_high(&self.device),
            gpu_utilisation: utilisation.and_then(gpu_utilisation::Sampler::finish),
        }))
    }

    /// Stops the job on a non-finite training loss that [`EpochLoss`] read back.
    fn fail_on_non_finite(loss: Option<f32>, epoch: u32, hp: &Hyperparameters) -> Result<()> {
        match loss {
            Some(value) => bail!(
                "the training loss became {value} at epoch {}; lower learning_rate (now {})",
                epoch + 1,
                hp.learning_rate
            ),
            None => Ok(()),
        }
    }

    /// On a GPU, starts sampling its utilisation for the epoch; where NVML cannot be read, says why (once a job).
    fn start_utilisation_sampler(&mut self) -> Option<gpu_utilisation::Sampler> {
        if self.device.is_cpu() {
            return None;
        }
        match gpu_utilisation::Sampler::start(&self.device) {
            Ok(sampler) => Some(sampler),
            Err(reason) => {
                if !std::mem::replace(&mut self.utilisation_unavailable_said, true) {
                    tracing::info!("the GPU's utilisation is not logged: {reason}");
                }
                None
            }
        }
    }

    /// Score the network on the validation channel after `epoch` (from 0); `None` when SIGTERM arrived meanwhile.
    fn validate(&self, epoch: u32, stop: &AtomicBool) -> Result<Option<Scores>> {
        validation::validate(&self.model, self.validation, epoch, self.hp, &self.device, stop)
    }

    /// After a validated epoch: save the model when it is the best so far, checkpoint, write the history, and decide
    /// on early stopping.
    fn end_epoch(&mut self, record: EpochRecord, scores: &Scores) -> Result<Continue> {
        let epoch = record.epoch;
        if self.state.best_miou.is_none_or(|best| scores.miou > best) {
            self.state.best_miou = Some(scores.miou);
            self.state.best_epoch = Some(epoch);
            self.save_best_model(&record, scores)?;
        }
        let stop_early = self.early_stopping.should_stop(epoch, scores.miou);
        self.state.epochs_without_improvement = self.early_stopping.epochs_without_improvement();
        self.state.epochs_done = epoch;
        self.state.optimizer_steps = self.optimizer.steps();
        self.state.history.push(record);
        self.save_checkpoint()?;
        report::write_history(self.ml, &self.state.history)?;
        Ok(if stop_early { Continue::StopEarly } else { Continue::Yes })
    }

    /// `model/`: the artifact with this epoch's metrics, plus `output/data/class_iou.json`.
    fn save_best_model(&self, record: &EpochRecord, scores: &Scores) -> Result<()> {
        let meta = ModelMeta {
            metrics: Some(TrainingMetrics {
                epoch: record.epoch,
                train_loss: record.train_loss,
                validation_miou: scores.miou,
                validation_pixel_accuracy: scores.pixel_accuracy,
                class_iou: scores.class_iou.clone(),
            }),
            ..self.meta.clone()
        };
        artifact::save_varmap(&self.ml.model_dir(), &meta, &self.varmap)?;
        report::write_class_iou(self.ml, record.epoch, scores)?;
        tracing::info!(
            epoch = record.epoch,
            miou = scores.miou,
            "best model so far saved to {}",
            self.ml.model_dir().display()
        );
        Ok(())
    }

    /// `checkpoints/`: weights, optimizer state and the loop state after the epoch just ended; then its copy on S3
    /// when the job mirrors checkpoints.
    fn save_checkpoint(&mut self) -> Result<()> {
        self.state.tensors_file = format!("checkpoint-{}.safetensors", self.state.epochs_done);
        let (optimizer_state, _) = self.optimizer.state_tensors();
        let dir = self.ml.checkpoints_dir();
        checkpoint::save(&dir, &self.state, &varmap_tensors(&self.varmap), &optimizer_state)?;
        if let Some(mirror) = self.mirror {
            mirror.sync(&dir)?;
        }
        Ok(())
    }

    fn interrupted(&self) -> Outcome {
        Outcome::Interrupted {
            epochs: self.state.epochs_done,
        }
    }

    fn best_miou(&self) -> f64 {
        self.state.best_miou.unwrap_or(0.0)
    }
}

/// The network a job trains: its hyperparameters' choice, with the auxiliary head (for the auxiliary loss).
fn model_config(hp: &Hyperparameters) -> Result<ModelConfig> {
    Ok(ModelConfig::new(
        hp.algorithm,
        hp.backbone,
        hp.num_classes as usize,
        hp.output_stride,
        true,
    )?)
}

/// Images per training step: `mini_batch_size`, or every training image when there are fewer.
fn batch_size(inputs: &TrainingInputs) -> usize {
    (inputs.hyperparameters.mini_batch_size as usize).min(inputs.train_examples())
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

/// Start weights: an earlier model from the `model` channel (incremental training), or ImageNet backbone weights
/// (use_pretrained_model), or the seeded random initialisation the network was built with.
fn initialise_weights(ml: &MlRoot, inputs: &TrainingInputs, varmap: &VarMap) -> Result<()> {
    let hp = &inputs.hyperparameters;
    if let Some(channel) = inputs.channels.get(ChannelName::Model) {
        return incremental::load(&channel.path, hp, varmap, &ml.root().join("tmp/model-channel"));
    }
    if !hp.use_pretrained_model {
        tracing::info!("use_pretrained_model=False: training from randomly initialised weights");
        return Ok(());
    }
    let channel_dir = inputs.channels.get(ChannelName::Pretrained).map(|c| c.path.as_path());
    let path = pretrained::find(hp.backbone, channel_dir)?;
    pretrained::load(&path, hp.backbone, varmap)
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

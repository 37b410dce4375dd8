//! Everything a training job reads, resolved and validated before the first step: resource config, hyperparameters,
//! channels and their modes, label maps, and every image/annotation pair.
//!
//! A job that would fail at epoch 7 because one annotation holds label 40 of 21 classes fails here instead, in
//! seconds, with the offending files named.

use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::data::annotation::read_annotation;
use crate::data::dataset::{name_some, pair_channel, SamplePair};
use crate::data::image_io::read_image_dimensions;
use crate::data::label_map::{LabelLut, LabelMaps};
use crate::data::IGNORE_LABEL;
use crate::sagemaker::channels::Channels;
use crate::sagemaker::{ChannelName, Hyperparameters, InputDataConfig, InputMode, MlRoot, ResourceConfig};

/// A validated training job.
#[derive(Debug, Clone)]
pub struct TrainingInputs {
    pub hyperparameters: Hyperparameters,
    pub channels: Channels,
    pub label_maps: LabelMaps,
    pub train: Vec<SamplePair>,
    pub validation: Vec<SamplePair>,
}

impl TrainingInputs {
    pub fn prepare(ml: &MlRoot) -> Result<Self> {
        ResourceConfig::load(&ml.resource_config_file())?.require_single_host()?;
        let hyperparameters = load_hyperparameters(ml)?;
        let config = InputDataConfig::load(&ml.input_data_config_file())?;
        let channels = Channels::resolve(ml, &config)?;
        if !channels.unknown.is_empty() {
            tracing::warn!(channels = ?channels.unknown, "ignoring channels this algorithm does not read");
        }
        for channel in channels.iter() {
            tracing::info!(channel = %channel.name, mode = %channel.mode, path = %channel.path.display(), "channel");
        }

        let train_channel = channels.require(ChannelName::Train)?;
        if train_channel.mode == InputMode::Pipe {
            bail!(
                "channel 'train' uses Pipe mode (augmented manifests), which this build does not read yet; use File \
                 or FastFile mode with the train, validation, train_annotation and validation_annotation channels"
            );
        }
        let validation_channel = channels.require(ChannelName::Validation)?;
        let train_annotation = channels.require(ChannelName::TrainAnnotation)?;
        let validation_annotation = channels.require(ChannelName::ValidationAnnotation)?;

        let label_maps = LabelMaps::load(channels.get(ChannelName::LabelMap).map(|c| c.path.as_path()))
            .context("the label_map channel is invalid")?;

        let num_classes = hyperparameters.num_classes;
        let mut problems = Vec::new();
        let mut splits = Vec::new();
        for (images, annotations, lut) in [
            (train_channel, train_annotation, label_maps.train.lut()),
            (validation_channel, validation_annotation, label_maps.validation.lut()),
        ] {
            let (pairs, report) = pair_channel(
                images.name.as_str(),
                &images.path,
                annotations.name.as_str(),
                &annotations.path,
            )?;
            if !report.ignored_files.is_empty() {
                tracing::warn!(
                    "ignoring {} files that are not images or annotations in channels '{}'/'{}': {}",
                    report.ignored_files.len(),
                    images.name,
                    annotations.name,
                    name_some(&report.ignored_files)
                );
            }
            problems.extend(check_contents(annotations.name.as_str(), &pairs, &lut, num_classes));
            splits.push(pairs);
        }
        if !problems.is_empty() {
            bail!("{}", problems.join("; "));
        }
        let validation = splits.pop().unwrap_or_default();
        let train = splits.pop().unwrap_or_default();

        if hyperparameters.num_training_samples != train.len() as u64 {
            tracing::warn!(
                "num_training_samples is {} but the train channel has {} images; the learning-rate schedule follows \
                 num_training_samples",
                hyperparameters.num_training_samples,
                train.len()
            );
        }
        tracing::info!(
            train = train.len(),
            validation = validation.len(),
            num_classes,
            "training inputs are valid"
        );
        Ok(Self {
            hyperparameters,
            channels,
            label_maps,
            train,
            validation,
        })
    }
}

fn load_hyperparameters(ml: &MlRoot) -> Result<Hyperparameters> {
    let path = ml.hyperparameters_file();
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "{} does not exist; the job needs at least the hyperparameters num_classes and num_training_samples",
            path.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let (hyperparameters, notes) = Hyperparameters::from_json(&text)?;
    for name in &notes.ignored_reserved {
        tracing::info!("ignoring platform hyperparameter '{name}'");
    }
    tracing::info!(?hyperparameters, "hyperparameters");
    Ok(hyperparameters)
}

/// What one pair's check found.
enum Finding {
    Fine,
    Unreadable(String),
    SizeMismatch(String),
    Unmapped(String),
    OutOfRange { file: String, labels: Vec<u8> },
}

/// Decode every annotation (and read every image's header), apply the label map and check sizes and label values.
/// Returns one message per kind of problem, naming the first few files and the count.
fn check_contents(annotation_channel: &str, pairs: &[SamplePair], lut: &LabelLut, num_classes: u32) -> Vec<String> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
    let chunk = pairs.len().div_ceil(workers).max(1);
    let findings: Vec<Finding> = std::thread::scope(|scope| {
        let handles: Vec<_> = pairs
            .chunks(chunk)
            .map(|part| scope.spawn(move || part.iter().map(|p| check_pair(p, lut, num_classes)).collect::<Vec<_>>()))
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect()
    });

    let (mut unreadable, mut sizes, mut unmapped, mut out_of_range) = (vec![], vec![], vec![], vec![]);
    let mut bad_labels = [false; 256];
    for finding in findings {
        match finding {
            Finding::Fine => {}
            Finding::Unreadable(m) => unreadable.push(m),
            Finding::SizeMismatch(m) => sizes.push(m),
            Finding::Unmapped(m) => unmapped.push(m),
            Finding::OutOfRange { file, labels } => {
                labels.iter().for_each(|&l| bad_labels[usize::from(l)] = true);
                out_of_range.push(file);
            }
        }
    }
    let mut problems = Vec::new();
    if !unreadable.is_empty() {
        problems.push(format!(
            "{} files cannot be read: {}",
            unreadable.len(),
            name_some(&unreadable)
        ));
    }
    if !sizes.is_empty() {
        problems.push(format!(
            "{} image/annotation pairs differ in size (an annotation must have its image's width and height): {}",
            sizes.len(),
            name_some(&sizes)
        ));
    }
    if !unmapped.is_empty() {
        problems.push(format!(
            "{} annotations in '{annotation_channel}' hold pixel values the label map does not map: {}; add them to \
             the label map or fix the annotations",
            unmapped.len(),
            name_some(&unmapped)
        ));
    }
    if !out_of_range.is_empty() {
        let labels: Vec<String> = (0..=255u8)
            .filter(|&l| bad_labels[usize::from(l)])
            .map(|l| l.to_string())
            .collect();
        problems.push(format!(
            "{} annotations in '{annotation_channel}' hold labels >= num_classes ({num_classes}) that are not 255 \
             (ignore): labels {} in {}; raise num_classes, fix the annotations or add a label_map channel",
            out_of_range.len(),
            labels.join(", "),
            name_some(&out_of_range)
        ));
    }
    problems
}

fn check_pair(pair: &SamplePair, lut: &LabelLut, num_classes: u32) -> Finding {
    let image_size = match read_image_dimensions(&pair.image) {
        Ok(size) => size,
        Err(e) => return Finding::Unreadable(e.to_string()),
    };
    let mut labels = match read_annotation(&pair.annotation) {
        Ok(labels) => labels,
        Err(e) => return Finding::Unreadable(e.to_string()),
    };
    let annotation_name = file_name(&pair.annotation);
    if labels.dimensions() != image_size {
        return Finding::SizeMismatch(format!(
            "{} is {}x{} but {annotation_name} is {}x{}",
            file_name(&pair.image),
            image_size.0,
            image_size.1,
            labels.width(),
            labels.height()
        ));
    }
    if let Err(unmapped) = lut.apply(&mut labels) {
        return Finding::Unmapped(format!("{annotation_name} ({unmapped})"));
    }
    let mut present = [false; 256];
    labels.as_raw().iter().for_each(|&l| present[usize::from(l)] = true);
    let bad: Vec<u8> = (0..=255u8)
        .filter(|&l| present[usize::from(l)] && l != IGNORE_LABEL && u32::from(l) >= num_classes)
        .collect();
    if bad.is_empty() {
        Finding::Fine
    } else {
        Finding::OutOfRange {
            file: annotation_name,
            labels: bad,
        }
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned())
}

//! Incremental training: the `model` channel holds an earlier run's `model.tar.gz` (or its extracted files), whose
//! weights seed the new job. Backbone, algorithm, crop_size and num_classes must match the new hyperparameters.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_nn::VarMap;

use crate::model::weights;
use crate::model::{artifact, package};
use crate::sagemaker::Hyperparameters;

/// Load the earlier model in `channel_dir` into `varmap`; a `model.tar.gz` is extracted into `scratch` first.
pub fn load(channel_dir: &Path, hp: &Hyperparameters, varmap: &VarMap, scratch: &Path) -> Result<()> {
    let dir = package::unpack_to_scratch(channel_dir, scratch)?;
    let (meta, tensors) = artifact::read(&dir).context("the model channel does not hold a semseg model")?;
    let mut differences = Vec::new();
    if meta.backbone != hp.backbone {
        differences.push(format!(
            "backbone: the model has {}, the job has {}",
            meta.backbone, hp.backbone
        ));
    }
    if meta.algorithm != hp.algorithm {
        differences.push(format!(
            "algorithm: the model has {}, the job has {}",
            meta.algorithm, hp.algorithm
        ));
    }
    if meta.num_classes != hp.num_classes as usize {
        differences.push(format!(
            "num_classes: the model has {}, the job has {}",
            meta.num_classes, hp.num_classes
        ));
    }
    if let Some(crop) = meta.crop_size.filter(|&c| c != hp.crop_size) {
        differences.push(format!("crop_size: the model has {crop}, the job has {}", hp.crop_size));
    }
    if meta.output_stride != hp.output_stride {
        differences.push(format!(
            "output_stride: the model has {}, the job has {}",
            meta.output_stride, hp.output_stride
        ));
    }
    if !differences.is_empty() {
        bail!(
            "the model channel's model does not match this job's hyperparameters ({}); use the same values as the \
             earlier job or remove the model channel",
            differences.join("; ")
        );
    }
    // An earlier model saved without the auxiliary head still seeds everything else; the aux head starts fresh.
    let has_aux = tensors.keys().any(|k| k.starts_with("aux_classifier."));
    let loaded = weights::load_into_varmap(varmap, &tensors, "the model channel's model", |name| {
        (has_aux || !name.starts_with("aux_classifier.")).then(|| name.to_string())
    })?;
    tracing::info!(
        tensors = loaded,
        "incremental training: weights loaded from {}",
        dir.display()
    );
    Ok(())
}

//! Checkpoints in `checkpoints/`: weights, BatchNorm statistics and optimizer state after every epoch, plus the loop
//! state (epoch, iteration, best score, early-stopping counters). SageMaker syncs the directory with S3 and restores it
//! when a (spot) job restarts; a job that finds one resumes from it.
//!
//! Written atomically: the tensors go to a new file named after the epoch, then `checkpoint.json` (which names that
//! file) is written under a temporary name and renamed over the old one. A job killed at any moment leaves either the
//! old or the new checkpoint whole; the previous tensor file is deleted only after the new JSON is in place.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

pub const STATE_FILE: &str = "checkpoint.json";
/// Prefix of optimizer-state tensors inside the checkpoint's safetensors file.
const OPTIMIZER_PREFIX: &str = "optimizer.";

/// The loop state saved beside the tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Epochs completed (the job resumes with epoch index `epochs_done`).
    pub epochs_done: u32,
    /// Training iterations completed over the whole job (drives the LR schedule).
    pub iterations_done: u64,
    pub optimizer_steps: u64,
    pub best_miou: Option<f64>,
    pub best_epoch: Option<u32>,
    pub epochs_without_improvement: u32,
    /// Per-epoch history for the report.
    pub history: Vec<EpochRecord>,
    /// The hyperparameters the checkpoint was made with; a resumed job must use the same ones.
    pub hyperparameters: serde_json::Value,
    /// The safetensors file (in the same directory) holding weights and optimizer state.
    pub tensors_file: String,
}

impl CheckpointState {
    /// The state of a job that has not trained yet.
    pub fn fresh(hyperparameters: serde_json::Value) -> Self {
        Self {
            epochs_done: 0,
            iterations_done: 0,
            optimizer_steps: 0,
            best_miou: None,
            best_epoch: None,
            epochs_without_improvement: 0,
            history: Vec::new(),
            hyperparameters,
            tensors_file: String::new(),
        }
    }
}

/// One epoch's figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: u32,
    pub train_loss: f64,
    pub validation_miou: f64,
    pub validation_pixel_accuracy: f64,
    pub images_per_second: f64,
    pub learning_rate: f64,
}

/// A loaded checkpoint.
pub struct Checkpoint {
    pub state: CheckpointState,
    pub weights: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
}

/// Write a checkpoint atomically (see the module doc).
pub fn save(
    dir: &Path,
    state: &CheckpointState,
    weights: &HashMap<String, Tensor>,
    optimizer: &HashMap<String, Tensor>,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let previous = read_state(dir).ok().flatten().map(|s| s.tensors_file);

    let mut all: HashMap<String, Tensor> = HashMap::with_capacity(weights.len() + optimizer.len());
    for (name, tensor) in weights {
        all.insert(name.clone(), tensor.to_device(&Device::Cpu)?);
    }
    for (name, tensor) in optimizer {
        all.insert(format!("{OPTIMIZER_PREFIX}{name}"), tensor.to_device(&Device::Cpu)?);
    }
    let tensors_path = dir.join(&state.tensors_file);
    let tmp = with_suffix(&tensors_path, ".tmp");
    candle_core::safetensors::save(&all, &tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    sync_file(&tmp)?;
    std::fs::rename(&tmp, &tensors_path).with_context(|| format!("cannot rename {}", tmp.display()))?;

    let state_path = dir.join(STATE_FILE);
    let tmp = with_suffix(&state_path, ".tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(state)?)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    sync_file(&tmp)?;
    std::fs::rename(&tmp, &state_path).with_context(|| format!("cannot rename {}", tmp.display()))?;

    if let Some(old) = previous.filter(|old| *old != state.tensors_file) {
        let _ = std::fs::remove_file(dir.join(old));
    }
    remove_leftovers(dir, &state.tensors_file);
    Ok(())
}

/// Delete what an earlier, killed save left behind (half-written `.tmp` files, tensors no JSON names), so SageMaker
/// does not upload them with the checkpoint. Only our own file names are touched; failures are harmless.
fn remove_leftovers(dir: &Path, current: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let ours = name.starts_with("checkpoint-")
            && (name.ends_with(".safetensors") || name.ends_with(".safetensors.tmp"))
            || name == format!("{STATE_FILE}.tmp");
        if ours && name != current {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The checkpoint in `dir`, if there is one.
pub fn load(dir: &Path) -> Result<Option<Checkpoint>> {
    let Some(state) = read_state(dir)? else { return Ok(None) };
    let path = dir.join(&state.tensors_file);
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu).with_context(|| {
        format!(
            "the checkpoint {} cannot be read; delete the checkpoints directory to start over",
            path.display()
        )
    })?;
    let (mut weights, mut optimizer) = (HashMap::new(), HashMap::new());
    for (name, tensor) in tensors {
        match name.strip_prefix(OPTIMIZER_PREFIX) {
            Some(rest) => optimizer.insert(rest.to_string(), tensor),
            None => weights.insert(name, tensor),
        };
    }
    Ok(Some(Checkpoint {
        state,
        weights,
        optimizer,
    }))
}

fn read_state(dir: &Path) -> Result<Option<CheckpointState>> {
    let path = dir.join(STATE_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).with_context(|| {
            format!(
                "the checkpoint {} is not valid; delete the checkpoints directory to start over",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

fn sync_file(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot sync {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(epoch: u32) -> CheckpointState {
        CheckpointState {
            epochs_done: epoch,
            iterations_done: u64::from(epoch) * 10,
            optimizer_steps: u64::from(epoch) * 10,
            best_miou: Some(0.5),
            best_epoch: Some(epoch),
            epochs_without_improvement: 0,
            history: vec![],
            hyperparameters: serde_json::json!({"epochs": 3}),
            tensors_file: format!("checkpoint-{epoch}.safetensors"),
        }
    }

    fn tensors(value: f32) -> HashMap<String, Tensor> {
        HashMap::from([("w".to_string(), Tensor::full(value, (2, 2), &Device::Cpu).unwrap())])
    }

    #[test]
    fn round_trips_and_replaces_the_previous_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).unwrap().is_none());
        save(dir.path(), &state(1), &tensors(1.0), &tensors(10.0)).unwrap();
        save(dir.path(), &state(2), &tensors(2.0), &tensors(20.0)).unwrap();
        let loaded = load(dir.path()).unwrap().unwrap();
        assert_eq!(loaded.state, state(2));
        let w: Vec<f32> = loaded.weights["w"].flatten_all().unwrap().to_vec1().unwrap();
        let m: Vec<f32> = loaded.optimizer["w"].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!((w[0], m[0]), (2.0, 20.0));
        let mut files: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        files.sort();
        assert_eq!(files, ["checkpoint-2.safetensors", "checkpoint.json"]);
    }

    #[test]
    fn an_interrupted_write_leaves_the_previous_checkpoint_whole() {
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), &state(1), &tensors(1.0), &tensors(10.0)).unwrap();
        // A crash after writing the new tensors but before the JSON rename: leftovers of every stage.
        std::fs::write(dir.path().join("checkpoint-2.safetensors.tmp"), b"half").unwrap();
        std::fs::write(
            dir.path().join("checkpoint-2.safetensors"),
            b"complete but unreferenced",
        )
        .unwrap();
        std::fs::write(dir.path().join("checkpoint.json.tmp"), b"{\"epochs_d").unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"the user's").unwrap();
        let loaded = load(dir.path()).unwrap().unwrap();
        assert_eq!(loaded.state.epochs_done, 1);

        // The next save clears the leftovers (and only them).
        save(dir.path(), &state(3), &tensors(3.0), &tensors(30.0)).unwrap();
        let mut files: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        files.sort();
        assert_eq!(files, ["checkpoint-3.safetensors", "checkpoint.json", "notes.txt"]);
    }

    #[test]
    fn a_corrupt_checkpoint_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATE_FILE), b"{not json").unwrap();
        let err = load(dir.path()).err().unwrap().to_string();
        assert!(err.contains("delete the checkpoints directory"), "{err}");
    }
}

//! ImageNet backbone weights for `use_pretrained_model=True`: where to find them and loading them into the network.
//!
//! Looked for, in order, in the job's `pretrained` channel and in the directory the training image bakes them into
//! (`SEMSEG_PRETRAINED_DIR`, default [`DEFAULT_PRETRAINED_DIR`]), as torchvision's checkpoint exactly as downloaded
//! (`resnet-50.pth`, what `scripts/fetch-pretrained.sh` fetches) or the same tensors as safetensors.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_nn::VarMap;

use crate::model::{artifact, weights, Backbone};

/// Where the training image keeps ImageNet backbone weights (`<backbone>.safetensors` or `.pth`).
pub const DEFAULT_PRETRAINED_DIR: &str = "/opt/semseg/pretrained";

/// The weights file for `backbone`: in `channel_dir` (the `pretrained` channel, when the job has one), else in the
/// image's directory. The error lists every path tried and how to provide one.
pub fn find(backbone: Backbone, channel_dir: Option<&Path>) -> Result<PathBuf> {
    let file_names = [format!("{backbone}.safetensors"), format!("{backbone}.pth")];
    let baked_dir =
        std::env::var_os("SEMSEG_PRETRAINED_DIR").map_or_else(|| PathBuf::from(DEFAULT_PRETRAINED_DIR), PathBuf::from);
    let candidates: Vec<PathBuf> = channel_dir
        .into_iter()
        .chain([baked_dir.as_path()])
        .flat_map(|dir| file_names.iter().map(move |name| dir.join(name)))
        .collect();
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    bail!(
        "use_pretrained_model=True needs ImageNet weights for {backbone} but none were found (looked for {}); add a \
         'pretrained' channel holding {} (torchvision's ResNet checkpoint, as scripts/fetch-pretrained.sh \
         downloads it), use a training image built with them, or set use_pretrained_model=False",
        candidates
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        file_names[1],
    )
}

/// Load the backbone tensors of the state dict at `path` into `varmap` (the heads keep their initialisation).
pub fn load(path: &Path, backbone: Backbone, varmap: &VarMap) -> Result<()> {
    let tensors = artifact::read_state_dict(path)?;
    let loaded = weights::load_backbone_into_varmap(varmap, &tensors, backbone)
        .with_context(|| format!("loading ImageNet weights from {}", path.display()))?;
    tracing::info!(
        tensors = loaded,
        "ImageNet backbone weights loaded from {}",
        path.display()
    );
    Ok(())
}

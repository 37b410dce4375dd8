//! The model artifact: a directory holding `model.safetensors` (the state dict under torchvision's names, f32,
//! without `num_batches_tracked`) and `model.json` ([`ModelMeta`]). Training writes it, `serve`, `predict` and
//! incremental training read it, and `import` makes one from a PyTorch state dict.
//!
//! Loading checks every tensor's presence and shape and reports all problems at once. [`InferenceModel`] is the
//! serving form: BatchNorm folded into the convolutions at load time, no auxiliary head, no autograd state.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::normalize::{IMAGENET_MEAN, IMAGENET_STD};

use super::config::{Algorithm, Backbone, ConfigError, ModelConfig, OutputStride};
use super::segmentation_model::SegmentationModel;
use super::weights::{self, WeightsError, IGNORED_SUFFIX};

pub const FORMAT_VERSION: u32 = 1;
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const META_FILE: &str = "model.json";

/// Per-channel (R, G, B) normalisation applied to pixel values scaled to 0..1: `(x − mean) / std`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Normalization {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Default for Normalization {
    /// ImageNet statistics, what torchvision backbones were trained with.
    fn default() -> Self {
        Self {
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }
}

/// `model.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelMeta {
    pub format_version: u32,
    pub algorithm: Algorithm,
    pub backbone: Backbone,
    pub num_classes: usize,
    pub output_stride: OutputStride,
    /// Whether `aux_classifier.*` tensors are stored (kept for incremental training; serving ignores them).
    #[serde(default)]
    pub aux: bool,
    /// Square training crop, when known.
    #[serde(default)]
    pub crop_size: Option<u32>,
    #[serde(default)]
    pub normalization: Normalization,
    /// One name per class index, when known.
    #[serde(default)]
    pub class_names: Option<Vec<String>>,
    /// The hyperparameters of the training job that made these weights (absent for imported models).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hyperparameters: Option<serde_json::Value>,
    /// Figures of the epoch whose weights these are (absent for imported models).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<TrainingMetrics>,
}

/// What the training job measured for the saved epoch (the best by validation mIOU).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingMetrics {
    pub epoch: u32,
    pub train_loss: f64,
    pub validation_miou: f64,
    pub validation_pixel_accuracy: f64,
    /// IoU per class; `null` for a class absent from both prediction and truth.
    pub class_iou: Vec<Option<f64>>,
}

impl ModelMeta {
    pub fn new(config: &ModelConfig) -> Self {
        Self {
            format_version: FORMAT_VERSION,
            algorithm: config.algorithm,
            backbone: config.backbone,
            num_classes: config.num_classes,
            output_stride: config.output_stride,
            aux: config.aux,
            crop_size: None,
            normalization: Normalization::default(),
            class_names: None,
            hyperparameters: None,
            metrics: None,
        }
    }

    /// The network this artifact describes, after checking the metadata is consistent.
    pub fn config(&self) -> Result<ModelConfig, ArtifactError> {
        if self.format_version != FORMAT_VERSION {
            return Err(ArtifactError::Version(self.format_version));
        }
        if let Some(names) = &self.class_names {
            if names.len() != self.num_classes {
                return Err(ArtifactError::Invalid(format!(
                    "{} class names for {} classes",
                    names.len(),
                    self.num_classes
                )));
            }
        }
        if self.normalization.std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(ArtifactError::Invalid(format!(
                "normalisation std must be positive, got {:?}",
                self.normalization.std
            )));
        }
        Ok(ModelConfig::new(
            self.algorithm,
            self.backbone,
            self.num_classes,
            self.output_stride,
            self.aux,
        )?)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid model description: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: cannot read or write the weights: {source}")]
    Safetensors {
        path: PathBuf,
        #[source]
        source: candle_core::Error,
    },
    #[error("{path}: cannot read this PyTorch file: {source}")]
    PyTorch {
        path: PathBuf,
        #[source]
        source: candle_core::Error,
    },
    #[error("model format version {0} is not supported (this build reads version {FORMAT_VERSION})")]
    Version(u32),
    #[error("invalid model description: {0}")]
    Invalid(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("preparing the model for inference: {0}")]
    Fold(#[source] candle_core::Error),
}

/// Writes `dir/model.safetensors` and `dir/model.json` after checking the tensors fit the metadata exactly, so a
/// broken artifact is never written. Tensors are stored as f32 on the CPU.
pub fn save(dir: &Path, meta: &ModelMeta, tensors: &HashMap<String, Tensor>) -> Result<(), ArtifactError> {
    let config = meta.config()?;
    let expected = weights::expected_tensors(&config).map_err(ArtifactError::Fold)?;
    let stored: HashMap<String, Tensor> = tensors
        .iter()
        .filter(|(k, _)| !k.ends_with(IGNORED_SUFFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let shapes = stored.iter().map(|(k, t)| (k.clone(), t.dims().to_vec())).collect();
    let mismatch = weights::check(&expected, &shapes);
    if mismatch.is_fatal(true) {
        return Err(WeightsError::Mismatch {
            model: config.to_string(),
            mismatch,
        }
        .into());
    }
    fs::create_dir_all(dir).map_err(|source| ArtifactError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let weights_path = dir.join(WEIGHTS_FILE);
    let as_f32 = stored
        .into_iter()
        .map(|(k, t)| Ok((k, t.detach().to_dtype(DType::F32)?.to_device(&Device::Cpu)?)))
        .collect::<candle_core::Result<HashMap<_, _>>>()
        .map_err(|source| ArtifactError::Safetensors {
            path: weights_path.clone(),
            source,
        })?;
    // Write under a temporary name and rename, so a crash never leaves a half-written artifact.
    let tmp = dir.join(format!("{WEIGHTS_FILE}.tmp"));
    candle_core::safetensors::save(&as_f32, &tmp).map_err(|source| ArtifactError::Safetensors {
        path: tmp.clone(),
        source,
    })?;
    fs::rename(&tmp, &weights_path).map_err(|source| ArtifactError::Io {
        path: weights_path.clone(),
        source,
    })?;
    // The safetensors crate writes through a private (0600) temporary file; give the weights the same
    // permissions as model.json so a server running as another user can read them.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&weights_path, fs::Permissions::from_mode(0o644)).map_err(|source| ArtifactError::Io {
            path: weights_path.clone(),
            source,
        })?;
    }
    let meta_path = dir.join(META_FILE);
    let json = serde_json::to_string_pretty(meta).map_err(|source| ArtifactError::Json {
        path: meta_path.clone(),
        source,
    })?;
    fs::write(&meta_path, json + "\n").map_err(|source| ArtifactError::Io {
        path: meta_path,
        source,
    })
}

/// Saves a training `VarMap` (parameters and BatchNorm running statistics) as an artifact.
pub fn save_varmap(dir: &Path, meta: &ModelMeta, varmap: &VarMap) -> Result<(), ArtifactError> {
    let tensors: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .map_err(|_| ArtifactError::Invalid("varmap lock poisoned".into()))?
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    save(dir, meta, &tensors)
}

/// Reads `model.json`.
pub fn read_meta(dir: &Path) -> Result<ModelMeta, ArtifactError> {
    let path = dir.join(META_FILE);
    let text = fs::read_to_string(&path).map_err(|source| ArtifactError::Io {
        path: path.clone(),
        source,
    })?;
    let meta: ModelMeta = serde_json::from_str(&text).map_err(|source| ArtifactError::Json {
        path: path.clone(),
        source,
    })?;
    meta.config()?;
    Ok(meta)
}

/// Reads a safetensors file into CPU tensors.
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor>, ArtifactError> {
    candle_core::safetensors::load(path, &Device::Cpu).map_err(|source| ArtifactError::Safetensors {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads a state dict saved by PyTorch (`torch.save`, the zip format of PyTorch ≥ 1.6, e.g. torchvision's published
/// `resnet50-0676ba61.pth`) into CPU tensors. Tensors stored as f16/bf16/f64 are converted to f32.
pub fn read_pytorch(path: &Path) -> Result<HashMap<String, Tensor>, ArtifactError> {
    let to_error = |source| ArtifactError::PyTorch {
        path: path.to_path_buf(),
        source,
    };
    // Some checkpoints wrap the state dict (`{"state_dict": {...}}`, `{"model": {...}}`): try the plain one first.
    let mut tensors = candle_core::pickle::read_all(path).map_err(to_error)?;
    for key in ["state_dict", "model"] {
        if !tensors.is_empty() {
            break;
        }
        tensors = candle_core::pickle::read_all_with_key(path, Some(key)).unwrap_or_default();
    }
    if tensors.is_empty() {
        return Err(ArtifactError::Invalid(format!(
            "{}: no tensors found in this PyTorch file (expected a state dict saved with torch.save)",
            path.display()
        )));
    }
    tensors
        .into_iter()
        .map(|(name, t)| {
            let t = if t.dtype() == candle_core::DType::F32 {
                t
            } else {
                t.to_dtype(candle_core::DType::F32).map_err(to_error)?
            };
            Ok((name, t))
        })
        .collect()
}

/// Reads a state dict by its extension: `.pth`, `.pt` or `.bin` as a PyTorch file, anything else as safetensors.
pub fn read_state_dict(path: &Path) -> Result<HashMap<String, Tensor>, ArtifactError> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("pth" | "pt" | "bin") => read_pytorch(path),
        _ => read_safetensors(path),
    }
}

/// Reads both files of an artifact (tensors on the CPU, unchecked: see [`InferenceModel`] and
/// [`weights::load_into_varmap`] for the checked uses).
pub fn read(dir: &Path) -> Result<(ModelMeta, HashMap<String, Tensor>), ArtifactError> {
    let meta = read_meta(dir)?;
    let tensors = read_safetensors(&dir.join(WEIGHTS_FILE))?;
    Ok((meta, tensors))
}

/// Turns a torchvision-named state dict (safetensors, or a `torch.save` file: see [`read_state_dict`]) into an artifact. The
/// auxiliary head is kept when the file has one (`meta.aux` is set from the file); `num_batches_tracked` is dropped;
/// any other missing, mis-shaped or unexpected tensor is an error naming it.
pub fn import_torchvision(src: &Path, mut meta: ModelMeta, out: &Path) -> Result<ModelMeta, ArtifactError> {
    let tensors = read_state_dict(src)?;
    meta.aux = tensors.keys().any(|k| k.starts_with("aux_classifier."));
    save(out, &meta, &tensors)?;
    Ok(meta)
}

/// The serving network: checked weights, BatchNorm folded into the convolutions, eval mode only.
#[derive(Clone, Debug)]
pub struct InferenceModel {
    meta: ModelMeta,
    net: SegmentationModel,
}

impl InferenceModel {
    /// Loads `dir` onto `device` (f32).
    pub fn load(dir: &Path, device: &Device) -> Result<Self, ArtifactError> {
        let (meta, tensors) = read(dir)?;
        Self::from_parts(meta, tensors, device)
    }

    /// Builds from metadata and a state dict already in memory (strict: every tensor must belong to the model).
    pub fn from_parts(
        meta: ModelMeta,
        tensors: HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self, ArtifactError> {
        let config = meta.config()?;
        let net = weights::segmenter_from_tensors(&config, tensors, true, DType::F32, device)?;
        let net = net.fold_batchnorm().map_err(ArtifactError::Fold)?;
        Ok(Self { meta, net })
    }

    /// Wraps a network that is already folded ([`SegmentationModel::fold_batchnorm`]): training's validation scores
    /// whole images through the same inference path as `serve` without saving the model first.
    pub fn from_folded(meta: ModelMeta, net: SegmentationModel) -> Result<Self, ArtifactError> {
        if !net.is_folded() {
            return Err(ArtifactError::Fold(candle_core::Error::Msg(
                "inference needs the network with its BatchNorms folded".into(),
            )));
        }
        Ok(Self { meta, net })
    }

    pub fn meta(&self) -> &ModelMeta {
        &self.meta
    }

    /// The same model running its activations in `dtype` (bf16 for mixed precision); logits stay f32.
    pub fn with_compute_dtype(self, dtype: DType) -> Self {
        Self {
            meta: self.meta,
            net: self.net.with_compute_dtype(dtype),
        }
    }

    pub fn network(&self) -> &SegmentationModel {
        &self.net
    }

    /// `x` `[B, 3, H, W]` f32, already normalised with [`ModelMeta::normalization`], any H and W
    /// → logits `[B, num_classes, H, W]`.
    pub fn logits(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.net.logits(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarBuilder;

    fn pytorch_fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/pytorch")
            .join(name)
    }

    #[test]
    fn pytorch_state_dicts_read_as_f32_with_their_values_plain_or_wrapped() -> anyhow::Result<()> {
        for file in ["tiny_state_dict.pth", "tiny_wrapped_state_dict.pth"] {
            let tensors = read_state_dict(&pytorch_fixture(file))?;
            let mut names: Vec<_> = tensors.keys().cloned().collect();
            names.sort();
            assert_eq!(
                names,
                [
                    "backbone.bn1.num_batches_tracked",
                    "backbone.conv1.weight",
                    "half",
                    "view"
                ],
                "{file}"
            );
            let conv = &tensors["backbone.conv1.weight"];
            assert_eq!(conv.dims(), [2, 3, 1, 1]);
            assert_eq!(conv.flatten_all()?.to_vec1::<f32>()?, [0.0, 0.25, 0.5, 0.75, 1.0, 1.25]);
            assert_eq!(tensors["half"].dtype(), DType::F32);
            assert_eq!(tensors["half"].to_vec1::<f32>()?, [0.5, -1.25, 2.0]);
            assert_eq!(
                tensors["view"].to_vec1::<f32>()?,
                [4.0, 5.0, 6.0, 7.0],
                "storage offset honoured"
            );
            assert_eq!(tensors["backbone.bn1.num_batches_tracked"].to_scalar::<f32>()?, 7.0);
        }
        Ok(())
    }

    #[test]
    fn a_file_that_is_not_a_pytorch_checkpoint_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("resnet-50.pth");
        std::fs::write(&path, b"<html>404 Not Found</html>").expect("write");
        let error = read_state_dict(&path).expect_err("not a checkpoint").to_string();
        assert!(error.contains("resnet-50.pth"), "{error}");
    }

    #[test]
    fn a_hostile_pytorch_file_is_an_error_not_a_runaway_allocation() {
        // tests/fixtures/pytorch/make_hostile.py: without the bounds in vendor/candle-core's pickle reader, the first
        // aborts the process allocating 2^62 bytes, the second copies objects until memory runs out and the third panics.
        for (file, expected) in [
            (
                "huge_shape.pth",
                "backbone.conv1.weight needs [1073741824, 1073741824, 1, 1] elements",
            ),
            ("memo_bomb.pth", "copies more than"),
            // Skipped with a message, not a panic on the missing arguments; then no tensor is left.
            ("short_args.pth", "no tensors found"),
        ] {
            let error = read_state_dict(&pytorch_fixture(file)).expect_err(file).to_string();
            assert!(error.contains(file) && error.contains(expected), "{error}");
        }
    }

    fn trained_varmap(cfg: &ModelConfig) -> candle_core::Result<(VarMap, SegmentationModel)> {
        let vm = VarMap::new();
        let net = SegmentationModel::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
        let x = Tensor::randn(0.5f32, 1.0, (2, 3, 40, 36), &Device::Cpu)?;
        net.forward_t(&x, true)?; // moves the running statistics away from 0/1
        Ok((vm, net))
    }

    #[test]
    fn save_load_round_trip_matches_training_network() -> anyhow::Result<()> {
        let cfg = ModelConfig::new(Algorithm::Deeplab, Backbone::Resnet18, 4, OutputStride::Sixteen, true)?;
        let (vm, net) = trained_varmap(&cfg)?;
        let dir = tempfile::tempdir()?;
        let mut meta = ModelMeta::new(&cfg);
        meta.crop_size = Some(240);
        meta.class_names = Some(vec!["bg".into(), "a".into(), "b".into(), "c".into()]);
        save_varmap(dir.path(), &meta, &vm)?;
        let model = InferenceModel::load(dir.path(), &Device::Cpu)?;
        assert_eq!(model.meta(), &meta);
        let x = Tensor::randn(0f32, 1.0, (2, 3, 45, 31), &Device::Cpu)?;
        let want = net.logits(&x)?;
        let got = model.logits(&x)?;
        let rel = ((&want - &got)?.sqr()?.sum_all()?.sqrt()? / want.sqr()?.sum_all()?.sqrt()?)?.to_scalar::<f32>()?;
        assert!(rel < 1e-5, "{rel}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.path().join(WEIGHTS_FILE))?.permissions().mode();
            assert_eq!(mode & 0o044, 0o044, "weights readable by group and others: {mode:o}");
        }
        let json = fs::read_to_string(dir.path().join(META_FILE))?;
        assert!(
            json.contains("\"algorithm\": \"deeplab\"") && json.contains("\"format_version\": 1"),
            "{json}"
        );
        Ok(())
    }

    #[test]
    fn load_lists_every_missing_and_misshaped_tensor() -> anyhow::Result<()> {
        let cfg = ModelConfig::new(Algorithm::Fcn, Backbone::Resnet18, 3, OutputStride::Eight, false)?;
        let (vm, _) = trained_varmap(&cfg)?;
        let dir = tempfile::tempdir()?;
        save_varmap(dir.path(), &ModelMeta::new(&cfg), &vm)?;
        let (meta, mut tensors) = read(dir.path())?;
        tensors.remove("backbone.layer2.1.bn2.running_var");
        tensors.remove("classifier.4.bias");
        tensors.insert(
            "classifier.4.weight".into(),
            Tensor::zeros((5, 128, 1, 1), DType::F32, &Device::Cpu)?,
        );
        tensors.insert(
            "backbone.bn1.num_batches_tracked".into(),
            Tensor::zeros((), DType::I64, &Device::Cpu)?,
        );
        let err = InferenceModel::from_parts(meta.clone(), tensors.clone(), &Device::Cpu)
            .expect_err("broken weights must not load")
            .to_string();
        assert!(err.contains("2 missing tensors"), "{err}");
        assert!(err.contains("backbone.layer2.1.bn2.running_var [128]"), "{err}");
        assert!(err.contains("classifier.4.bias [3]"), "{err}");
        assert!(
            err.contains("classifier.4.weight: expected [3, 128, 1, 1], found [5, 128, 1, 1]"),
            "{err}"
        );
        assert!(!err.contains("num_batches_tracked"), "{err}");
        // An extra tensor is refused too (strict): here, an aux head the metadata does not announce.
        let (_, mut full) = read(dir.path())?;
        full.insert(
            "aux_classifier.4.bias".into(),
            Tensor::zeros(3, DType::F32, &Device::Cpu)?,
        );
        let err = InferenceModel::from_parts(meta, full, &Device::Cpu)
            .expect_err("extra")
            .to_string();
        assert!(
            err.contains("unexpected") && err.contains("aux_classifier.4.bias"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn inference_model_can_be_shared_between_server_workers() {
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<InferenceModel>();
        assert_send_sync::<SegmentationModel>();
    }

    #[test]
    fn bad_metadata_is_refused() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        fs::write(
            dir.path().join(META_FILE),
            r#"{"format_version": 2, "algorithm": "fcn", "backbone": "resnet-18", "num_classes": 2, "output_stride": 8}"#,
        )?;
        assert!(matches!(read_meta(dir.path()), Err(ArtifactError::Version(2))));
        fs::write(
            dir.path().join(META_FILE),
            r#"{"format_version": 1, "algorithm": "fcn", "backbone": "resnet-18", "num_classes": 2, "output_stride": 12}"#,
        )?;
        assert!(matches!(read_meta(dir.path()), Err(ArtifactError::Json { .. })));
        let mut meta = ModelMeta::new(&ModelConfig::new(
            Algorithm::Fcn,
            Backbone::Resnet18,
            2,
            OutputStride::Eight,
            false,
        )?);
        meta.class_names = Some(vec!["one".into()]);
        assert!(matches!(meta.config(), Err(ArtifactError::Invalid(_))));
        assert!(matches!(
            InferenceModel::load(dir.path(), &Device::Cpu),
            Err(ArtifactError::Json { .. })
        ));
        Ok(())
    }

    #[test]
    fn import_keeps_aux_and_drops_counters() -> anyhow::Result<()> {
        let cfg = ModelConfig::new(Algorithm::Psp, Backbone::Resnet18, 2, OutputStride::Eight, true)?;
        let (vm, _) = trained_varmap(&cfg)?;
        let mut tensors: HashMap<String, Tensor> = vm
            .data()
            .lock()
            .expect("lock")
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        tensors.insert(
            "backbone.bn1.num_batches_tracked".into(),
            Tensor::zeros((), DType::I64, &Device::Cpu)?,
        );
        let dir = tempfile::tempdir()?;
        let src = dir.path().join("torch.safetensors");
        candle_core::safetensors::save(&tensors, &src)?;
        let mut meta = ModelMeta::new(&cfg);
        meta.aux = false;
        let out = dir.path().join("artifact");
        let meta = import_torchvision(&src, meta, &out)?;
        assert!(meta.aux);
        let (_, stored) = read(&out)?;
        assert!(!stored.keys().any(|k| k.ends_with(IGNORED_SUFFIX)));
        InferenceModel::load(&out, &Device::Cpu)?;
        Ok(())
    }
}

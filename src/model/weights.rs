//! State dicts by name: which tensors a model expects, checking a set of tensors against that list (every
//! problem reported at once, not the first), building a network from checked tensors, and loading them into a
//! training `VarMap`.
//!
//! The expected list comes from the constructors themselves (a `VarBuilder` backend that records what is asked
//! for), so there is no second table of names to keep in sync.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};

use super::config::{Backbone, ModelConfig, OutputStride};
use super::resnet::ResNet;
use super::segmentation_model::SegmentationModel;

/// torchvision BatchNorm counters, present in PyTorch state dicts and meaningless here; ignored on load.
pub const IGNORED_SUFFIX: &str = "num_batches_tracked";

/// False for BatchNorm running statistics: they are `Var`s in a training `VarMap` (so they are saved) but are
/// updated by the forward pass, never by the optimizer.
pub fn is_trainable(name: &str) -> bool {
    !(name.ends_with(".running_mean") || name.ends_with(".running_var") || name.ends_with(IGNORED_SUFFIX))
}

/// The variables an optimizer should update: every `Var` of a training `VarMap` except BatchNorm running
/// statistics, in name order (so optimizer state lines up from run to run).
pub fn trainable_vars(varmap: &VarMap) -> Vec<(String, candle_core::Var)> {
    let data = match varmap.data().lock() {
        Ok(d) => d,
        Err(poisoned) => poisoned.into_inner(),
    };
    let mut vars: Vec<(String, candle_core::Var)> = data
        .iter()
        .filter(|(k, _)| is_trainable(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// A parameter's name and shape.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl fmt::Display for TensorSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?}", self.name, self.shape)
    }
}

/// What did not fit when checking tensors against a model.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub missing: Vec<TensorSpec>,
    /// (expected, found shape)
    pub misshaped: Vec<(TensorSpec, Vec<usize>)>,
    /// Present but not part of the model (num_batches_tracked excluded).
    pub unexpected: Vec<String>,
}

impl Mismatch {
    /// Missing and mis-shaped tensors make the weights unusable; unexpected ones only when `strict`.
    pub fn is_fatal(&self, strict: bool) -> bool {
        !self.missing.is_empty() || !self.misshaped.is_empty() || (strict && !self.unexpected.is_empty())
    }
}

const LIST_LIMIT: usize = 12;

fn list<T>(f: &mut fmt::Formatter<'_>, what: &str, items: &[T], show: impl Fn(&T) -> String) -> fmt::Result {
    if items.is_empty() {
        return Ok(());
    }
    write!(f, "\n  {} {what}:", items.len())?;
    for it in items.iter().take(LIST_LIMIT) {
        write!(f, "\n    {}", show(it))?;
    }
    if items.len() > LIST_LIMIT {
        write!(f, "\n    ... and {} more", items.len() - LIST_LIMIT)?;
    }
    Ok(())
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        list(f, "missing tensors", &self.missing, |s| s.to_string())?;
        list(f, "mis-shaped tensors", &self.misshaped, |(s, found)| {
            format!("{}: expected {:?}, found {:?}", s.name, s.shape, found)
        })?;
        list(f, "unexpected tensors", &self.unexpected, |s| s.clone())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// The tensors do not fit the model described by `model`.
    #[error("the weights do not fit {model}:{mismatch}")]
    Mismatch { model: String, mismatch: Mismatch },
    #[error("building {model}: {source}")]
    Build {
        model: String,
        #[source]
        source: candle_core::Error,
    },
}

/// Records every parameter a constructor asks for and hands back zero-cost placeholders (a broadcast scalar).
struct Recorder {
    specs: Arc<Mutex<Vec<TensorSpec>>>,
}

impl SimpleBackend for Recorder {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.specs
            .lock()
            .map_err(|_| candle_core::Error::Msg("recorder lock poisoned".into()))?
            .push(TensorSpec {
                name: name.to_string(),
                shape: s.dims().to_vec(),
            });
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("recorder: unchecked access to {name}")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

fn record(build: impl FnOnce(VarBuilder) -> candle_core::Result<()>) -> candle_core::Result<Vec<TensorSpec>> {
    let specs = Arc::new(Mutex::new(Vec::new()));
    let rec = Recorder { specs: specs.clone() };
    let vb = VarBuilder::from_backend(Box::new(rec), DType::F32, Device::Cpu);
    build(vb)?;
    let specs = specs
        .lock()
        .map_err(|_| candle_core::Error::Msg("recorder lock poisoned".into()))?
        .clone();
    Ok(specs)
}

/// Every tensor of the segmentation model, in construction order, with torchvision's names.
pub fn expected_tensors(config: &ModelConfig) -> candle_core::Result<Vec<TensorSpec>> {
    record(|vb| SegmentationModel::new(config, vb).map(|_| ()))
}

/// Every tensor of a bare backbone as torchvision's `resnet*` names it (no `fc.*`).
pub fn expected_backbone_tensors(backbone: Backbone) -> candle_core::Result<Vec<TensorSpec>> {
    record(|vb| ResNet::new(backbone, OutputStride::Eight, vb).map(|_| ()))
}

/// Compares available tensors (name → shape) with the expected list.
pub fn check(expected: &[TensorSpec], available: &HashMap<String, Vec<usize>>) -> Mismatch {
    let mut m = Mismatch::default();
    let mut wanted = HashSet::new();
    for spec in expected {
        wanted.insert(spec.name.as_str());
        match available.get(&spec.name) {
            None => m.missing.push(spec.clone()),
            Some(shape) if *shape != spec.shape => m.misshaped.push((spec.clone(), shape.clone())),
            Some(_) => {}
        }
    }
    let mut unexpected: Vec<String> = available
        .keys()
        .filter(|k| !wanted.contains(k.as_str()) && !k.ends_with(IGNORED_SUFFIX))
        .cloned()
        .collect();
    unexpected.sort();
    m.unexpected = unexpected;
    m
}

fn shapes(tensors: &HashMap<String, Tensor>) -> HashMap<String, Vec<usize>> {
    tensors.iter().map(|(k, t)| (k.clone(), t.dims().to_vec())).collect()
}

/// Builds the network from a complete state dict, after checking every tensor's presence and shape (extra tensors
/// are an error when `strict`). Tensors are converted to `dtype` and moved to `device`.
pub fn segmenter_from_tensors(
    config: &ModelConfig,
    tensors: HashMap<String, Tensor>,
    strict: bool,
    dtype: DType,
    device: &Device,
) -> Result<SegmentationModel, WeightsError> {
    check_state_dict(config, &tensors, strict)?;
    let vb = VarBuilder::from_tensors(tensors, dtype, device);
    SegmentationModel::new(config, vb).map_err(|source| WeightsError::Build {
        model: config.to_string(),
        source,
    })
}

/// Checks every tensor of a state dict against the network `config` describes (extra tensors are an error when
/// `strict`), reporting all problems at once; returns the network's tensors.
pub fn check_state_dict(
    config: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
    strict: bool,
) -> Result<Vec<TensorSpec>, WeightsError> {
    let model = config.to_string();
    let expected = expected_tensors(config).map_err(|source| WeightsError::Build {
        model: model.clone(),
        source,
    })?;
    let mismatch = check(&expected, &shapes(tensors));
    if mismatch.is_fatal(strict) {
        return Err(WeightsError::Mismatch { model, mismatch });
    }
    Ok(expected)
}

/// Copies checkpoint tensors into a training `VarMap`'s variables. `rename` maps a variable's name to the
/// checkpoint's (`None`: the variable is not loaded, e.g. the head when loading an ImageNet backbone). Every
/// problem is reported at once and nothing is copied unless everything fits. Returns how many tensors were loaded.
pub fn load_into_varmap(
    varmap: &VarMap,
    tensors: &HashMap<String, Tensor>,
    what: &str,
    rename: impl Fn(&str) -> Option<String>,
) -> Result<usize, WeightsError> {
    let data = varmap.data().lock().map_err(|_| WeightsError::Build {
        model: what.to_string(),
        source: candle_core::Error::Msg("varmap lock poisoned".into()),
    })?;
    let mut plan = Vec::new();
    let mut mismatch = Mismatch::default();
    let mut used = HashSet::new();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let Some(src) = rename(name) else { continue };
        let var = &data[name];
        let spec = TensorSpec {
            name: src.clone(),
            shape: var.dims().to_vec(),
        };
        match tensors.get(&src) {
            None => mismatch.missing.push(spec),
            Some(t) if t.dims() != var.dims() => mismatch.misshaped.push((spec, t.dims().to_vec())),
            Some(t) => plan.push((var, t)),
        }
        used.insert(src);
    }
    let mut unexpected: Vec<String> = tensors
        .keys()
        .filter(|k| !used.contains(*k) && !k.ends_with(IGNORED_SUFFIX))
        .cloned()
        .collect();
    unexpected.sort();
    mismatch.unexpected = unexpected;
    if mismatch.is_fatal(false) {
        return Err(WeightsError::Mismatch {
            model: what.to_string(),
            mismatch,
        });
    }
    let n = plan.len();
    for (var, t) in plan {
        t.to_dtype(var.dtype())
            .and_then(|t| t.to_device(var.device()))
            .and_then(|t| var.set(&t))
            .map_err(|source| WeightsError::Build {
                model: what.to_string(),
                source,
            })?;
    }
    Ok(n)
}

/// Loads ImageNet backbone weights under torchvision's `resnet*` names (timm's are the same) into the
/// `backbone.*` variables of a training `VarMap`; `fc.*` and `num_batches_tracked` are ignored.
pub fn load_backbone_into_varmap(
    varmap: &VarMap,
    tensors: &HashMap<String, Tensor>,
    backbone: Backbone,
) -> Result<usize, WeightsError> {
    let filtered: HashMap<String, Tensor> = tensors
        .iter()
        .filter(|(k, _)| !k.starts_with("fc."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    load_into_varmap(varmap, &filtered, &format!("the {backbone} backbone"), |name| {
        name.strip_prefix("backbone.").map(str::to_string)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Algorithm;

    fn imagenet_like(backbone: Backbone) -> candle_core::Result<HashMap<String, Tensor>> {
        let mut t: HashMap<String, Tensor> = expected_backbone_tensors(backbone)?
            .into_iter()
            .map(|s| Ok((s.name, Tensor::rand(0f32, 1.0, s.shape, &Device::Cpu)?)))
            .collect::<candle_core::Result<_>>()?;
        t.insert(
            "fc.weight".into(),
            Tensor::zeros((1000, 512), DType::F32, &Device::Cpu)?,
        );
        t.insert("fc.bias".into(), Tensor::zeros(1000, DType::F32, &Device::Cpu)?);
        t.insert(
            "bn1.num_batches_tracked".into(),
            Tensor::zeros((), DType::I64, &Device::Cpu)?,
        );
        Ok(t)
    }

    fn training_varmap() -> anyhow::Result<VarMap> {
        let cfg = ModelConfig::new(Algorithm::Fcn, Backbone::Resnet18, 2, OutputStride::Eight, true)?;
        let vm = VarMap::new();
        SegmentationModel::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
        Ok(vm)
    }

    #[test]
    fn imagenet_backbone_loads_into_backbone_only() -> anyhow::Result<()> {
        let vm = training_varmap()?;
        let head_before = vm.data().lock().expect("lock")["classifier.0.weight"]
            .as_tensor()
            .copy()?;
        let ckpt = imagenet_like(Backbone::Resnet18)?;
        let n = load_backbone_into_varmap(&vm, &ckpt, Backbone::Resnet18)?;
        assert_eq!(n, expected_backbone_tensors(Backbone::Resnet18)?.len());
        let data = vm.data().lock().expect("lock");
        let same = |a: &Tensor, b: &Tensor| -> candle_core::Result<bool> {
            Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()? == 0.0)
        };
        assert!(same(
            data["backbone.layer4.1.conv2.weight"].as_tensor(),
            &ckpt["layer4.1.conv2.weight"]
        )?);
        assert!(same(
            data["backbone.bn1.running_var"].as_tensor(),
            &ckpt["bn1.running_var"]
        )?);
        assert!(same(data["classifier.0.weight"].as_tensor(), &head_before)?);
        Ok(())
    }

    #[test]
    fn wrong_backbone_checkpoint_names_every_problem_and_changes_nothing() -> anyhow::Result<()> {
        let vm = training_varmap()?;
        let before = vm.data().lock().expect("lock")["backbone.conv1.weight"]
            .as_tensor()
            .copy()?;
        let mut ckpt = imagenet_like(Backbone::Resnet18)?;
        ckpt.remove("layer1.0.bn2.bias");
        ckpt.insert(
            "conv1.weight".into(),
            Tensor::zeros((64, 1, 7, 7), DType::F32, &Device::Cpu)?,
        );
        let err = load_backbone_into_varmap(&vm, &ckpt, Backbone::Resnet18)
            .expect_err("must fail")
            .to_string();
        assert!(err.contains("the resnet-18 backbone"), "{err}");
        assert!(err.contains("1 missing tensors:\n    layer1.0.bn2.bias [64]"), "{err}");
        assert!(
            err.contains("conv1.weight: expected [64, 3, 7, 7], found [64, 1, 7, 7]"),
            "{err}"
        );
        let after = vm.data().lock().expect("lock")["backbone.conv1.weight"]
            .as_tensor()
            .copy()?;
        assert_eq!(
            before.flatten_all()?.to_vec1::<f32>()?,
            after.flatten_all()?.to_vec1::<f32>()?
        );
        // A ResNet-50 checkpoint for a ResNet-18 model: mostly unexpected and mis-shaped names, all reported.
        let err = load_backbone_into_varmap(&vm, &imagenet_like(Backbone::Resnet50)?, Backbone::Resnet18)
            .expect_err("must fail")
            .to_string();
        assert!(err.contains("mis-shaped") && err.contains("... and"), "{err}");
        Ok(())
    }

    #[test]
    fn trainable_vars_are_the_parameters_only() -> anyhow::Result<()> {
        let vm = training_varmap()?;
        let vars = trainable_vars(&vm);
        let expected = expected_tensors(&ModelConfig::new(
            Algorithm::Fcn,
            Backbone::Resnet18,
            2,
            OutputStride::Eight,
            true,
        )?)?;
        let n_bn = expected.iter().filter(|s| s.name.ends_with(".running_mean")).count();
        assert_eq!(vars.len(), expected.len() - 2 * n_bn);
        assert!(vars.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(vars.iter().all(|(k, _)| !k.contains("running")));
        Ok(())
    }

    #[test]
    fn trainable_excludes_running_statistics() {
        assert!(is_trainable("backbone.bn1.weight"));
        assert!(is_trainable("classifier.4.bias"));
        assert!(!is_trainable("backbone.bn1.running_mean"));
        assert!(!is_trainable("classifier.0.convs.4.2.running_var"));
    }
}

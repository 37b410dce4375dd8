//! Typed hyperparameters: every one of the built-in Semantic Segmentation algorithm's, with the same names, defaults
//! and allowed values, plus a few documented extensions.
//!
//! SageMaker writes `hyperparameters.json` with string values (`"True"`, `"0.001"`); the SDKs sometimes JSON-encode
//! them once more (`"\"fcn\""`) and local tooling writes plain JSON numbers and booleans. All of these are accepted.
//! [`SPECS`] is the single source of truth for names, defaults and allowed values: parsing, error messages and the
//! README table all come from it.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::Serialize;
use serde_json::Value;

use crate::model::precision::Precision;

// The network words are the model's own types, so a parsed job builds its network without translation.
pub use crate::model::config::{Algorithm, Backbone, OutputStride};

/// Platform-reserved hyperparameters (e.g. `sagemaker_program`) that the algorithm ignores.
const RESERVED_PREFIX: &str = "sagemaker_";
/// SageMaker accepts at most 100 hyperparameters per job.
const MAX_ENTRIES: usize = 100;

/// Name, default and allowed values of one hyperparameter.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub name: &'static str,
    /// `None` = required.
    pub default: Option<&'static str>,
    pub allowed: &'static str,
    pub description: &'static str,
    /// `false` for the built-in algorithm's own hyperparameters, `true` for semseg's additions.
    pub extension: bool,
}

const fn spec(
    name: &'static str,
    default: Option<&'static str>,
    allowed: &'static str,
    description: &'static str,
) -> Spec {
    Spec {
        name,
        default,
        allowed,
        description,
        extension: false,
    }
}

const fn extension(
    name: &'static str,
    default: &'static str,
    allowed: &'static str,
    description: &'static str,
) -> Spec {
    Spec {
        name,
        default: Some(default),
        allowed,
        description,
        extension: true,
    }
}

/// Every hyperparameter the job accepts.
pub const SPECS: &[Spec] = &[
    spec(
        "backbone",
        Some("resnet-50"),
        "resnet-50, resnet-101 (semseg adds resnet-18, resnet-34)",
        "Encoder network.",
    ),
    spec(
        "use_pretrained_model",
        Some("True"),
        "True, False",
        "Start the backbone from ImageNet weights.",
    ),
    spec("algorithm", Some("fcn"), "fcn, psp, deeplab", "Segmentation head."),
    spec(
        "num_classes",
        None,
        "an integer from 2 to 254",
        "Number of classes, background included.",
    ),
    spec(
        "num_training_samples",
        None,
        "a positive integer",
        "Number of training images; sets the learning-rate schedule.",
    ),
    spec(
        "base_size",
        Some("520"),
        "an integer > 16",
        "Long side after random rescaling (× a factor in 0.5..2.0).",
    ),
    spec(
        "crop_size",
        Some("240"),
        "an integer > 16 (rounded up to a multiple of 8)",
        "Side of the square training crop.",
    ),
    spec(
        "epochs",
        Some("10"),
        "a positive integer",
        "Number of passes over the training data.",
    ),
    spec(
        "learning_rate",
        Some("0.001"),
        "a number with 0 < x <= 1",
        "Initial learning rate.",
    ),
    spec(
        "mini_batch_size",
        Some("16"),
        "a positive integer",
        "Training batch size.",
    ),
    spec(
        "validation_mini_batch_size",
        Some("16"),
        "a positive integer",
        "Validation batch size; 1 scores each whole image at its own size.",
    ),
    spec(
        "optimizer",
        Some("sgd"),
        "sgd, nag, adam, adagrad, rmsprop",
        "Optimizer.",
    ),
    spec(
        "momentum",
        Some("0.9"),
        "a number with 0 < x <= 1",
        "Momentum for sgd and nag.",
    ),
    spec(
        "weight_decay",
        Some("0.0001"),
        "a number with 0 <= x < 1",
        "Weight-decay coefficient.",
    ),
    spec(
        "gamma1",
        Some("0.9"),
        "a number with 0 <= x <= 1",
        "rmsprop: decay of the squared-gradient moving average.",
    ),
    spec("gamma2", Some("0.9"), "a number with 0 <= x <= 1", "rmsprop: momentum."),
    spec(
        "lr_scheduler",
        Some("poly"),
        "poly, step, cosine",
        "Learning-rate schedule.",
    ),
    spec(
        "lr_scheduler_factor",
        Some("0.1"),
        "a number with 0 < x <= 1",
        "step: factor applied at each step epoch.",
    ),
    spec(
        "lr_scheduler_step",
        Some(""),
        "comma-separated increasing epochs, each < epochs (required when lr_scheduler=step)",
        "step: epochs at which the rate is multiplied by lr_scheduler_factor.",
    ),
    spec(
        "early_stopping",
        Some("False"),
        "True, False",
        "Stop when validation mIOU stops improving.",
    ),
    spec(
        "early_stopping_min_epochs",
        Some("5"),
        "a non-negative integer",
        "Epochs always run before early stopping may stop the job.",
    ),
    spec(
        "early_stopping_patience",
        Some("4"),
        "a non-negative integer",
        "Epochs without enough improvement before stopping.",
    ),
    spec(
        "early_stopping_tolerance",
        Some("0.0"),
        "a number with 0 <= x <= 1",
        "Relative mIOU improvement below which an epoch does not count as better.",
    ),
    spec(
        "syncbn",
        Some("False"),
        "True, False",
        "Synchronised BatchNorm across GPUs (one device here: accepted, no effect).",
    ),
    extension(
        "output_stride",
        "8",
        "8, 16",
        "Backbone output stride: 8 (dilated last two stages) or 16 (dilated last stage).",
    ),
    extension(
        "seed",
        "0",
        "a non-negative integer",
        "Seed for shuffling, augmentation and initialisation.",
    ),
    extension(
        "precision",
        "auto",
        "auto, fp32, bf16",
        "Numeric precision: auto (TF32 convolutions and matmuls on GPUs that have it, fp32 elsewhere), fp32 (strict), \
         bf16 (mixed precision on the GPU: bf16 activations, f32 weights, statistics and loss; on CPUs with \
         AVX512-BF16, bf16 inputs to the convolutions' products; fp32 on other CPUs).",
    ),
];

/// A bad hyperparameter file or value, phrased for the job's FailureReason.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HyperparameterError {
    #[error("hyperparameter '{name}' has the value '{value}', but it must be {allowed}")]
    Invalid {
        name: String,
        value: String,
        allowed: String,
    },
    #[error("hyperparameter '{name}' is required ({allowed}); add it to the job's HyperParameters")]
    Missing { name: String, allowed: String },
    #[error("unknown hyperparameter '{name}'{suggestion}; remove it or fix its name")]
    Unknown { name: String, suggestion: String },
    #[error("hyperparameter '{name}' must be a string, number or boolean, not {kind}")]
    NotScalar { name: String, kind: &'static str },
    #[error("hyperparameters.json must be a JSON object of name → value: {0}")]
    Malformed(String),
    #[error("hyperparameters.json has {0} entries; SageMaker allows at most {MAX_ENTRIES}")]
    TooMany(usize),
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Several(Vec<HyperparameterError>),
}

macro_rules! choice_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
        pub enum $name { $(#[serde(rename = $text)] $variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = ();
            fn from_str(s: &str) -> Result<Self, ()> {
                Self::ALL.iter().copied().find(|v| v.as_str().eq_ignore_ascii_case(s.trim())).ok_or(())
            }
        }
    };
}

choice_enum!(
    /// Optimizer.
    OptimizerKind { Sgd = "sgd", Nag = "nag", Adam = "adam", Adagrad = "adagrad", Rmsprop = "rmsprop" }
);
choice_enum!(
    /// Learning-rate schedule.
    LrScheduler { Poly = "poly", Step = "step", Cosine = "cosine" }
);

/// The job's hyperparameters, validated.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Hyperparameters {
    pub backbone: Backbone,
    pub use_pretrained_model: bool,
    pub algorithm: Algorithm,
    pub num_classes: u32,
    pub num_training_samples: u64,
    pub base_size: u32,
    /// Already rounded up to a multiple of 8.
    pub crop_size: u32,
    pub epochs: u32,
    pub learning_rate: f64,
    pub mini_batch_size: u32,
    pub validation_mini_batch_size: u32,
    pub optimizer: OptimizerKind,
    pub momentum: f64,
    pub weight_decay: f64,
    pub gamma1: f64,
    pub gamma2: f64,
    pub lr_scheduler: LrScheduler,
    pub lr_scheduler_factor: f64,
    pub lr_scheduler_step: Vec<u32>,
    pub early_stopping: bool,
    pub early_stopping_min_epochs: u32,
    pub early_stopping_patience: u32,
    pub early_stopping_tolerance: f64,
    pub syncbn: bool,
    pub output_stride: OutputStride,
    pub seed: u64,
    /// Left out of the JSON at its default, so checkpoints written before it existed still resume.
    #[serde(skip_serializing_if = "Precision::is_auto")]
    pub precision: Precision,
}

/// What parsing produced besides the values: reserved names that were skipped, for the log.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParseNotes {
    pub ignored_reserved: Vec<String>,
}

impl Hyperparameters {
    /// Parse the contents of `hyperparameters.json`.
    pub fn from_json(text: &str) -> Result<(Self, ParseNotes), HyperparameterError> {
        let value: Value = serde_json::from_str(text).map_err(|e| HyperparameterError::Malformed(e.to_string()))?;
        let Value::Object(object) = value else {
            return Err(HyperparameterError::Malformed(format!("found {}", json_kind(&value))));
        };
        let mut raw = BTreeMap::new();
        for (name, value) in object {
            let text = scalar_text(&name, &value)?;
            raw.insert(name, text);
        }
        Self::from_strings(&raw)
    }

    /// Parse name → string pairs (what SageMaker writes), applying defaults and every validation rule.
    pub fn from_strings(raw: &BTreeMap<String, String>) -> Result<(Self, ParseNotes), HyperparameterError> {
        if raw.len() > MAX_ENTRIES {
            return Err(HyperparameterError::TooMany(raw.len()));
        }
        let mut notes = ParseNotes::default();
        let mut errors = Vec::new();
        for name in raw.keys() {
            if name.starts_with(RESERVED_PREFIX) {
                notes.ignored_reserved.push(name.clone());
            } else if find_spec(name).is_none() {
                errors.push(HyperparameterError::Unknown {
                    name: name.clone(),
                    suggestion: suggestion_for(name),
                });
            }
        }

        let mut p = Parser { raw, errors };
        let backbone = p.choice::<Backbone>("backbone");
        let use_pretrained_model = p.boolean("use_pretrained_model");
        let algorithm = p.choice::<Algorithm>("algorithm");
        let num_classes = p.integer("num_classes", |v| (2..=254).contains(&v));
        let num_training_samples = p.integer("num_training_samples", |v| v >= 1);
        let base_size = p.integer("base_size", |v| v > 16 && v <= 1 << 16);
        let crop_size = p.integer("crop_size", |v| v > 16 && v <= 1 << 16);
        let epochs = p.integer("epochs", |v| v >= 1);
        let learning_rate = p.number("learning_rate", |x| x > 0.0 && x <= 1.0);
        let mini_batch_size = p.integer("mini_batch_size", |v| v >= 1);
        let validation_mini_batch_size = p.integer("validation_mini_batch_size", |v| v >= 1);
        let optimizer = p.choice::<OptimizerKind>("optimizer");
        let momentum = p.number("momentum", |x| x > 0.0 && x <= 1.0);
        let weight_decay = p.number("weight_decay", |x| (0.0..1.0).contains(&x));
        let gamma1 = p.number("gamma1", |x| (0.0..=1.0).contains(&x));
        let gamma2 = p.number("gamma2", |x| (0.0..=1.0).contains(&x));
        let lr_scheduler = p.choice::<LrScheduler>("lr_scheduler");
        let lr_scheduler_factor = p.number("lr_scheduler_factor", |x| x > 0.0 && x <= 1.0);
        let lr_scheduler_step = p.epoch_list("lr_scheduler_step");
        let early_stopping = p.boolean("early_stopping");
        let early_stopping_min_epochs = p.integer("early_stopping_min_epochs", |_| true);
        let early_stopping_patience = p.integer("early_stopping_patience", |_| true);
        let early_stopping_tolerance = p.number("early_stopping_tolerance", |x| (0.0..=1.0).contains(&x));
        let syncbn = p.boolean("syncbn");
        let output_stride = p.integer("output_stride", |v| v == 8 || v == 16);
        let seed = p.integer("seed", |_| true);
        let precision = p.choice::<Precision>("precision");

        // Rules that involve two hyperparameters.
        if let (Some(LrScheduler::Step), Some(steps), Some(epochs)) = (lr_scheduler, &lr_scheduler_step, &epochs) {
            let allowed = "comma-separated increasing epochs, each < epochs, when lr_scheduler=step".to_string();
            if steps.is_empty() {
                p.errors.push(HyperparameterError::Missing {
                    name: "lr_scheduler_step".into(),
                    allowed,
                });
            } else if steps.iter().any(|&s| u64::from(s) >= *epochs) {
                p.errors.push(HyperparameterError::Invalid {
                    name: "lr_scheduler_step".into(),
                    value: p.raw_value("lr_scheduler_step").unwrap_or_default(),
                    allowed: format!("comma-separated increasing epochs, each < epochs ({epochs})"),
                });
            }
        }

        let errors = std::mem::take(&mut p.errors);
        match errors.len() {
            0 => {}
            1 => return Err(errors.into_iter().next().expect("one error")),
            _ => return Err(HyperparameterError::Several(errors)),
        }
        // Every field parsed (no errors were recorded), so each Option is Some.
        let hp = (|| {
            Some(Hyperparameters {
                backbone: backbone?,
                use_pretrained_model: use_pretrained_model?,
                algorithm: algorithm?,
                num_classes: u32::try_from(num_classes?).ok()?,
                num_training_samples: num_training_samples?,
                base_size: u32::try_from(base_size?).ok()?,
                crop_size: crate::data::augment::round_crop_size(u32::try_from(crop_size?).ok()?),
                epochs: u32::try_from(epochs?).ok()?,
                learning_rate: learning_rate?,
                mini_batch_size: u32::try_from(mini_batch_size?).ok()?,
                validation_mini_batch_size: u32::try_from(validation_mini_batch_size?).ok()?,
                optimizer: optimizer?,
                momentum: momentum?,
                weight_decay: weight_decay?,
                gamma1: gamma1?,
                gamma2: gamma2?,
                lr_scheduler: lr_scheduler?,
                lr_scheduler_factor: lr_scheduler_factor?,
                lr_scheduler_step: lr_scheduler_step?,
                early_stopping: early_stopping?,
                early_stopping_min_epochs: u32::try_from(early_stopping_min_epochs?).ok()?,
                early_stopping_patience: u32::try_from(early_stopping_patience?).ok()?,
                early_stopping_tolerance: early_stopping_tolerance?,
                syncbn: syncbn?,
                output_stride: OutputStride::try_from(u32::try_from(output_stride?).ok()?).ok()?,
                seed: seed?,
                precision: precision?,
            })
        })();
        hp.map(|hp| (hp, notes))
            .ok_or_else(|| HyperparameterError::Malformed("a value is out of range for its type".into()))
    }
}

pub fn find_spec(name: &str) -> Option<&'static Spec> {
    SPECS.iter().find(|s| s.name == name)
}

/// " (did you mean 'x'?)" when a known name is close, else "".
fn suggestion_for(name: &str) -> String {
    let lowered = name.to_ascii_lowercase().replace('-', "_");
    let best = SPECS
        .iter()
        .map(|s| (strsim::levenshtein(&lowered, s.name), s.name))
        .min_by_key(|&(distance, _)| distance);
    match best {
        Some((distance, known)) if distance <= (known.len() / 3).max(2) => format!(" (did you mean '{known}'?)"),
        _ => {
            let names: Vec<&str> = SPECS.iter().map(|s| s.name).collect();
            format!(" (known hyperparameters: {})", names.join(", "))
        }
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The text of one JSON value: strings as they are (unwrapping one extra level of JSON string encoding, which
/// some SDKs add), numbers and booleans as written.
fn scalar_text(name: &str, value: &Value) -> Result<String, HyperparameterError> {
    match value {
        Value::String(s) => {
            let trimmed = s.trim();
            if trimmed.len() >= 2 && trimmed.starts_with('"') && trimmed.ends_with('"') {
                if let Ok(Value::String(inner)) = serde_json::from_str::<Value>(trimmed) {
                    return Ok(inner);
                }
            }
            Ok(s.clone())
        }
        Value::Bool(b) => Ok(b.to_string()),
        Value::Number(n) => Ok(n.to_string()),
        other => Err(HyperparameterError::NotScalar {
            name: name.to_string(),
            kind: json_kind(other),
        }),
    }
}

/// Looks up raw values (or the spec's default) and records every error instead of stopping at the first.
struct Parser<'a> {
    raw: &'a BTreeMap<String, String>,
    errors: Vec<HyperparameterError>,
}

impl Parser<'_> {
    fn spec(name: &str) -> &'static Spec {
        find_spec(name).unwrap_or_else(|| panic!("hyperparameter '{name}' is parsed but missing from SPECS"))
    }

    fn raw_value(&self, name: &str) -> Option<String> {
        self.raw.get(name).cloned()
    }

    /// The given or default text, or None (with an error recorded) when a required one is absent.
    fn text(&mut self, name: &str) -> Option<String> {
        let spec = Self::spec(name);
        match (self.raw.get(name), spec.default) {
            (Some(value), _) => Some(value.trim().to_string()),
            (None, Some(default)) => Some(default.to_string()),
            (None, None) => {
                self.errors.push(HyperparameterError::Missing {
                    name: name.into(),
                    allowed: spec.allowed.into(),
                });
                None
            }
        }
    }

    fn invalid<T>(&mut self, name: &str, value: &str) -> Option<T> {
        self.errors.push(HyperparameterError::Invalid {
            name: name.into(),
            value: value.into(),
            allowed: Self::spec(name).allowed.into(),
        });
        None
    }

    fn choice<T: FromStr>(&mut self, name: &str) -> Option<T> {
        let text = self.text(name)?;
        match text.parse() {
            Ok(v) => Some(v),
            Err(_) => self.invalid(name, &text),
        }
    }

    fn boolean(&mut self, name: &str) -> Option<bool> {
        let text = self.text(name)?;
        match text.to_ascii_lowercase().as_str() {
            "true" => Some(true),
            "false" => Some(false),
            _ => self.invalid(name, &text),
        }
    }

    /// Integers, also written as integral numbers (`"10.0"`), checked by `ok`.
    fn integer(&mut self, name: &str, ok: impl Fn(u64) -> bool) -> Option<u64> {
        let text = self.text(name)?;
        let parsed = text.parse::<u64>().ok().or_else(|| {
            let x = text.parse::<f64>().ok()?;
            (x.is_finite() && x >= 0.0 && x.fract() == 0.0 && x <= u32::MAX as f64).then_some(x as u64)
        });
        match parsed {
            Some(v) if ok(v) => Some(v),
            _ => self.invalid(name, &text),
        }
    }

    fn number(&mut self, name: &str, ok: impl Fn(f64) -> bool) -> Option<f64> {
        let text = self.text(name)?;
        match text.parse::<f64>() {
            Ok(x) if x.is_finite() && ok(x) => Some(x),
            _ => self.invalid(name, &text),
        }
    }

    /// A comma-separated, strictly increasing list of positive epochs (empty allowed here; the step rule checks).
    fn epoch_list(&mut self, name: &str) -> Option<Vec<u32>> {
        let text = self.text(name)?;
        let trimmed = text.trim_matches(|c| c == '[' || c == ']').trim();
        if trimmed.is_empty() {
            return Some(Vec::new());
        }
        let parsed: Option<Vec<u32>> = trimmed.split(',').map(|part| part.trim().parse::<u32>().ok()).collect();
        match parsed {
            Some(list) if list.iter().all(|&e| e >= 1) && list.windows(2).all(|w| w[0] < w[1]) => Some(list),
            _ => self.invalid(name, &text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Hyperparameters, HyperparameterError> {
        Hyperparameters::from_json(json).map(|(hp, _)| hp)
    }

    const REQUIRED: &str = r#""num_classes": "21", "num_training_samples": "1464""#;

    #[test]
    fn defaults_match_the_built_in_algorithm() {
        let hp = parse(&format!("{{{REQUIRED}}}")).unwrap();
        assert_eq!(hp.backbone, Backbone::Resnet50);
        assert!(hp.use_pretrained_model);
        assert_eq!(hp.algorithm, Algorithm::Fcn);
        assert_eq!((hp.num_classes, hp.num_training_samples), (21, 1464));
        assert_eq!((hp.base_size, hp.crop_size), (520, 240));
        assert_eq!(hp.epochs, 10);
        assert_eq!(hp.learning_rate, 0.001);
        assert_eq!((hp.mini_batch_size, hp.validation_mini_batch_size), (16, 16));
        assert_eq!(hp.optimizer, OptimizerKind::Sgd);
        assert_eq!((hp.momentum, hp.weight_decay), (0.9, 0.0001));
        assert_eq!((hp.gamma1, hp.gamma2), (0.9, 0.9));
        assert_eq!(hp.lr_scheduler, LrScheduler::Poly);
        assert_eq!(hp.lr_scheduler_factor, 0.1);
        assert!(hp.lr_scheduler_step.is_empty());
        assert!(!hp.early_stopping);
        assert_eq!((hp.early_stopping_min_epochs, hp.early_stopping_patience), (5, 4));
        assert_eq!(hp.early_stopping_tolerance, 0.0);
        assert!(!hp.syncbn);
        assert_eq!(hp.output_stride, OutputStride::Eight);
        assert_eq!(hp.precision, Precision::Auto);
        // The default stays out of the JSON, so checkpoints written before `precision` existed still resume.
        assert!(serde_json::to_value(&hp).unwrap().get("precision").is_none());
    }

    #[test]
    fn precision_is_parsed_and_recorded_when_not_the_default() {
        let hp = parse(&format!(r#"{{{REQUIRED}, "precision": "BF16"}}"#)).unwrap();
        assert_eq!(hp.precision, Precision::Bf16);
        assert_eq!(serde_json::to_value(&hp).unwrap()["precision"], "bf16");
    }

    #[test]
    fn strings_json_scalars_and_double_encoded_strings_are_accepted() {
        let hp = parse(
            r#"{"num_classes": 3, "num_training_samples": 10.0, "use_pretrained_model": false,
                "early_stopping": "true", "syncbn": "TRUE", "algorithm": "\"deeplab\"", "learning_rate": 0.5,
                "backbone": "ResNet-101"}"#,
        )
        .unwrap();
        assert_eq!((hp.num_classes, hp.num_training_samples), (3, 10));
        assert!(!hp.use_pretrained_model && hp.early_stopping && hp.syncbn);
        assert_eq!(hp.algorithm, Algorithm::Deeplab);
        assert_eq!(hp.learning_rate, 0.5);
        assert_eq!(hp.backbone, Backbone::Resnet101);
    }

    #[test]
    fn crop_size_is_rounded_up_to_a_multiple_of_8() {
        let hp = parse(&format!(r#"{{{REQUIRED}, "crop_size": "241"}}"#)).unwrap();
        assert_eq!(hp.crop_size, 248);
        let hp = parse(&format!(r#"{{{REQUIRED}, "crop_size": "480"}}"#)).unwrap();
        assert_eq!(hp.crop_size, 480);
    }

    #[test]
    fn required_hyperparameters_are_named_when_missing() {
        let err = parse(r#"{"num_classes": "4"}"#).unwrap_err().to_string();
        assert!(err.contains("'num_training_samples' is required"), "{err}");
        let err = parse("{}").unwrap_err().to_string();
        assert!(err.contains("'num_classes' is required") && err.contains("'num_training_samples' is required"));
    }

    /// Each rule: the value is rejected and the message names the hyperparameter, the value and what is allowed.
    #[test]
    fn every_range_rule_names_the_hyperparameter_value_and_allowed_values() {
        let bad = [
            ("num_classes", "1", "from 2 to 254"),
            ("num_classes", "255", "from 2 to 254"),
            ("num_classes", "ten", "from 2 to 254"),
            ("num_training_samples", "0", "positive"),
            ("base_size", "16", "> 16"),
            ("crop_size", "8", "> 16"),
            ("epochs", "0", "positive"),
            ("epochs", "-3", "positive"),
            ("learning_rate", "0", "0 < x <= 1"),
            ("learning_rate", "1.5", "0 < x <= 1"),
            ("learning_rate", "NaN", "0 < x <= 1"),
            ("mini_batch_size", "0", "positive"),
            ("validation_mini_batch_size", "2.5", "positive"),
            ("momentum", "0", "0 < x <= 1"),
            ("weight_decay", "1", "0 <= x < 1"),
            ("gamma1", "-0.1", "0 <= x <= 1"),
            ("gamma2", "2", "0 <= x <= 1"),
            ("lr_scheduler_factor", "0", "0 < x <= 1"),
            ("lr_scheduler_step", "5,3", "increasing"),
            ("lr_scheduler_step", "a,b", "increasing"),
            ("early_stopping_min_epochs", "-1", "non-negative"),
            ("early_stopping_patience", "x", "non-negative"),
            ("early_stopping_tolerance", "1.5", "0 <= x <= 1"),
            ("backbone", "resnet-152", "resnet-50, resnet-101"),
            ("algorithm", "unet", "fcn, psp, deeplab"),
            ("optimizer", "adamw", "sgd, nag, adam, adagrad, rmsprop"),
            ("lr_scheduler", "linear", "poly, step, cosine"),
            ("use_pretrained_model", "yes", "True, False"),
            ("early_stopping", "1", "True, False"),
            ("syncbn", "maybe", "True, False"),
            ("output_stride", "32", "8, 16"),
            ("precision", "fp16", "auto, fp32, bf16"),
        ];
        for (name, value, allowed) in bad {
            let err = parse(&format!(r#"{{{REQUIRED}, "{name}": "{value}"}}"#)).unwrap_err();
            let text = err.to_string();
            assert!(
                matches!(err, HyperparameterError::Invalid { .. }),
                "{name}={value}: {text}"
            );
            assert!(text.contains(&format!("'{name}'")), "{text}");
            assert!(text.contains(&format!("'{value}'")), "{text}");
            assert!(text.contains(allowed), "{name}={value}: {text}");
        }
    }

    #[test]
    fn step_schedule_needs_steps_below_epochs() {
        let base = format!(r#"{REQUIRED}, "lr_scheduler": "step", "epochs": "10""#);
        let err = parse(&format!("{{{base}}}")).unwrap_err().to_string();
        assert!(err.contains("'lr_scheduler_step' is required"), "{err}");
        let err = parse(&format!(r#"{{{base}, "lr_scheduler_step": "4,10"}}"#))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("'lr_scheduler_step'") && err.contains("< epochs (10)"),
            "{err}"
        );
        let hp = parse(&format!(r#"{{{base}, "lr_scheduler_step": "4, 8"}}"#)).unwrap();
        assert_eq!(hp.lr_scheduler_step, vec![4, 8]);
    }

    #[test]
    fn unknown_names_suggest_the_closest_known_one() {
        let err = parse(&format!(r#"{{{REQUIRED}, "learning_rat": "0.1"}}"#))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unknown hyperparameter 'learning_rat' (did you mean 'learning_rate'?)"),
            "{err}"
        );
        let err = parse(&format!(r#"{{{REQUIRED}, "num-classes": "3"}}"#))
            .unwrap_err()
            .to_string();
        assert!(err.contains("did you mean 'num_classes'?"), "{err}");
        let err = parse(&format!(r#"{{{REQUIRED}, "zzzzzzzzzz": "3"}}"#))
            .unwrap_err()
            .to_string();
        assert!(err.contains("known hyperparameters: backbone,"), "{err}");
    }

    #[test]
    fn reserved_sagemaker_names_are_ignored_and_reported() {
        let (hp, notes) = Hyperparameters::from_json(&format!(
            r#"{{{REQUIRED}, "sagemaker_program": "x", "sagemaker_region": "y"}}"#
        ))
        .unwrap();
        assert_eq!(hp.num_classes, 21);
        assert_eq!(notes.ignored_reserved, vec!["sagemaker_program", "sagemaker_region"]);
    }

    #[test]
    fn several_errors_are_reported_together() {
        let err = parse(r#"{"num_classes": "1", "num_training_samples": "5", "epochs": "0"}"#).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, HyperparameterError::Several(ref v) if v.len() == 2),
            "{text}"
        );
        assert!(text.contains("'num_classes'") && text.contains("'epochs'"), "{text}");
    }

    #[test]
    fn malformed_files_are_rejected() {
        assert!(matches!(parse("[1,2]"), Err(HyperparameterError::Malformed(_))));
        assert!(matches!(parse("{not json"), Err(HyperparameterError::Malformed(_))));
        let err = parse(&format!(r#"{{{REQUIRED}, "epochs": [1]}}"#))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("'epochs' must be a string, number or boolean, not an array"),
            "{err}"
        );
        let many: Vec<String> = (0..101).map(|i| format!(r#""sagemaker_{i}": "x""#)).collect();
        assert!(matches!(
            parse(&format!("{{{}}}", many.join(","))),
            Err(HyperparameterError::TooMany(101))
        ));
    }

    #[test]
    fn every_spec_default_parses() {
        // The defaults live in SPECS as text; a typo there would only show up at run time without this test.
        let hp = parse(&format!("{{{REQUIRED}}}"));
        assert!(hp.is_ok(), "{hp:?}");
        for spec in SPECS {
            assert_eq!(
                spec.default.is_none(),
                matches!(spec.name, "num_classes" | "num_training_samples")
            );
        }
    }
}

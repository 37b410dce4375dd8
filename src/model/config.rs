//! What a model is: algorithm (head), backbone, number of classes, output stride, auxiliary head.
//!
//! The string forms are the SageMaker built-in's hyperparameter values (`fcn`, `psp`, `deeplab`, `resnet-50`, ...),
//! so the same words appear in hyperparameters, `model.json` and the CLI.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The segmentation head.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    /// torchvision FCNHead: 3×3 conv to in/4 channels, BN, ReLU, dropout 0.1, 1×1 conv.
    Fcn,
    /// Pyramid pooling (bins 1/2/3/6), as the peer's PSPHead and mmseg's.
    Psp,
    /// torchvision DeepLabHead: ASPP (three atrous rates + image pooling), 3×3 conv, 1×1 conv.
    Deeplab,
}

impl Algorithm {
    pub const ALL: [Algorithm; 3] = [Algorithm::Fcn, Algorithm::Psp, Algorithm::Deeplab];

    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Fcn => "fcn",
            Algorithm::Psp => "psp",
            Algorithm::Deeplab => "deeplab",
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Algorithm {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Algorithm::ALL
            .into_iter()
            .find(|a| a.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| ConfigError::UnknownAlgorithm(s.to_string()))
    }
}

/// The ResNet backbone (torchvision v1.5 layout).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Backbone {
    #[serde(rename = "resnet-18")]
    Resnet18,
    #[serde(rename = "resnet-34")]
    Resnet34,
    #[serde(rename = "resnet-50")]
    Resnet50,
    #[serde(rename = "resnet-101")]
    Resnet101,
}

impl Backbone {
    pub const ALL: [Backbone; 4] = [
        Backbone::Resnet18,
        Backbone::Resnet34,
        Backbone::Resnet50,
        Backbone::Resnet101,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Backbone::Resnet18 => "resnet-18",
            Backbone::Resnet34 => "resnet-34",
            Backbone::Resnet50 => "resnet-50",
            Backbone::Resnet101 => "resnet-101",
        }
    }

    /// Blocks per stage (layer1..layer4).
    pub fn depths(self) -> [usize; 4] {
        match self {
            Backbone::Resnet18 => [2, 2, 2, 2],
            Backbone::Resnet34 | Backbone::Resnet50 => [3, 4, 6, 3],
            Backbone::Resnet101 => [3, 4, 23, 3],
        }
    }

    /// Bottleneck blocks (expansion 4) for 50/101, basic blocks (expansion 1) for 18/34.
    pub fn bottleneck(self) -> bool {
        matches!(self, Backbone::Resnet50 | Backbone::Resnet101)
    }

    fn expansion(self) -> usize {
        if self.bottleneck() {
            4
        } else {
            1
        }
    }

    /// Channels of layer3's output (the auxiliary head's input).
    pub fn layer3_channels(self) -> usize {
        256 * self.expansion()
    }

    /// Channels of layer4's output (the main head's input).
    pub fn layer4_channels(self) -> usize {
        512 * self.expansion()
    }
}

impl fmt::Display for Backbone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Backbone {
    type Err = ConfigError;
    /// Accepts `resnet-50`, `resnet50` and `resnet_50`, any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let norm: String = s
            .trim()
            .chars()
            .filter(|c| *c != '-' && *c != '_')
            .collect::<String>()
            .to_ascii_lowercase();
        Backbone::ALL
            .into_iter()
            .find(|b| b.as_str().replace('-', "") == norm)
            .ok_or_else(|| ConfigError::UnknownBackbone(s.to_string()))
    }
}

/// Ratio of input size to the backbone's feature size: 8 dilates layer3 and layer4, 16 only layer4.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub enum OutputStride {
    Eight,
    Sixteen,
}

impl OutputStride {
    pub fn value(self) -> u32 {
        match self {
            OutputStride::Eight => 8,
            OutputStride::Sixteen => 16,
        }
    }

    /// torchvision's `replace_stride_with_dilation` for layer2, layer3, layer4.
    pub fn replace_stride_with_dilation(self) -> [bool; 3] {
        match self {
            OutputStride::Eight => [false, true, true],
            OutputStride::Sixteen => [false, false, true],
        }
    }

    /// ASPP atrous rates: torchvision's 12/24/36 at stride 8, the DeepLabV3 paper's 6/12/18 at 16.
    pub fn aspp_rates(self) -> [usize; 3] {
        match self {
            OutputStride::Eight => [12, 24, 36],
            OutputStride::Sixteen => [6, 12, 18],
        }
    }
}

impl TryFrom<u32> for OutputStride {
    type Error = ConfigError;
    fn try_from(v: u32) -> Result<Self, Self::Error> {
        match v {
            8 => Ok(OutputStride::Eight),
            16 => Ok(OutputStride::Sixteen),
            other => Err(ConfigError::OutputStride(other)),
        }
    }
}

impl From<OutputStride> for u32 {
    fn from(o: OutputStride) -> u32 {
        o.value()
    }
}

impl fmt::Display for OutputStride {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.value())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("unknown algorithm {0:?}: use fcn, psp or deeplab")]
    UnknownAlgorithm(String),
    #[error("unknown backbone {0:?}: use resnet-18, resnet-34, resnet-50 or resnet-101")]
    UnknownBackbone(String),
    #[error("output stride {0} is not supported: use 8 or 16")]
    OutputStride(u32),
    #[error("num_classes must be at least 1")]
    NoClasses,
}

/// Everything needed to build a network's structure (not its weights).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub algorithm: Algorithm,
    pub backbone: Backbone,
    pub num_classes: usize,
    pub output_stride: OutputStride,
    /// Build the auxiliary FCN head on layer3 (`aux_classifier.*`), used as an extra loss in training.
    pub aux: bool,
}

impl ModelConfig {
    pub fn new(
        algorithm: Algorithm,
        backbone: Backbone,
        num_classes: usize,
        output_stride: OutputStride,
        aux: bool,
    ) -> Result<Self, ConfigError> {
        if num_classes == 0 {
            return Err(ConfigError::NoClasses);
        }
        Ok(Self {
            algorithm,
            backbone,
            num_classes,
            output_stride,
            aux,
        })
    }
}

impl fmt::Display for ModelConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} on {} ({} classes, output stride {}{})",
            self.algorithm,
            self.backbone,
            self.num_classes,
            self.output_stride,
            if self.aux { ", aux head" } else { "" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sagemaker_words() {
        assert_eq!("deeplab".parse::<Algorithm>(), Ok(Algorithm::Deeplab));
        assert_eq!("PSP".parse::<Algorithm>(), Ok(Algorithm::Psp));
        assert!("unet".parse::<Algorithm>().is_err());
        assert_eq!("resnet-50".parse::<Backbone>(), Ok(Backbone::Resnet50));
        assert_eq!("ResNet101".parse::<Backbone>(), Ok(Backbone::Resnet101));
        assert_eq!("resnet_18".parse::<Backbone>(), Ok(Backbone::Resnet18));
        assert!("resnet-152".parse::<Backbone>().is_err());
        assert_eq!(OutputStride::try_from(16), Ok(OutputStride::Sixteen));
        assert_eq!(OutputStride::try_from(32), Err(ConfigError::OutputStride(32)));
    }

    #[test]
    fn serde_uses_the_same_words() {
        let cfg = ModelConfig::new(Algorithm::Psp, Backbone::Resnet101, 5, OutputStride::Sixteen, true).unwrap();
        let s = serde_json::to_string(&cfg).unwrap();
        assert!(
            s.contains("\"psp\"") && s.contains("\"resnet-101\"") && s.contains("\"output_stride\":16"),
            "{s}"
        );
        let back: ModelConfig = serde_json::from_str(&s).unwrap();
        assert_eq!(back, cfg);
        assert!(serde_json::from_str::<OutputStride>("32").is_err());
        assert_eq!(
            ModelConfig::new(Algorithm::Fcn, Backbone::Resnet18, 0, OutputStride::Eight, false),
            Err(ConfigError::NoClasses)
        );
    }
}

//! The optional `label_map` channel: how raw annotation pixel values encode training labels.
//!
//! The channel directory may hold `train_label_map.json` and `validation_label_map.json`. Each is one of
//! - `{"scale": 3}` (or `"3"`): label = floor(pixel / scale) for a positive integer scale 1..=255. Values that do
//!   not divide evenly are floored (pixel 7 with scale 3 is label 2), as the built-in algorithm documents;
//! - `{"map": {"0": 5, "1": 0, "2": 2}}`: key = training label (0..=254), value = the pixel value that encodes it
//!   (0..=254; numbers or strings). Pixel 5 means label 0. Two labels may not share a pixel value. A pixel value
//!   without an entry is an error when an annotation containing it is loaded (see [`UnmappedPixel`]).
//!
//! Without the channel (or without a file) the map is `scale 1`: pixel value = label. If only the train file exists,
//! validation uses it too. Raw pixel 255 always stays 255, the ignore label, whatever the map says.
//!
//! [`LabelMap::lut`] compiles a map into a 256-entry [`LabelLut`], which is what the data loader applies per pixel.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use image::GrayImage;
use serde_json::Value;

use super::IGNORE_LABEL;

/// File name of the training label map inside the `label_map` channel.
pub const TRAIN_FILE: &str = "train_label_map.json";
/// File name of the validation label map inside the `label_map` channel.
pub const VALIDATION_FILE: &str = "validation_label_map.json";

/// Why a label-map file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LabelMapError {
    #[error("label map {}: cannot read the file: {err}; check that it is readable", file.display())]
    Read {
        file: PathBuf,
        #[source]
        err: std::io::Error,
    },
    #[error(
        "label_map channel {}: cannot list the directory: {err}; check the channel's path and permissions",
        dir.display()
    )]
    ReadDir {
        dir: PathBuf,
        #[source]
        err: std::io::Error,
    },
    #[error(
        "label_map channel {}: contains neither {TRAIN_FILE} nor {VALIDATION_FILE} (found: {found}); name the \
         files exactly so, or leave the channel out to use pixel value = label",
        dir.display()
    )]
    NoFiles { dir: PathBuf, found: String },
    #[error("label map {file}: {problem}")]
    Invalid { file: MapSource, problem: String },
}

impl LabelMapError {
    fn invalid(problem: impl Into<String>) -> Self {
        Self::Invalid {
            file: MapSource(None),
            problem: problem.into(),
        }
    }

    fn with_file(self, path: &Path) -> Self {
        match self {
            Self::Invalid { problem, .. } => Self::Invalid {
                file: MapSource(Some(path.to_path_buf())),
                problem,
            },
            other => other,
        }
    }
}

/// Names a label-map source in messages: the file path when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapSource(pub Option<PathBuf>);

impl fmt::Display for MapSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(p) => write!(f, "{}", p.display()),
            None => f.write_str("(JSON)"),
        }
    }
}

/// A raw pixel value in an annotation that a `map` label map has no entry for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "pixel value{} {} {} no entry in the label map ({count} pixels, the first at x={first_x}, y={first_y}); \
     add {} to \"map\" or set such pixels to 255 (ignore)",
    if values.len() > 1 { "s" } else { "" },
    list_values(values),
    if values.len() > 1 { "have" } else { "has" },
    if values.len() > 1 { "them" } else { "it" }
)]
pub struct UnmappedPixel {
    /// Every distinct unmapped value present, ascending.
    pub values: Vec<u8>,
    /// How many pixels carry an unmapped value.
    pub count: u64,
    pub first_x: u32,
    pub first_y: u32,
}

fn list_values(values: &[u8]) -> String {
    let shown: Vec<String> = values.iter().take(10).map(u8::to_string).collect();
    let more = values.len().saturating_sub(10);
    if more > 0 {
        format!("{} and {more} more", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

/// One parsed label-map file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelMap {
    /// label = floor(pixel / scale); 255 stays 255.
    Scale(u8),
    /// training label → the pixel value that encodes it.
    Map(BTreeMap<u8, u8>),
}

impl Default for LabelMap {
    fn default() -> Self {
        Self::Scale(1)
    }
}

/// Reads a positive integer from a JSON number (integral) or a string holding one.
fn json_int(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() < 1e15)
                .map(|f| f as i64)
        }),
        Value::String(s) => s.trim().parse::<i64>().ok(),
        _ => None,
    }
}

impl LabelMap {
    /// Parse the JSON text of a label-map file.
    pub fn parse(json: &str) -> Result<Self, LabelMapError> {
        let value: Value = serde_json::from_str(json).map_err(|e| {
            LabelMapError::invalid(format!(
                "not valid JSON ({e}); expected {{\"scale\": 3}} or {{\"map\": {{\"0\": 5, \"1\": 0}}}}"
            ))
        })?;
        let Value::Object(obj) = value else {
            return Err(LabelMapError::invalid(format!(
                "expected a JSON object with \"scale\" or \"map\", got {value}"
            )));
        };
        if let Some(k) = obj.keys().find(|k| *k != "scale" && *k != "map") {
            return Err(LabelMapError::invalid(format!(
                "unknown key \"{k}\"; a label map has exactly one of \"scale\" or \"map\""
            )));
        }
        match (obj.get("scale"), obj.get("map")) {
            (Some(_), Some(_)) => Err(LabelMapError::invalid(
                "has both \"scale\" and \"map\"; keep exactly one of them",
            )),
            (None, None) => Err(LabelMapError::invalid(
                "is empty; give {\"scale\": N} or {\"map\": {\"<label>\": <pixel value>, ...}}",
            )),
            (Some(s), None) => match json_int(s) {
                Some(n) if (1..=255).contains(&n) => Ok(Self::Scale(n as u8)),
                _ => Err(LabelMapError::invalid(format!(
                    "\"scale\" is {s}; it must be a positive integer 1..=255 (string or number), the factor \
                     between labels and pixel values"
                ))),
            },
            (None, Some(m)) => Self::parse_map(m),
        }
    }

    fn parse_map(m: &Value) -> Result<Self, LabelMapError> {
        let Value::Object(entries) = m else {
            return Err(LabelMapError::invalid(format!(
                "\"map\" is {m}; it must be an object from label to pixel value, e.g. {{\"0\": 5, \"1\": 0}}"
            )));
        };
        if entries.is_empty() {
            return Err(LabelMapError::invalid(
                "\"map\" is empty; list every label with the pixel value that encodes it",
            ));
        }
        let mut map = BTreeMap::new();
        let mut by_pixel: BTreeMap<u8, u8> = BTreeMap::new();
        for (k, v) in entries {
            let label = match k.trim().parse::<i64>() {
                Ok(n) if (0..=254).contains(&n) => n as u8,
                _ => return Err(LabelMapError::invalid(format!(
                    "\"map\" key \"{k}\" is not a training label; keys must be integers 0..=254 \
                         (255 is the ignore label)"
                ))),
            };
            let pixel = match json_int(v) {
                Some(n) if (0..=254).contains(&n) => n as u8,
                _ => return Err(LabelMapError::invalid(format!(
                    "\"map\" value for label \"{k}\" is {v}; values must be pixel values 0..=254 \
                         (255 always means ignore)"
                ))),
            };
            if let Some(other) = by_pixel.insert(pixel, label) {
                return Err(LabelMapError::invalid(format!(
                    "\"map\" gives pixel value {pixel} to both label {other} and label {label}; each pixel value \
                     may encode only one label"
                )));
            }
            map.insert(label, pixel);
        }
        Ok(Self::Map(map))
    }

    /// Read and parse a label-map file; errors name it.
    pub fn read(path: &Path) -> Result<Self, LabelMapError> {
        let text = std::fs::read_to_string(path).map_err(|err| LabelMapError::Read {
            file: path.to_path_buf(),
            err,
        })?;
        Self::parse(&text).map_err(|e| e.with_file(path))
    }

    /// Compile into the per-pixel lookup table.
    pub fn lut(&self) -> LabelLut {
        let mut table = [None; 256];
        match self {
            Self::Scale(s) => {
                let s = (*s).max(1);
                for (p, slot) in table.iter_mut().enumerate().take(255) {
                    *slot = Some(p as u8 / s);
                }
            }
            Self::Map(m) => {
                for (&label, &pixel) in m {
                    table[usize::from(pixel)] = Some(label);
                }
            }
        }
        table[usize::from(IGNORE_LABEL)] = Some(IGNORE_LABEL);
        LabelLut::from_table(table)
    }
}

/// The label maps for both splits.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LabelMaps {
    pub train: LabelMap,
    pub validation: LabelMap,
}

impl LabelMaps {
    /// Load from the `label_map` channel directory, or the defaults (scale 1) when there is no channel.
    pub fn load(channel_dir: Option<&Path>) -> Result<Self, LabelMapError> {
        let Some(dir) = channel_dir else {
            return Ok(Self::default());
        };
        let train_path = dir.join(TRAIN_FILE);
        let val_path = dir.join(VALIDATION_FILE);
        let (has_train, has_val) = (train_path.is_file(), val_path.is_file());
        if !has_train && !has_val {
            let entries = std::fs::read_dir(dir).map_err(|err| LabelMapError::ReadDir {
                dir: dir.to_path_buf(),
                err,
            })?;
            let mut names: Vec<String> = entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            let found = if names.is_empty() {
                "nothing".to_string()
            } else {
                list_names(&names)
            };
            return Err(LabelMapError::NoFiles {
                dir: dir.to_path_buf(),
                found,
            });
        }
        let train = if has_train {
            LabelMap::read(&train_path)?
        } else {
            tracing::warn!(
                "label_map channel {} has {VALIDATION_FILE} but no {TRAIN_FILE}: training annotations use pixel \
                 value = label (scale 1)",
                dir.display()
            );
            LabelMap::default()
        };
        let validation = if has_val {
            LabelMap::read(&val_path)?
        } else {
            tracing::info!(
                "label_map channel {} has no {VALIDATION_FILE}: validation annotations use {TRAIN_FILE} too",
                dir.display()
            );
            train.clone()
        };
        Ok(Self { train, validation })
    }
}

fn list_names(names: &[String]) -> String {
    let mut s = names.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > 5 {
        s.push_str(&format!(" and {} more", names.len() - 5));
    }
    s
}

/// A compiled label map: raw pixel value → training label (or unmapped), 256 entries.
#[derive(Clone, PartialEq, Eq)]
pub struct LabelLut {
    table: [u8; 256],
    valid: [bool; 256],
    all_valid: bool,
}

impl fmt::Debug for LabelLut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let entries: Vec<(usize, u8)> = (0..256)
            .filter(|&i| self.valid[i])
            .map(|i| (i, self.table[i]))
            .collect();
        f.debug_struct("LabelLut")
            .field("entries", &entries)
            .finish()
    }
}

impl Default for LabelLut {
    fn default() -> Self {
        LabelMap::default().lut()
    }
}

impl LabelLut {
    fn from_table(entries: [Option<u8>; 256]) -> Self {
        let mut table = [0u8; 256];
        let mut valid = [false; 256];
        for (i, e) in entries.iter().enumerate() {
            if let Some(v) = e {
                table[i] = *v;
                valid[i] = true;
            }
        }
        Self {
            table,
            valid,
            all_valid: valid.iter().all(|&v| v),
        }
    }

    /// The identity map (scale 1).
    pub fn identity() -> Self {
        Self::default()
    }

    /// The label for one raw pixel value, or `None` if the map has no entry for it.
    pub fn get(&self, raw: u8) -> Option<u8> {
        self.valid[usize::from(raw)].then_some(self.table[usize::from(raw)])
    }

    /// Replace every raw value by its label, in place. On error the image is left unchanged and the error lists
    /// every unmapped value (the caller adds the annotation's file name).
    pub fn apply(&self, raw: &mut GrayImage) -> Result<(), UnmappedPixel> {
        if !self.all_valid {
            let mut first = None;
            let mut count = 0u64;
            let mut seen = [false; 256];
            for (i, &v) in raw.as_raw().iter().enumerate() {
                if !self.valid[usize::from(v)] {
                    first.get_or_insert(i);
                    count += 1;
                    seen[usize::from(v)] = true;
                }
            }
            if let Some(i) = first {
                let w = raw.width().max(1) as usize;
                return Err(UnmappedPixel {
                    values: (0..=255u8).filter(|&v| seen[usize::from(v)]).collect(),
                    count,
                    first_x: (i % w) as u32,
                    first_y: (i / w) as u32,
                });
            }
        }
        for v in raw.iter_mut() {
            *v = self.table[usize::from(*v)];
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(values: &[u8]) -> GrayImage {
        GrayImage::from_raw(values.len() as u32, 1, values.to_vec()).expect("image")
    }

    #[test]
    fn scale_floors_and_keeps_255() {
        for json in [
            r#"{"scale": "3"}"#,
            r#"{"scale": 3}"#,
            r#"{"scale": 3.0}"#,
            r#"{"scale": " 3 "}"#,
        ] {
            assert_eq!(
                LabelMap::parse(json).expect(json),
                LabelMap::Scale(3),
                "{json}"
            );
        }
        let lut = LabelMap::Scale(3).lut();
        let mut im = img(&[0, 3, 6, 7, 8, 9, 254, 255]);
        lut.apply(&mut im).expect("scale maps everything");
        assert_eq!(im.as_raw(), &vec![0, 1, 2, 2, 2, 3, 84, 255]);
        let mut im = img(&[0, 255, 200]);
        LabelMap::Scale(255)
            .lut()
            .apply(&mut im)
            .expect("scale 255");
        assert_eq!(im.as_raw(), &vec![0, 255, 0]);
    }

    #[test]
    fn default_is_identity() {
        let lut = LabelLut::default();
        let all: Vec<u8> = (0..=255).collect();
        let mut im = img(&all);
        lut.apply(&mut im).expect("identity");
        assert_eq!(im.as_raw(), &all);
        assert_eq!(
            LabelMaps::load(None).expect("default"),
            LabelMaps::default()
        );
        assert_eq!(LabelMaps::default().train, LabelMap::Scale(1));
    }

    #[test]
    fn map_translates_pixel_values_to_labels() {
        let m = LabelMap::parse(r#"{"map": {"0": 5, "1": 0, "2": "2"}}"#).expect("parse");
        let lut = m.lut();
        assert_eq!(lut.get(5), Some(0));
        assert_eq!(lut.get(0), Some(1));
        assert_eq!(lut.get(2), Some(2));
        assert_eq!(lut.get(255), Some(255));
        assert_eq!(lut.get(1), None);
        let mut im = img(&[5, 0, 2, 255, 5]);
        lut.apply(&mut im).expect("all mapped");
        assert_eq!(im.as_raw(), &vec![0, 1, 2, 255, 0]);
    }

    #[test]
    fn map_names_unmapped_values_and_leaves_image_untouched() {
        let lut = LabelMap::parse(r#"{"map": {"0": 5, "1": 0}}"#)
            .expect("parse")
            .lut();
        let raw = GrayImage::from_raw(3, 2, vec![5, 0, 5, 0, 9, 7]).expect("image");
        let mut im = raw.clone();
        let err = lut.apply(&mut im).expect_err("9 and 7 unmapped");
        assert_eq!(err.values, vec![7, 9]);
        assert_eq!((err.count, err.first_x, err.first_y), (2, 1, 1));
        assert_eq!(im, raw);
        let msg = err.to_string();
        assert!(
            msg.contains("pixel values 7, 9 have no entry") && msg.contains("x=1, y=1"),
            "{msg}"
        );
        let one = lut.apply(&mut img(&[3])).expect_err("3").to_string();
        assert!(one.contains("pixel value 3 has no entry"), "{one}");
    }

    #[test]
    fn bad_json_and_values_name_the_key_and_value() {
        let cases: &[(&str, &[&str])] = &[
            ("not json", &["not valid JSON"]),
            ("[1,2]", &["JSON object"]),
            ("{}", &["is empty"]),
            (r#"{"scale": 0}"#, &["\"scale\" is 0", "1..=255"]),
            (r#"{"scale": "-2"}"#, &["\"scale\" is \"-2\""]),
            (r#"{"scale": "abc"}"#, &["\"scale\" is \"abc\""]),
            (r#"{"scale": 2.5}"#, &["\"scale\" is 2.5"]),
            (r#"{"scale": 256}"#, &["\"scale\" is 256"]),
            (r#"{"scale": 2, "map": {}}"#, &["both"]),
            (r#"{"scales": 2}"#, &["unknown key \"scales\""]),
            (r#"{"map": []}"#, &["\"map\" is []"]),
            (r#"{"map": {}}"#, &["\"map\" is empty"]),
            (r#"{"map": {"cat": 1}}"#, &["key \"cat\"", "0..=254"]),
            (r#"{"map": {"255": 1}}"#, &["key \"255\""]),
            (r#"{"map": {"1": 300}}"#, &["label \"1\" is 300"]),
            (r#"{"map": {"1": 255}}"#, &["label \"1\" is 255"]),
            (r#"{"map": {"1": "x"}}"#, &["label \"1\" is \"x\""]),
            (
                r#"{"map": {"0": 4, "1": "4"}}"#,
                &["pixel value 4 to both label 0 and label 1"],
            ),
        ];
        for (json, needles) in cases {
            let msg = LabelMap::parse(json).expect_err(json).to_string();
            for n in *needles {
                assert!(msg.contains(n), "{json}: {msg:?} lacks {n:?}");
            }
        }
    }

    #[test]
    fn channel_loading_rules() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let msg = LabelMaps::load(Some(d))
            .expect_err("empty channel")
            .to_string();
        assert!(
            msg.contains(TRAIN_FILE) && msg.contains("found: nothing"),
            "{msg}"
        );
        std::fs::write(d.join("labels.json"), "{}").expect("write");
        let msg = LabelMaps::load(Some(d)).expect_err("misnamed").to_string();
        assert!(msg.contains("found: labels.json"), "{msg}");

        std::fs::write(d.join(TRAIN_FILE), r#"{"scale": "2"}"#).expect("write");
        let maps = LabelMaps::load(Some(d)).expect("train only");
        assert_eq!(maps.train, LabelMap::Scale(2));
        assert_eq!(
            maps.validation,
            LabelMap::Scale(2),
            "validation falls back to the train map"
        );

        std::fs::write(d.join(VALIDATION_FILE), r#"{"map": {"0": 1, "1": 0}}"#).expect("write");
        let maps = LabelMaps::load(Some(d)).expect("both");
        assert_eq!(maps.train, LabelMap::Scale(2));
        assert_eq!(
            maps.validation,
            LabelMap::Map([(0, 1), (1, 0)].into_iter().collect())
        );

        std::fs::remove_file(d.join(TRAIN_FILE)).expect("rm");
        let maps = LabelMaps::load(Some(d)).expect("validation only");
        assert_eq!(maps.train, LabelMap::Scale(1));

        std::fs::write(d.join(VALIDATION_FILE), r#"{"scale": "zero"}"#).expect("write");
        let msg = LabelMaps::load(Some(d)).expect_err("bad file").to_string();
        assert!(
            msg.contains(VALIDATION_FILE) && msg.contains("\"scale\" is \"zero\""),
            "{msg}"
        );
    }
}

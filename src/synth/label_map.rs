//! Label encoding: the annotation pixel value of each training label for a [`LabelMapStyle`], and the JSON the
//! `label_map` channel gets for it.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{LabelMapStyle, SynthOptions};
use crate::data::IGNORE_LABEL;

/// The `label_map` JSON for a style: `{"scale": "1"}`, `{"scale": "<s>"}` or `{"map": {"0": p0, ...}}` (keys in label
/// order).
pub(super) fn label_map_json(style: LabelMapStyle, scale: u32, encoding: &[u8]) -> String {
    match style {
        LabelMapStyle::None => "{\"scale\": \"1\"}\n".to_string(),
        LabelMapStyle::Scale => format!("{{\"scale\": \"{scale}\"}}\n"),
        LabelMapStyle::Map => {
            let entries: Vec<String> = encoding
                .iter()
                .enumerate()
                .map(|(label, value)| format!("\"{label}\": {value}"))
                .collect();
            format!("{{\"map\": {{{}}}}}\n", entries.join(", "))
        }
    }
}

/// The annotation pixel value of each training label for the chosen style.
pub(super) fn encoding(opts: &SynthOptions) -> Vec<u8> {
    let n = opts.num_classes as usize;
    match opts.label_map {
        LabelMapStyle::None => (0..n).map(|l| l as u8).collect(),
        LabelMapStyle::Scale => (0..n).map(|l| (l as u32 * opts.label_scale) as u8).collect(),
        LabelMapStyle::Map => {
            let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
            rng.set_stream(0);
            let mut values: Vec<u8> = (0..IGNORE_LABEL).collect();
            loop {
                values.shuffle(&mut rng);
                // Non-trivial: not the identity on the labels in use.
                if values[..n].iter().enumerate().any(|(l, &v)| v as usize != l) {
                    return values[..n].to_vec();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::*;
    use std::collections::BTreeSet;

    #[test]
    fn label_map_none_writes_scale_1() {
        let tmp = tempfile::tempdir().unwrap();
        let summary = generate(&small(tmp.path())).unwrap();
        for name in ["train_label_map.json", "validation_label_map.json"] {
            assert_eq!(
                read_json(&tmp.path().join("label_map").join(name)),
                serde_json::json!({"scale": "1"})
            );
        }
        assert_eq!(summary.encoding, [0, 1, 2, 3]);
    }

    #[test]
    fn label_map_scale_encodes_label_times_scale() {
        let tmp = tempfile::tempdir().unwrap();
        let o = SynthOptions {
            label_map: LabelMapStyle::Scale,
            label_scale: 30,
            ..small(tmp.path())
        };
        let summary = generate(&o).unwrap();
        for name in ["train_label_map.json", "validation_label_map.json"] {
            assert_eq!(
                read_json(&tmp.path().join("label_map").join(name)),
                serde_json::json!({"scale": "30"})
            );
        }
        assert_eq!(summary.encoding, [0, 30, 60, 90]);
        for dir in ["train_annotation", "validation_annotation"] {
            let keys: BTreeSet<u8> = value_histogram(&tmp.path().join(dir)).keys().copied().collect();
            assert_eq!(keys, BTreeSet::from([0, 30, 60, 90, 255]), "{dir}");
        }
    }

    #[test]
    fn label_map_map_is_a_nontrivial_permutation_matching_the_pixels() {
        let tmp = tempfile::tempdir().unwrap();
        let o = SynthOptions {
            label_map: LabelMapStyle::Map,
            num_classes: 6,
            ..small(tmp.path())
        };
        let summary = generate(&o).unwrap();
        let json = read_json(&tmp.path().join("label_map/train_label_map.json"));
        assert_eq!(json, read_json(&tmp.path().join("label_map/validation_label_map.json")));
        let map = json["map"].as_object().expect("{\"map\": {...}}");
        assert_eq!(json.as_object().unwrap().len(), 1);
        let mut values = Vec::new();
        for label in 0..6 {
            let v = map[&label.to_string()].as_u64().expect("integer value") as u8;
            assert_eq!(v, summary.encoding[label]);
            values.push(v);
        }
        assert_eq!(map.len(), 6);
        assert!(!values.contains(&255));
        assert_eq!(values.iter().collect::<BTreeSet<_>>().len(), 6, "distinct values");
        assert_ne!(values, [0, 1, 2, 3, 4, 5], "non-trivial");
        for dir in ["train_annotation", "validation_annotation"] {
            let keys: BTreeSet<u8> = value_histogram(&tmp.path().join(dir)).keys().copied().collect();
            let expected: BTreeSet<u8> = values.iter().copied().chain([255]).collect();
            assert_eq!(keys, expected, "{dir}");
        }
    }
}

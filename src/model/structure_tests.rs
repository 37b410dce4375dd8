//! Names and shapes of every parameter against torchvision's state dicts (lists in `tests/fixtures/torchvision-keys/`,
//! copied from `../shared/fixtures` or derived by `scripts/make-parity-fixtures.py` for ResNet-18/34).

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::config::{Algorithm, Backbone, ModelConfig, OutputStride};
use super::weights::{expected_backbone_tensors, expected_tensors, TensorSpec, IGNORED_SUFFIX};

fn keys_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/torchvision-keys")
        .join(format!("{name}.txt"))
}

/// `name dtype [d0, d1, ...]` lines → name → shape, without `num_batches_tracked` (and without `fc.*`).
fn read_keys(name: &str) -> BTreeMap<String, Vec<usize>> {
    let path = keys_file(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let (key, rest) = line.split_once(' ').unwrap_or_else(|| panic!("bad line {line:?}"));
        let (_, shape) = rest.split_once(' ').unwrap_or_else(|| panic!("bad line {line:?}"));
        let dims: Vec<usize> = shape
            .trim_matches(|c| c == '[' || c == ']')
            .split(',')
            .filter(|d| !d.trim().is_empty())
            .map(|d| d.trim().parse().unwrap_or_else(|_| panic!("bad shape in {line:?}")))
            .collect();
        if !key.ends_with(IGNORED_SUFFIX) && !key.starts_with("fc.") {
            out.insert(key.to_string(), dims);
        }
    }
    assert!(out.len() > 50, "{name}: suspiciously few keys");
    out
}

fn as_map(specs: Vec<TensorSpec>) -> BTreeMap<String, Vec<usize>> {
    let n = specs.len();
    let map: BTreeMap<_, _> = specs.into_iter().map(|s| (s.name, s.shape)).collect();
    assert_eq!(map.len(), n, "a parameter name is used twice");
    map
}

fn assert_same(ours: &BTreeMap<String, Vec<usize>>, theirs: &BTreeMap<String, Vec<usize>>, what: &str) {
    let missing: Vec<_> = theirs.keys().filter(|k| !ours.contains_key(*k)).collect();
    let extra: Vec<_> = ours.keys().filter(|k| !theirs.contains_key(*k)).collect();
    let shapes: Vec<_> = ours
        .iter()
        .filter_map(|(k, s)| {
            theirs
                .get(k)
                .filter(|t| *t != s)
                .map(|t| format!("{k}: ours {s:?}, torchvision {t:?}"))
        })
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty() && shapes.is_empty(),
        "{what}: missing {missing:?}\nextra {extra:?}\nshapes {shapes:?}"
    );
}

fn model(algorithm: Algorithm, backbone: Backbone, aux: bool) -> ModelConfig {
    ModelConfig::new(algorithm, backbone, 21, OutputStride::Eight, aux).expect("valid config")
}

#[test]
fn segmentation_models_match_torchvision_state_dicts() {
    let cases = [
        ("fcn", Algorithm::Fcn, true),
        ("deeplabv3", Algorithm::Deeplab, true),
        ("pspnet", Algorithm::Psp, false),
    ];
    for backbone in Backbone::ALL {
        let depth = backbone.as_str().trim_start_matches("resnet-");
        for (prefix, algorithm, aux) in cases {
            let name = format!("{prefix}_resnet{depth}");
            if prefix == "pspnet" && depth == "101" {
                continue; // no list: the peer only builds pspnet_resnet50
            }
            let ours = as_map(expected_tensors(&model(algorithm, backbone, aux)).expect("structure"));
            assert_same(&ours, &read_keys(&name), &name);
        }
    }
}

#[test]
fn output_stride_changes_no_parameter() {
    for algorithm in Algorithm::ALL {
        let a = expected_tensors(&model(algorithm, Backbone::Resnet50, true)).expect("os8");
        let mut cfg = model(algorithm, Backbone::Resnet50, true);
        cfg.output_stride = OutputStride::Sixteen;
        assert_eq!(a, expected_tensors(&cfg).expect("os16"));
    }
}

#[test]
fn psp_aux_head_is_the_fcn_aux_head() {
    let with_aux = as_map(expected_tensors(&model(Algorithm::Psp, Backbone::Resnet50, true)).expect("psp"));
    let mut want = read_keys("pspnet_resnet50");
    want.extend(
        read_keys("fcn_resnet50")
            .into_iter()
            .filter(|(k, _)| k.starts_with("aux_classifier.")),
    );
    assert_same(&with_aux, &want, "pspnet_resnet50 + aux");
}

#[test]
fn backbones_match_torchvision_imagenet_names() {
    for backbone in Backbone::ALL {
        let name = backbone.as_str().replace('-', "");
        let ours = as_map(expected_backbone_tensors(backbone).expect("backbone"));
        assert_same(&ours, &read_keys(&name), &name);
    }
}

#[test]
fn class_count_reaches_only_the_last_convs() {
    let a = as_map(expected_tensors(&model(Algorithm::Deeplab, Backbone::Resnet18, true)).expect("21"));
    let mut cfg = model(Algorithm::Deeplab, Backbone::Resnet18, true);
    cfg.num_classes = 3;
    let b = as_map(expected_tensors(&cfg).expect("3"));
    let changed: Vec<_> = a
        .iter()
        .filter(|(k, s)| b.get(*k) != Some(s))
        .map(|(k, _)| k.as_str())
        .collect();
    assert_eq!(
        changed,
        vec![
            "aux_classifier.4.bias",
            "aux_classifier.4.weight",
            "classifier.4.bias",
            "classifier.4.weight"
        ]
    );
}

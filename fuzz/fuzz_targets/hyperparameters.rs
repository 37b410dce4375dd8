//! `hyperparameters.json` on arbitrary input, as `name=value` lines (so that the fuzzer mutates values rather than
//! JSON syntax) and as JSON text: parsing and validation never panic, and a job they accept gives a network
//! configuration, a finite learning rate at every point of its schedule and an iteration count that does not
//! overflow.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use semseg::model::config::ModelConfig;
use semseg::sagemaker::hyperparameters::Hyperparameters;
use semseg::train::schedule::Schedule;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = Hyperparameters::from_json(&text);
    let raw: BTreeMap<String, String> = text
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect();
    let Ok((hp, _notes)) = Hyperparameters::from_strings(&raw) else { return };

    ModelConfig::new(hp.algorithm, hp.backbone, hp.num_classes as usize, hp.output_stride, true)
        .expect("accepted hyperparameters describe a network");
    assert!(hp.crop_size % 8 == 0 && hp.crop_size > 16, "crop_size {}", hp.crop_size);
    let schedule = Schedule::for_job(&hp);
    let total = schedule.total_iterations();
    for epoch in [0, hp.epochs / 2, hp.epochs.saturating_sub(1)] {
        for iteration in [0, total / 2, total.saturating_sub(1)] {
            let lr = schedule.learning_rate(epoch, iteration);
            assert!(lr.is_finite() && lr >= 0.0 && lr <= hp.learning_rate, "lr {lr} at {epoch}/{iteration}");
        }
    }
});

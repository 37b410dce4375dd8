//! What a training job reports, for SageMaker and for people:
//! - the `#metrics` log lines, one pair per epoch, that the README's MetricDefinitions match ([`log_metrics`]);
//! - `output/data/history.json` (every epoch's figures) and `class_iou.json` (the best epoch's per-class IoU);
//! - `output/data/training.png`: loss and validation scores per epoch as a picture ([`plot`]). Blue = training loss
//!   (scaled to its maximum), red = validation mIOU, green = pixel accuracy (both on 0..1); grey grid lines at
//!   quarters of the height, one vertical tick per epoch. No text: the numbers are in history.json.

use std::path::Path;

use anyhow::{Context, Result};
use image::{Rgb, RgbImage};

use super::checkpoint::EpochRecord;
use super::metrics::Scores;
use crate::sagemaker::MlRoot;

/// The metric lines of one epoch, in the format the README's MetricDefinitions match.
pub fn log_metrics(record: &EpochRecord, seconds: f64) {
    let EpochRecord {
        epoch,
        train_loss,
        images_per_second,
        learning_rate,
        validation_miou,
        validation_pixel_accuracy,
    } = record;
    tracing::info!(
        "#metrics epoch={epoch} train:loss={train_loss:.6} train:throughput={images_per_second:.3} images/s \
         learning_rate={learning_rate:.6e} epoch_seconds={seconds:.1}"
    );
    tracing::info!(
        "#metrics epoch={epoch} validation:mIOU={validation_miou:.6} validation:pixel_accuracy={validation_pixel_accuracy:.6}"
    );
}

/// `output/data/class_iou.json`: per-class IoU of the best epoch.
pub fn write_class_iou(ml: &MlRoot, epoch: u32, scores: &Scores) -> Result<()> {
    let dir = output_data_dir(ml)?;
    let report = serde_json::json!({
        "epoch": epoch,
        "mIOU": scores.miou,
        "pixel_accuracy": scores.pixel_accuracy,
        "class_iou": scores.class_iou,
    });
    write_json(&dir.join("class_iou.json"), &report)
}

/// `output/data/history.json` and `training.png`: every epoch so far, as numbers and as curves.
pub fn write_history(ml: &MlRoot, history: &[EpochRecord]) -> Result<()> {
    let dir = output_data_dir(ml)?;
    write_json(&dir.join("history.json"), &serde_json::json!({ "epochs": history }))?;
    let picture = dir.join("training.png");
    plot(history)
        .save(&picture)
        .with_context(|| format!("cannot write {}", picture.display()))
}

fn output_data_dir(ml: &MlRoot) -> Result<std::path::PathBuf> {
    let dir = ml.output_data_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    std::fs::write(path, serde_json::to_vec_pretty(value)?).with_context(|| format!("cannot write {}", path.display()))
}

const WIDTH: u32 = 640;
const HEIGHT: u32 = 400;
const MARGIN: u32 = 24;
pub const LOSS_COLOUR: Rgb<u8> = Rgb([31, 119, 180]);
pub const MIOU_COLOUR: Rgb<u8> = Rgb([214, 39, 40]);
pub const ACCURACY_COLOUR: Rgb<u8> = Rgb([44, 160, 44]);
const GRID_COLOUR: Rgb<u8> = Rgb([220, 220, 220]);
const AXIS_COLOUR: Rgb<u8> = Rgb([90, 90, 90]);

/// Draw the history (at least one epoch gives a plot with points; an empty history gives the empty axes).
pub fn plot(history: &[EpochRecord]) -> RgbImage {
    let mut img = RgbImage::from_pixel(WIDTH, HEIGHT, Rgb([255, 255, 255]));
    let (left, right, top, bottom) = (MARGIN, WIDTH - MARGIN, MARGIN, HEIGHT - MARGIN);
    for quarter in 0..=4 {
        let y = bottom - (bottom - top) * quarter / 4;
        line(
            &mut img,
            (left, y),
            (right, y),
            if quarter == 0 { AXIS_COLOUR } else { GRID_COLOUR },
        );
    }
    line(&mut img, (left, top), (left, bottom), AXIS_COLOUR);
    let n = history.len().max(2) as u32;
    let x_of = |i: usize| left + (right - left) * i as u32 / (n - 1);
    for i in 0..history.len() {
        line(&mut img, (x_of(i), bottom), (x_of(i), bottom + 4), AXIS_COLOUR);
    }
    let max_loss = history
        .iter()
        .map(|e| e.train_loss)
        .filter(|l| l.is_finite())
        .fold(f64::MIN_POSITIVE, f64::max);
    let y_of = |value: f64| {
        let v = if value.is_finite() { value.clamp(0.0, 1.0) } else { 0.0 };
        bottom - ((bottom - top) as f64 * v).round() as u32
    };
    let series = [
        (
            LOSS_COLOUR,
            history.iter().map(|e| e.train_loss / max_loss).collect::<Vec<_>>(),
        ),
        (
            ACCURACY_COLOUR,
            history.iter().map(|e| e.validation_pixel_accuracy).collect(),
        ),
        (MIOU_COLOUR, history.iter().map(|e| e.validation_miou).collect()),
    ];
    for (colour, values) in &series {
        let points: Vec<(u32, u32)> = values.iter().enumerate().map(|(i, &v)| (x_of(i), y_of(v))).collect();
        for pair in points.windows(2) {
            thick_line(&mut img, pair[0], pair[1], *colour);
        }
        for &(x, y) in &points {
            dot(&mut img, x, y, *colour);
        }
    }
    img
}

fn line(img: &mut RgbImage, from: (u32, u32), to: (u32, u32), colour: Rgb<u8>) {
    let (x0, y0, x1, y1) = (from.0 as i64, from.1 as i64, to.0 as i64, to.1 as i64);
    let steps = (x1 - x0).abs().max((y1 - y0).abs()).max(1);
    for s in 0..=steps {
        let x = x0 + (x1 - x0) * s / steps;
        let y = y0 + (y1 - y0) * s / steps;
        if let Some(p) = img.get_pixel_mut_checked(x as u32, y as u32) {
            *p = colour;
        }
    }
}

fn thick_line(img: &mut RgbImage, from: (u32, u32), to: (u32, u32), colour: Rgb<u8>) {
    for d in 0..2 {
        line(img, (from.0, from.1 + d), (to.0, to.1 + d), colour);
    }
}

fn dot(img: &mut RgbImage, x: u32, y: u32, colour: Rgb<u8>) {
    for dy in 0..5 {
        for dx in 0..5 {
            if let Some(p) = img.get_pixel_mut_checked((x + dx).saturating_sub(2), (y + dy).saturating_sub(2)) {
                *p = colour;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(epoch: u32, loss: f64, miou: f64) -> EpochRecord {
        EpochRecord {
            epoch,
            train_loss: loss,
            validation_miou: miou,
            validation_pixel_accuracy: 0.9,
            images_per_second: 1.0,
            learning_rate: 0.01,
        }
    }

    #[test]
    fn curves_go_where_the_values_say() {
        let img = plot(&[record(1, 2.0, 0.2), record(2, 1.0, 0.6), record(3, 0.5, 0.8)]);
        assert_eq!(img.dimensions(), (WIDTH, HEIGHT));
        let (left, right, top, bottom) = (MARGIN, WIDTH - MARGIN, MARGIN, HEIGHT - MARGIN);
        // First epoch: loss at its maximum (top), mIOU 0.2 near the bottom; last epoch: mIOU 0.8.
        assert_eq!(*img.get_pixel(left, top), LOSS_COLOUR);
        let y_miou = |v: f64| bottom - ((bottom - top) as f64 * v).round() as u32;
        assert_eq!(*img.get_pixel(left, y_miou(0.2)), MIOU_COLOUR);
        assert_eq!(*img.get_pixel(right, y_miou(0.8)), MIOU_COLOUR);
        assert_eq!(*img.get_pixel(right, y_miou(0.9)), ACCURACY_COLOUR);
    }

    #[test]
    fn empty_and_non_finite_histories_do_not_panic() {
        assert_eq!(plot(&[]).dimensions(), (WIDTH, HEIGHT));
        plot(&[record(1, f64::NAN, f64::INFINITY)]);
    }
}

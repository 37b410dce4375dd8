//! One training example as Pipe mode delivers it, on arbitrary input: a label map's JSON text, then the image and
//! annotation bytes, decoded under the pixel budget, label-mapped, checked against `num_classes` and turned into a
//! batch by each of the loader's three transforms. Any error is fine; a panic, a runaway allocation or a batch that
//! breaks its own shape and label invariants is not.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use semseg::data::label_map::{LabelLut, LabelMap};
use semseg::data::loader::{batch_of, BatchRecipe, EncodedExample, LoaderConfig, Mode};

/// Small, so that one run stays fast; the decoders' budget checks are what is under test, not their speed.
const MAX_PIXELS: u64 = 1 << 16;

/// Reads a little-endian u16 from the front of `data`, or 0 when too short.
fn take_u16(data: &mut &[u8]) -> u16 {
    let (head, rest) = data.split_at(data.len().min(2));
    *data = rest;
    head.iter().rev().fold(0, |v, &b| (v << 8) | u16::from(b))
}

fn take<'a>(data: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (head, rest) = data.split_at(data.len().min(n));
    *data = rest;
    head
}

fuzz_target!(|input: &[u8]| {
    let mut data = input;
    // Settings: crop 1..=64, base size 0..=1023 (0 must be refused, not panic), classes 1..=256.
    let crop = u32::from(take_u16(&mut data) % 64) + 1;
    let base = u32::from(take_u16(&mut data) % 1024);
    let num_classes = u32::from(take_u16(&mut data) % 256) + 1;
    let map_len = usize::from(take_u16(&mut data) % 512);
    let map_text = String::from_utf8_lossy(take(&mut data, map_len));
    let lut = LabelMap::parse(&map_text).map(|m| m.lut()).unwrap_or_else(|_| LabelLut::identity());
    let image_len = usize::from(take_u16(&mut data));
    let image = take(&mut data, image_len).to_vec();
    let annotation = data.to_vec();

    let example = |index: usize| EncodedExample {
        index,
        stem: format!("example-{index}"),
        image_name: "image".into(),
        annotation_name: "annotation".into(),
        image: image.clone(),
        annotation: annotation.clone(),
    };
    let examples = [example(0), example(1)];
    for mode in [Mode::Train, Mode::Validation, Mode::WholeImage] {
        let cfg = LoaderConfig {
            mode,
            base_size: base,
            crop_size: crop,
            max_pixels: MAX_PIXELS,
            ..LoaderConfig::train(2, 7)
        };
        let recipe = BatchRecipe {
            lut: Arc::new(lut.clone()),
            cfg,
            epoch: 1,
            num_classes: Some(num_classes),
        };
        let Ok(batch) = batch_of(&examples[..], &[0, 1], &recipe, &|| false) else { continue };
        let plane = batch.height as usize * batch.width as usize;
        assert_eq!(batch.n, 2);
        assert_eq!(batch.images.len(), 2 * 3 * plane, "{mode:?}");
        assert_eq!(batch.labels.len(), 2 * plane, "{mode:?}");
        assert!(plane as u64 <= MAX_PIXELS.max(u64::from(crop * crop)), "{mode:?}: {plane} pixels");
        if mode != Mode::WholeImage {
            assert_eq!((batch.height, batch.width), (crop, crop));
        }
        assert!(batch.images.iter().all(|v| v.is_finite()), "{mode:?}: a non-finite input value");
        assert!(
            batch.labels.iter().all(|&l| l == 255 || u32::from(l) < num_classes),
            "{mode:?}: a label at or above {num_classes} reached the batch"
        );
    }
});

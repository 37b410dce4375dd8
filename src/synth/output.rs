//! Output: the channel directories under `--out` (checked, emptied with `--force`, created) and the files of one
//! sample (its JPEG image and its 8-bit palette-PNG annotation), with per-class pixel counts for the summary.

use std::fs;
use std::io;
use std::path::Path;

use super::error::{io_err, SynthError};
use super::plan::Plan;
use super::render::render;
use super::CHANNEL_DIRS;
use crate::data::annotation::voc_palette;
use crate::data::IGNORE_LABEL;

/// Create `out` and the channel directories; refuse non-empty ones unless `force`, then delete their plain files.
pub(super) fn prepare_dirs(out: &Path, force: bool) -> Result<(), SynthError> {
    // Check all five before touching anything.
    let mut to_delete = Vec::new();
    for name in CHANNEL_DIRS {
        let dir = out.join(name);
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err("read directory", &dir)(e)),
        };
        let mut paths = Vec::new();
        for entry in entries {
            paths.push(entry.map_err(io_err("read directory", &dir))?.path());
        }
        if paths.is_empty() {
            continue;
        }
        paths.sort();
        if !force {
            return Err(SynthError::NotEmpty {
                entries: paths.len(),
                first: paths[0].file_name().unwrap_or_default().to_string_lossy().into_owned(),
                path: dir,
            });
        }
        for path in paths {
            let meta = fs::symlink_metadata(&path).map_err(io_err("inspect", &path))?;
            if meta.is_dir() {
                return Err(SynthError::NestedDirectory { path });
            }
            to_delete.push(path);
        }
    }
    for path in to_delete {
        fs::remove_file(&path).map_err(io_err("delete", &path))?;
    }
    for name in CHANNEL_DIRS {
        let dir = out.join(name);
        fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
    }
    Ok(())
}

#[derive(Clone)]
pub(super) struct Counts {
    pub(super) classes: Vec<u64>,
    pub(super) ignore: u64,
}

impl Counts {
    pub(super) fn new(num_classes: usize) -> Counts {
        Counts {
            classes: vec![0; num_classes],
            ignore: 0,
        }
    }

    pub(super) fn add(&mut self, other: &Counts) {
        for (a, b) in self.classes.iter_mut().zip(&other.classes) {
            *a += b;
        }
        self.ignore += other.ignore;
    }
}

pub(super) fn write_sample(plan: &Plan, s: usize, i: usize, out: &Path, counts: &mut Counts) -> Result<(), SynthError> {
    let split = &plan.splits[s];
    let sample = render(plan, split, i);
    for &l in &sample.labels {
        if l == IGNORE_LABEL {
            counts.ignore += 1;
        } else {
            counts.classes[l as usize] += 1;
        }
    }
    let stem = format!("img_{:05}", split.first_index + i);

    let path = out.join(split.image_dir).join(format!("{stem}.jpg"));
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, plan.jpeg_quality)
        .encode(
            &sample.rgb,
            plan.width as u32,
            plan.height as u32,
            image::ExtendedColorType::Rgb8,
        )
        .map_err(|source| SynthError::Jpeg {
            path: path.clone(),
            source,
        })?;
    fs::write(&path, &jpeg).map_err(io_err("write", &path))?;

    let path = out.join(split.annotation_dir).join(format!("{stem}.png"));
    let values: Vec<u8> = sample
        .labels
        .iter()
        .map(|&l| {
            if l == IGNORE_LABEL {
                IGNORE_LABEL
            } else {
                plan.encoding[l as usize]
            }
        })
        .collect();
    let png = encode_palette_png(&values, plan.width as u32, plan.height as u32).map_err(|source| SynthError::Png {
        path: path.clone(),
        source,
    })?;
    fs::write(&path, &png).map_err(io_err("write", &path))?;
    Ok(())
}

/// An 8-bit palette PNG of raw indices with the PASCAL VOC palette.
fn encode_palette_png(indices: &[u8], width: u32, height: u32) -> Result<Vec<u8>, png::EncodingError> {
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, width, height);
    encoder.set_color(png::ColorType::Indexed);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_palette(voc_palette().concat());
    encoder.set_compression(png::Compression::Fast);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(indices)?;
    writer.finish()?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::*;
    use std::collections::BTreeSet;
    use std::fs;

    #[test]
    fn palette_png_with_raw_labels_and_every_class_in_both_splits() {
        let tmp = tempfile::tempdir().unwrap();
        let summary = generate(&opts(tmp.path())).unwrap();
        for (dir, pixels) in [
            ("train_annotation", &summary.train_class_pixels),
            ("validation_annotation", &summary.validation_class_pixels),
        ] {
            let hist = value_histogram(&tmp.path().join(dir));
            let keys: BTreeSet<u8> = hist.keys().copied().collect();
            assert_eq!(keys, BTreeSet::from([0, 1, 2, 3, 255]), "{dir}");
            for class in 0..4u8 {
                assert_eq!(hist[&class], pixels[class as usize], "{dir} class {class} pixel count");
                // Every class is a sizeable share, not a few stray pixels.
                assert!(hist[&class] > 2000, "{dir} class {class}: {}", hist[&class]);
            }
        }
        let (_, _, palette, ..) = read_png_raw(&tmp.path().join("validation_annotation/img_00050.png"));
        let palette = palette.expect("PLTE chunk");
        assert_eq!(palette.len(), 768);
        assert_eq!(&palette[3..6], &[128, 0, 0], "VOC colour of index 1");
        assert_eq!(
            &palette[765..768],
            &[224, 224, 192],
            "index 255 is VOC's light ignore colour"
        );
    }

    #[test]
    fn refuses_non_empty_channels_unless_forced() {
        let tmp = tempfile::tempdir().unwrap();
        // Other content of OUT is fine.
        fs::create_dir_all(tmp.path().join("model")).unwrap();
        fs::write(tmp.path().join("model/keep.txt"), "x").unwrap();
        fs::create_dir_all(tmp.path().join("validation")).unwrap();
        generate(&small(tmp.path())).unwrap();

        let before = all_files(tmp.path());
        let err = generate(&small(tmp.path())).unwrap_err();
        assert!(matches!(err, SynthError::NotEmpty { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&tmp.path().join("train").display().to_string()), "{msg}");
        assert!(msg.contains("--force"), "{msg}");
        assert!(before == all_files(tmp.path()), "a refused run writes nothing");

        // --force replaces the channel files and removes stale ones.
        fs::write(tmp.path().join("train/stale.jpg"), "old").unwrap();
        let forced = SynthOptions {
            force: true,
            train_count: 2,
            ..small(tmp.path())
        };
        generate(&forced).unwrap();
        assert_eq!(names(&tmp.path().join("train")), ["img_00000.jpg", "img_00001.jpg"]);
        assert_eq!(names(&tmp.path().join("validation_annotation")).len(), 3);
        assert_eq!(fs::read_to_string(tmp.path().join("model/keep.txt")).unwrap(), "x");

        // --force never deletes directories.
        fs::create_dir(tmp.path().join("train/nested")).unwrap();
        let err = generate(&forced).unwrap_err();
        assert!(matches!(err, SynthError::NestedDirectory { .. }), "{err:?}");
    }
}

//! Helpers shared by the generator's unit tests: options on a temporary directory and readers of what was written.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::Path;

use super::{SynthOptions, CHANNEL_DIRS};

pub(super) fn opts(dir: &Path) -> SynthOptions {
    SynthOptions {
        out: dir.to_path_buf(),
        ..SynthOptions::default()
    }
}

pub(super) fn small(dir: &Path) -> SynthOptions {
    SynthOptions {
        train_count: 6,
        validation_count: 3,
        ..opts(dir)
    }
}

/// Sorted file names in `dir`.
pub(super) fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

pub(super) fn stems(dir: &Path, ext: &str) -> Vec<String> {
    names(dir)
        .into_iter()
        .map(|n| {
            n.strip_suffix(&format!(".{ext}"))
                .unwrap_or_else(|| panic!("{n} is not .{ext}"))
                .to_string()
        })
        .collect()
}

/// Decode a PNG WITHOUT palette expansion: (colour type, bit depth, palette, width, height, raw samples).
pub(super) fn read_png_raw(path: &Path) -> (png::ColorType, png::BitDepth, Option<Vec<u8>>, u32, u32, Vec<u8>) {
    let mut decoder = png::Decoder::new(io::BufReader::new(fs::File::open(path).unwrap()));
    decoder.set_transformations(png::Transformations::IDENTITY);
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut buf).unwrap();
    buf.truncate(frame.buffer_size());
    let info = reader.info();
    (
        frame.color_type,
        frame.bit_depth,
        info.palette.as_ref().map(|p| p.to_vec()),
        frame.width,
        frame.height,
        buf,
    )
}

/// All raw annotation values of a split with their pixel counts.
pub(super) fn value_histogram(dir: &Path) -> BTreeMap<u8, u64> {
    let mut hist = BTreeMap::new();
    for name in names(dir) {
        let (color, depth, _, _, _, raw) = read_png_raw(&dir.join(name));
        assert_eq!(color, png::ColorType::Indexed);
        assert_eq!(depth, png::BitDepth::Eight);
        for v in raw {
            *hist.entry(v).or_insert(0) += 1;
        }
    }
    hist
}

pub(super) fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

pub(super) fn all_files(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    for channel in CHANNEL_DIRS {
        for name in names(&root.join(channel)) {
            files.insert(
                format!("{channel}/{name}"),
                fs::read(root.join(channel).join(&name)).unwrap(),
            );
        }
    }
    files
}

impl SynthOptions {
    pub(super) fn with_out(self, out: &Path) -> SynthOptions {
        SynthOptions {
            out: out.to_path_buf(),
            ..self
        }
    }
}

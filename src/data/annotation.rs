//! Decoding annotation PNGs into RAW per-pixel values (before any label map is applied).
//!
//! SageMaker's Semantic Segmentation annotations are single-channel 8-bit PNGs, grayscale or palette ("mode P").
//! For a palette PNG the label is the palette INDEX of the pixel, not its colour, so this module reads PNGs with the
//! `png` crate and no palette expansion (the `image` crate would expand palettes to RGB and lose the index).
//!
//! What is accepted and what comes out (one byte per pixel):
//! - palette PNGs of bit depth 1, 2, 4 or 8: the palette index;
//! - grayscale PNGs of bit depth 8: the value; 1, 2 or 4: the integer value, NOT rescaled to 0..255
//!   (a 2-bit pixel `3` stays `3`);
//! - gray + alpha (8-bit): the gray channel, the alpha is ignored;
//! - anything else (RGB / RGBA colour masks, 16-bit samples, non-PNG files) is an error that says how to fix it.
//!
//! The pixel budget is checked from the PNG header before any pixel data is inflated.

use std::io::Cursor;
use std::path::Path;

use image::GrayImage;

use super::decode_error::{DecodeError, DecodeErrorKind};
use super::image_io::{check_budget, magic_hex, DEFAULT_MAX_PIXELS};

const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];

/// Why an annotation file could not be turned into raw label values, and which file it was.
pub type AnnotationError = DecodeError<AnnotationErrorKind>;

/// What was wrong with an annotation.
#[derive(Debug, thiserror::Error)]
pub enum AnnotationErrorKind {
    #[error("cannot read the file: {0}; check that it exists and is readable")]
    Read(#[source] std::io::Error),
    #[error("the file is empty; annotations must be single-channel PNGs of label values")]
    Empty,
    #[error(
        "not a PNG file ({what}); annotations must be single-channel 8-bit grayscale or palette PNGs whose pixel \
         values are the labels (lossy formats such as JPEG corrupt label values)"
    )]
    NotPng { what: String },
    #[error(
        "{color} PNG is not supported; annotations must be single-channel 8-bit grayscale or palette PNGs whose \
         pixel values are the labels. {hint}"
    )]
    UnsupportedColor { color: String, hint: &'static str },
    #[error(
        "{width}x{height} = {pixels} pixels is over the limit of {max_pixels} pixels; downscale the image and its \
         annotation (nearest-neighbour for the annotation) or raise the pixel budget"
    )]
    TooLarge {
        width: u32,
        height: u32,
        pixels: u64,
        max_pixels: u64,
    },
    #[error("zero-sized PNG ({width}x{height}); replace it with a real annotation")]
    ZeroSize { width: u32, height: u32 },
    #[error("corrupt or truncated PNG: {0}; re-export the annotation")]
    Corrupt(#[source] png::DecodingError),
}

impl DecodeErrorKind for AnnotationErrorKind {
    const PREFIX: &'static str = "annotation ";
}

const RGB_HINT: &str = "RGB colour masks are a common mistake: convert each colour to its class index and save a \
                       grayscale PNG, or save a palette (mode P) PNG whose palette index is the label.";
const DEPTH_HINT: &str = "Save the annotation with 8-bit samples (label values 0..254, 255 = ignore).";

/// Decode annotation PNG bytes to raw values with the default pixel budget.
pub fn decode_annotation(bytes: &[u8]) -> Result<GrayImage, AnnotationError> {
    decode_annotation_with_budget(bytes, DEFAULT_MAX_PIXELS)
}

/// Read and decode an annotation file with the default pixel budget; errors name `path`.
pub fn read_annotation(path: &Path) -> Result<GrayImage, AnnotationError> {
    read_annotation_with_budget(path, DEFAULT_MAX_PIXELS)
}

/// Read and decode an annotation file, refusing images over `max_pixels`; errors name `path`.
pub fn read_annotation_with_budget(path: &Path, max_pixels: u64) -> Result<GrayImage, AnnotationError> {
    std::fs::read(path)
        .map_err(|err| AnnotationErrorKind::Read(err).into())
        .and_then(|bytes| decode_annotation_with_budget(&bytes, max_pixels))
        .map_err(|e| e.with_file(path))
}

/// Decode annotation PNG bytes to raw values (palette indices or gray values), refusing images over `max_pixels`.
pub fn decode_annotation_with_budget(bytes: &[u8], max_pixels: u64) -> Result<GrayImage, AnnotationError> {
    use AnnotationErrorKind::{Corrupt, TooLarge, UnsupportedColor, ZeroSize};
    if bytes.is_empty() {
        return Err(AnnotationErrorKind::Empty.into());
    }
    if !bytes.starts_with(&PNG_SIGNATURE) {
        let what = match image::guess_format(bytes) {
            Ok(f) => format!("it is {f:?}"),
            Err(_) => format!("the first bytes are {}", magic_hex(bytes)),
        };
        return Err(AnnotationErrorKind::NotPng { what }.into());
    }

    // The decoder's own allocation limit covers its internal buffers; our output buffer is checked via the budget.
    let limits = png::Limits {
        bytes: usize::try_from(max_pixels.saturating_mul(2).saturating_add(64 << 20)).unwrap_or(usize::MAX),
    };
    let mut decoder = png::Decoder::new_with_limits(Cursor::new(bytes), limits);
    decoder.set_transformations(png::Transformations::IDENTITY);
    let (width, height, color, depth) = {
        let info = decoder.read_header_info().map_err(Corrupt)?;
        (info.width, info.height, info.color_type, info.bit_depth)
    };
    check_budget(width, height, max_pixels).map_err(|(pixels, too_large)| {
        if too_large {
            TooLarge {
                width,
                height,
                pixels,
                max_pixels,
            }
        } else {
            ZeroSize { width, height }
        }
    })?;
    use png::{BitDepth, ColorType};
    let unsupported = |color: String, hint| UnsupportedColor { color, hint };
    let bits = depth as u8;
    // How the raw (untransformed) rows hold the value of each pixel.
    enum Layout {
        Bytes,
        GrayAlpha,
        Packed(u8),
    }
    let layout = match (color, depth) {
        (ColorType::Indexed | ColorType::Grayscale, BitDepth::Eight) => Layout::Bytes,
        (ColorType::Indexed | ColorType::Grayscale, BitDepth::One | BitDepth::Two | BitDepth::Four) => {
            Layout::Packed(bits)
        }
        (ColorType::GrayscaleAlpha, BitDepth::Eight) => Layout::GrayAlpha,
        (ColorType::Indexed | ColorType::Grayscale | ColorType::GrayscaleAlpha, _) => {
            return Err(unsupported(format!("{bits}-bit {color:?}"), DEPTH_HINT).into())
        }
        (ColorType::Rgb | ColorType::Rgba, _) => {
            return Err(unsupported(format!("{bits}-bit {color:?} (colour)"), RGB_HINT).into())
        }
    };

    let mut reader = decoder.read_info().map_err(Corrupt)?;
    let size = reader.output_buffer_size().ok_or(TooLarge {
        width,
        height,
        pixels: u64::from(width) * u64::from(height),
        max_pixels,
    })?;
    let mut buf = vec![0u8; size];
    let out = reader.next_frame(&mut buf).map_err(Corrupt)?;
    let line = out.line_size;
    let (w, h) = (width as usize, height as usize);
    let mut values = Vec::with_capacity(w * h);
    for y in 0..h {
        let row = buf
            .get(y * line..(y + 1) * line)
            .ok_or(Corrupt(png::DecodingError::LimitsExceeded))?;
        match layout {
            Layout::Bytes => values.extend_from_slice(&row[..w]),
            Layout::GrayAlpha => values.extend(row.chunks_exact(2).take(w).map(|p| p[0])),
            Layout::Packed(b) => {
                // Packed, most significant bits first; unpack to one integer per pixel, not rescaled.
                let per_byte = 8 / usize::from(b);
                let mask = (1u8 << b) - 1;
                values.extend((0..w).map(|x| {
                    let byte = row[x / per_byte];
                    let shift = 8 - b as usize * (x % per_byte + 1);
                    (byte >> shift) & mask
                }));
            }
        }
    }
    GrayImage::from_raw(width, height, values).ok_or(Corrupt(png::DecodingError::LimitsExceeded).into())
}

/// The PASCAL VOC colour map (0 black, 1 (128,0,0), ..., 255 (224,224,192)): 256 RGB triples, entry `i` built from
/// the bits of `i`. Used for every palette PNG semseg writes (synthetic annotations, served masks).
pub fn voc_palette() -> [[u8; 3]; 256] {
    std::array::from_fn(|i| {
        let (mut r, mut g, mut b) = (0u8, 0u8, 0u8);
        let mut c = i;
        for j in 0..8 {
            r |= ((c & 1) as u8) << (7 - j);
            g |= (((c >> 1) & 1) as u8) << (7 - j);
            b |= (((c >> 2) & 1) as u8) << (7 - j);
            c >>= 3;
        }
        [r, g, b]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PASCAL VOC's colour map (bit-interleaved), 256 entries.
    fn voc_palette() -> Vec<u8> {
        super::voc_palette().concat()
    }

    fn pack(values: &[u8], width: usize, bits: u8) -> Vec<u8> {
        let per_byte = 8 / bits as usize;
        let mut out = Vec::new();
        for row in values.chunks(width) {
            let mut packed = vec![0u8; width.div_ceil(per_byte)];
            for (x, &v) in row.iter().enumerate() {
                packed[x / per_byte] |= v << (8 - bits as usize * (x % per_byte + 1));
            }
            out.extend(packed);
        }
        out
    }

    fn write_png(
        w: u32,
        h: u32,
        color: png::ColorType,
        depth: png::BitDepth,
        palette: Option<Vec<u8>>,
        data: &[u8],
    ) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, w, h);
            enc.set_color(color);
            enc.set_depth(depth);
            if let Some(p) = palette {
                enc.set_palette(p);
            }
            let mut wr = enc.write_header().expect("header");
            wr.write_image_data(data).expect("data");
        }
        out
    }

    fn labels(w: usize, h: usize) -> Vec<u8> {
        (0..w * h)
            .map(|i| {
                let (x, y) = (i % w, i / w);
                if x == 3 {
                    255
                } else {
                    ((x / 2 + y) % 21) as u8
                }
            })
            .collect()
    }

    #[test]
    fn palette_and_grayscale_give_identical_labels() {
        let (w, h) = (13usize, 7usize);
        let lab = labels(w, h);
        let pal = write_png(
            13,
            7,
            png::ColorType::Indexed,
            png::BitDepth::Eight,
            Some(voc_palette()),
            &lab,
        );
        let gray = write_png(13, 7, png::ColorType::Grayscale, png::BitDepth::Eight, None, &lab);
        let a = decode_annotation(&pal).expect("palette");
        let b = decode_annotation(&gray).expect("gray");
        assert_eq!(a.as_raw(), &lab);
        assert_eq!(a, b);
        // The image crate (colour expansion) would have produced VOC colours, not the labels.
        let expanded = image::load_from_memory(&pal).expect("image crate").into_rgb8();
        assert_eq!(expanded.get_pixel(2, 0).0, [128, 0, 0], "index 1 is VOC dark red");
    }

    #[test]
    fn palette_indices_not_colours_are_returned() {
        // Palette where no colour component equals its index: entry i = (200 - i, 100 + i, 7).
        let mut pal = Vec::new();
        for i in 0..4u8 {
            pal.extend_from_slice(&[200 - i, 100 + i, 7]);
        }
        let idx = [0u8, 1, 2, 3, 3, 2];
        let png = write_png(3, 2, png::ColorType::Indexed, png::BitDepth::Eight, Some(pal), &idx);
        assert_eq!(decode_annotation(&png).expect("decode").as_raw(), &idx.to_vec());
    }

    #[test]
    fn low_bit_depth_palette_and_grayscale_are_unpacked_not_rescaled() {
        let (w, h) = (11usize, 3usize);
        for (depth, bits) in [
            (png::BitDepth::One, 1u8),
            (png::BitDepth::Two, 2),
            (png::BitDepth::Four, 4),
        ] {
            let max = (1u16 << bits) - 1;
            let vals: Vec<u8> = (0..w * h).map(|i| ((i * 7 + i / w) as u16 % (max + 1)) as u8).collect();
            let packed = pack(&vals, w, bits);
            let pal: Vec<u8> = (0..=max).flat_map(|i| [255 - i as u8, 9, 9]).collect();
            let p = write_png(11, 3, png::ColorType::Indexed, depth, Some(pal), &packed);
            assert_eq!(
                decode_annotation(&p).expect("palette").as_raw(),
                &vals,
                "{bits}-bit palette"
            );
            let g = write_png(11, 3, png::ColorType::Grayscale, depth, None, &packed);
            assert_eq!(decode_annotation(&g).expect("gray").as_raw(), &vals, "{bits}-bit gray");
        }
    }

    #[test]
    fn gray_alpha_takes_the_gray_channel() {
        let data = [5u8, 0, 6, 255, 255, 128, 1, 3];
        let png = write_png(2, 2, png::ColorType::GrayscaleAlpha, png::BitDepth::Eight, None, &data);
        assert_eq!(decode_annotation(&png).expect("decode").as_raw(), &vec![5, 6, 255, 1]);
    }

    #[test]
    fn rgb_16bit_and_non_png_are_rejected_with_advice() {
        let rgb = write_png(
            2,
            1,
            png::ColorType::Rgb,
            png::BitDepth::Eight,
            None,
            &[1, 2, 3, 4, 5, 6],
        );
        let msg = decode_annotation(&rgb).expect_err("rgb").to_string();
        assert!(
            msg.contains("Rgb") && msg.contains("colour masks are a common mistake"),
            "{msg}"
        );
        let rgba = write_png(1, 1, png::ColorType::Rgba, png::BitDepth::Eight, None, &[1, 2, 3, 4]);
        assert!(decode_annotation(&rgba)
            .expect_err("rgba")
            .to_string()
            .contains("colour"));
        let g16 = write_png(1, 1, png::ColorType::Grayscale, png::BitDepth::Sixteen, None, &[0, 1]);
        let msg = decode_annotation(&g16).expect_err("16-bit").to_string();
        assert!(msg.contains("16-bit") && msg.contains("8-bit"), "{msg}");
        let mut jpg = Vec::new();
        image::DynamicImage::ImageLuma8(GrayImage::new(8, 8))
            .write_to(&mut Cursor::new(&mut jpg), image::ImageFormat::Jpeg)
            .expect("jpeg");
        let msg = decode_annotation(&jpg).expect_err("jpeg").to_string();
        assert!(msg.contains("not a PNG") && msg.contains("Jpeg"), "{msg}");
        let msg = decode_annotation(b"\x00\x01junk").expect_err("junk").to_string();
        assert!(msg.contains("00 01"), "{msg}");
    }

    #[test]
    fn budget_is_checked_before_decoding() {
        let big = write_png(
            3000,
            3000,
            png::ColorType::Grayscale,
            png::BitDepth::One,
            None,
            &vec![0; 375 * 3000],
        );
        let err = decode_annotation_with_budget(&big, 1_000_000).expect_err("too large");
        assert!(
            matches!(
                err.kind,
                AnnotationErrorKind::TooLarge {
                    width: 3000,
                    height: 3000,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(
            decode_annotation_with_budget(&big, 9_000_000)
                .expect("fits")
                .dimensions(),
            (3000, 3000)
        );
    }

    #[test]
    fn corrupt_and_truncated_pngs_are_errors_naming_the_file() {
        let lab = labels(20, 20);
        let png = write_png(
            20,
            20,
            png::ColorType::Indexed,
            png::BitDepth::Eight,
            Some(voc_palette()),
            &lab,
        );
        for cut in (0..png.len()).step_by(11) {
            assert!(decode_annotation(&png[..cut]).is_err(), "cut at {cut}");
        }
        for i in (8..png.len()).step_by(3) {
            let mut b = png.clone();
            b[i] ^= 0xa5;
            let _ = decode_annotation(&b); // error or not, never a panic
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("2007_000032.png");
        std::fs::write(&path, &png[..png.len() - 30]).expect("write");
        let err = read_annotation(&path).expect_err("truncated");
        assert_eq!(err.file(), Some(path.as_path()));
        let msg = err.to_string();
        assert!(
            msg.contains("2007_000032.png") && msg.contains("corrupt or truncated"),
            "{msg}"
        );
    }
}

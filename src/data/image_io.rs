//! Decoding training / inference images (JPEG or PNG) into 8-bit RGB.
//!
//! Every supported input ends up as an [`image::RgbImage`]: grayscale is replicated to three channels, alpha is
//! dropped (not composited), 16-bit samples are scaled to 8 bits, and CMYK / YCCK JPEGs are converted to RGB by the
//! JPEG decoder. EXIF orientation is deliberately NOT applied: the pixel grid is used exactly as stored, which is
//! the grid the annotation PNG (which carries no EXIF) has to match.
//!
//! Before any pixel is decoded the header's width × height is checked against a pixel budget
//! ([`DEFAULT_MAX_PIXELS`] unless the caller passes another), so a decompression bomb is refused with a clear error
//! instead of exhausting memory. Truncated or corrupt data is an error, never a panic.

use std::fmt;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageDecoder, ImageFormat, RgbImage};

/// Default pixel budget per image: 64 Mpx (for example 8192 × 8192).
pub const DEFAULT_MAX_PIXELS: u64 = 64 * 1024 * 1024;

/// Names the input in error messages: a file path when known, otherwise "image data".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Source(pub Option<PathBuf>);

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(p) => write!(f, "{}", p.display()),
            None => f.write_str("image data"),
        }
    }
}

/// Why an image could not be turned into RGB pixels.
#[derive(Debug, thiserror::Error)]
pub enum ImageDecodeError {
    #[error("{source_name}: cannot read the file: {err}; check that it exists and is readable")]
    Read {
        source_name: Source,
        #[source]
        err: std::io::Error,
    },
    #[error("{source_name}: the file is empty; replace it with a JPEG or PNG image")]
    Empty { source_name: Source },
    #[error(
        "{source_name}: unsupported image format ({format}); images must be JPEG or PNG, convert the file \
         (for example with `convert in.{ext} out.jpg`)"
    )]
    UnsupportedFormat {
        source_name: Source,
        format: String,
        ext: String,
    },
    #[error(
        "{source_name}: not a JPEG or PNG image (the first bytes are {magic}); images must be JPEG or PNG files"
    )]
    UnknownFormat { source_name: Source, magic: String },
    #[error(
        "{source_name}: image is {width}x{height} = {pixels} pixels, over the limit of {max_pixels} pixels; \
         downscale it (the training pipeline rescales to about base_size anyway) or raise the pixel budget"
    )]
    TooLarge {
        source_name: Source,
        width: u32,
        height: u32,
        pixels: u64,
        max_pixels: u64,
    },
    #[error("{source_name}: image has a zero dimension ({width}x{height}); replace it with a real image")]
    ZeroSize {
        source_name: Source,
        width: u32,
        height: u32,
    },
    #[error("{source_name}: corrupt or truncated {format} data: {err}; re-export or re-download the file")]
    Corrupt {
        source_name: Source,
        format: &'static str,
        #[source]
        err: image::ImageError,
    },
}

impl ImageDecodeError {
    /// Attach a file path to an error produced from in-memory bytes.
    pub fn with_file(mut self, path: &Path) -> Self {
        let src = match &mut self {
            Self::Read { source_name, .. }
            | Self::Empty { source_name }
            | Self::UnsupportedFormat { source_name, .. }
            | Self::UnknownFormat { source_name, .. }
            | Self::TooLarge { source_name, .. }
            | Self::ZeroSize { source_name, .. }
            | Self::Corrupt { source_name, .. } => source_name,
        };
        src.0 = Some(path.to_path_buf());
        self
    }
}

/// Hex dump of the first few bytes, for "what is this file" messages.
pub(crate) fn magic_hex(bytes: &[u8]) -> String {
    let mut s = String::new();
    for b in bytes.iter().take(8) {
        if !s.is_empty() {
            s.push(' ');
        }
        s.push_str(&format!("{b:02x}"));
    }
    if s.is_empty() {
        s.push_str("(none)");
    }
    s
}

/// Checks width × height against the budget (shared with the annotation decoder).
pub(crate) fn check_budget(width: u32, height: u32, max_pixels: u64) -> Result<(), (u64, bool)> {
    let pixels = u64::from(width) * u64::from(height);
    if width == 0 || height == 0 {
        return Err((pixels, false));
    }
    if pixels > max_pixels {
        return Err((pixels, true));
    }
    Ok(())
}

/// Decode JPEG or PNG bytes to RGB with the default pixel budget.
pub fn decode_rgb(bytes: &[u8]) -> Result<RgbImage, ImageDecodeError> {
    decode_rgb_with_budget(bytes, DEFAULT_MAX_PIXELS)
}

/// Read and decode an image file to RGB with the default pixel budget; errors name `path`.
pub fn read_rgb(path: &Path) -> Result<RgbImage, ImageDecodeError> {
    read_rgb_with_budget(path, DEFAULT_MAX_PIXELS)
}

/// Read and decode an image file to RGB, refusing images over `max_pixels`; errors name `path`.
pub fn read_rgb_with_budget(path: &Path, max_pixels: u64) -> Result<RgbImage, ImageDecodeError> {
    let bytes = std::fs::read(path).map_err(|err| ImageDecodeError::Read {
        source_name: Source(Some(path.to_path_buf())),
        err,
    })?;
    decode_rgb_with_budget(&bytes, max_pixels).map_err(|e| e.with_file(path))
}

/// Decode JPEG or PNG bytes to RGB, refusing (from the header, before decoding) images over `max_pixels`.
pub fn decode_rgb_with_budget(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, ImageDecodeError> {
    let image = match sniff(bytes)? {
        ImageFormat::Png => {
            let dec =
                image::codecs::png::PngDecoder::new(Cursor::new(bytes)).map_err(corrupt("PNG"))?;
            decode_checked(dec, max_pixels, "PNG")?
        }
        _ => {
            let dec = image::codecs::jpeg::JpegDecoder::new(Cursor::new(bytes))
                .map_err(corrupt("JPEG"))?;
            decode_checked(dec, max_pixels, "JPEG")?
        }
    };
    Ok(image.into_rgb8())
}

/// Width and height of JPEG or PNG bytes, from the header only (no pixels are decoded).
pub fn image_dimensions(bytes: &[u8]) -> Result<(u32, u32), ImageDecodeError> {
    Ok(match sniff(bytes)? {
        ImageFormat::Png => image::codecs::png::PngDecoder::new(Cursor::new(bytes))
            .map_err(corrupt("PNG"))?
            .dimensions(),
        _ => image::codecs::jpeg::JpegDecoder::new(Cursor::new(bytes))
            .map_err(corrupt("JPEG"))?
            .dimensions(),
    })
}

/// Width and height of a JPEG or PNG file from its header (cheap: for checking that images and annotations pair
/// up before training); errors name `path`.
pub fn read_image_dimensions(path: &Path) -> Result<(u32, u32), ImageDecodeError> {
    let read_err = |err| ImageDecodeError::Read {
        source_name: Source(Some(path.to_path_buf())),
        err,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut reader = std::io::BufReader::new(file);
    let head = std::io::BufRead::fill_buf(&mut reader)
        .map_err(read_err)?
        .to_vec();
    let named = |e: ImageDecodeError| e.with_file(path);
    Ok(match sniff(&head).map_err(named)? {
        ImageFormat::Png => image::codecs::png::PngDecoder::new(reader)
            .map_err(|e| named(corrupt("PNG")(e)))?
            .dimensions(),
        _ => image::codecs::jpeg::JpegDecoder::new(reader)
            .map_err(|e| named(corrupt("JPEG")(e)))?
            .dimensions(),
    })
}

/// The format of `bytes` if it is one we decode (JPEG or PNG), else the matching error.
fn sniff(bytes: &[u8]) -> Result<ImageFormat, ImageDecodeError> {
    let src = Source(None);
    if bytes.is_empty() {
        return Err(ImageDecodeError::Empty { source_name: src });
    }
    match image::guess_format(bytes) {
        Ok(ImageFormat::Jpeg) => Ok(ImageFormat::Jpeg),
        Ok(ImageFormat::Png) => Ok(ImageFormat::Png),
        Ok(other) => {
            let ext = other.extensions_str().first().copied().unwrap_or("img");
            Err(ImageDecodeError::UnsupportedFormat {
                source_name: src,
                format: format!("{other:?}"),
                ext: ext.to_string(),
            })
        }
        Err(_) => Err(ImageDecodeError::UnknownFormat {
            source_name: src,
            magic: magic_hex(bytes),
        }),
    }
}

fn corrupt(format: &'static str) -> impl Fn(image::ImageError) -> ImageDecodeError {
    move |err| ImageDecodeError::Corrupt {
        source_name: Source(None),
        format,
        err,
    }
}

fn decode_checked(
    mut dec: impl ImageDecoder,
    max_pixels: u64,
    format: &'static str,
) -> Result<DynamicImage, ImageDecodeError> {
    let (width, height) = dec.dimensions();
    check_budget(width, height, max_pixels).map_err(|(pixels, too_large)| {
        if too_large {
            ImageDecodeError::TooLarge {
                source_name: Source(None),
                width,
                height,
                pixels,
                max_pixels,
            }
        } else {
            ImageDecodeError::ZeroSize {
                source_name: Source(None),
                width,
                height,
            }
        }
    })?;
    // The budget above is the real guard; the allocation limit only has to admit 16-bit RGBA of that size.
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(max_pixels.saturating_mul(8).saturating_add(64 << 20));
    let corrupt = |err| ImageDecodeError::Corrupt {
        source_name: Source(None),
        format,
        err,
    };
    dec.set_limits(limits).map_err(corrupt)?;
    DynamicImage::from_decoder(dec).map_err(corrupt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, ImageEncoder, Luma, LumaA, Rgb, Rgba};

    fn png_bytes(img: &DynamicImage) -> Vec<u8> {
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
            .expect("encode png");
        out
    }

    fn jpeg_bytes(img: &DynamicImage) -> Vec<u8> {
        let mut out = Vec::new();
        let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 95);
        img.write_with_encoder(enc).expect("encode jpeg");
        out
    }

    fn close(a: &[u8], b: &[u8], tol: i32) -> bool {
        a.iter()
            .zip(b)
            .all(|(&x, &y)| (i32::from(x) - i32::from(y)).abs() <= tol)
    }

    #[test]
    fn rgb_png_round_trips_exactly() {
        let img = RgbImage::from_fn(7, 5, |x, y| Rgb([x as u8 * 30, y as u8 * 40, 200]));
        let out = decode_rgb(&png_bytes(&DynamicImage::ImageRgb8(img.clone()))).expect("decode");
        assert_eq!(out, img);
    }

    #[test]
    fn grayscale_png_becomes_rgb() {
        let img = GrayImage::from_fn(4, 3, |x, y| Luma([(x * 50 + y) as u8]));
        let out = decode_rgb(&png_bytes(&DynamicImage::ImageLuma8(img.clone()))).expect("decode");
        assert_eq!(out.dimensions(), (4, 3));
        for (x, y, p) in out.enumerate_pixels() {
            let g = img.get_pixel(x, y)[0];
            assert_eq!(p.0, [g, g, g]);
        }
    }

    #[test]
    fn rgba_and_gray_alpha_pngs_drop_alpha() {
        let rgba = image::RgbaImage::from_fn(3, 2, |x, _| Rgba([10 * x as u8, 20, 30, 0]));
        let out = decode_rgb(&png_bytes(&DynamicImage::ImageRgba8(rgba))).expect("decode");
        assert_eq!(out.get_pixel(2, 1).0, [20, 20, 30]);
        let la = image::GrayAlphaImage::from_fn(3, 2, |x, _| LumaA([x as u8 * 100, 7]));
        let out = decode_rgb(&png_bytes(&DynamicImage::ImageLumaA8(la))).expect("decode");
        assert_eq!(out.get_pixel(2, 0).0, [200, 200, 200]);
    }

    #[test]
    fn sixteen_bit_png_is_scaled_to_eight_bits() {
        let img = image::ImageBuffer::<Rgb<u16>, Vec<u16>>::from_fn(2, 2, |x, _| {
            if x == 0 {
                Rgb([65535, 0, 32896])
            } else {
                Rgb([257 * 10, 257 * 20, 257 * 30])
            }
        });
        let out = decode_rgb(&png_bytes(&DynamicImage::ImageRgb16(img))).expect("decode");
        assert_eq!(out.get_pixel(0, 0).0, [255, 0, 128]);
        assert_eq!(out.get_pixel(1, 1).0, [10, 20, 30]);
        let g16 = image::ImageBuffer::<Luma<u16>, Vec<u16>>::from_pixel(2, 2, Luma([257 * 77]));
        let out = decode_rgb(&png_bytes(&DynamicImage::ImageLuma16(g16))).expect("decode");
        assert_eq!(out.get_pixel(1, 0).0, [77, 77, 77]);
    }

    #[test]
    fn rgb_and_grayscale_jpegs_decode() {
        let img = RgbImage::from_pixel(16, 8, Rgb([200, 30, 90]));
        let out = decode_rgb(&jpeg_bytes(&DynamicImage::ImageRgb8(img))).expect("decode");
        assert_eq!(out.dimensions(), (16, 8));
        assert!(
            close(&out.get_pixel(5, 5).0, &[200, 30, 90], 4),
            "{:?}",
            out.get_pixel(5, 5)
        );
        let gray = GrayImage::from_pixel(9, 9, Luma([120]));
        let out = decode_rgb(&jpeg_bytes(&DynamicImage::ImageLuma8(gray))).expect("decode");
        assert!(
            close(&out.get_pixel(4, 4).0, &[120, 120, 120], 2),
            "{:?}",
            out.get_pixel(4, 4)
        );
    }

    #[test]
    fn cmyk_jpeg_becomes_rgb() {
        // Left half pure red (C=0, M=1, Y=1, K=0), right half dark grey (K about 50%).
        let (w, h) = (16u16, 8u16);
        let mut data = Vec::new();
        for _y in 0..h {
            for x in 0..w {
                if x < 8 {
                    data.extend_from_slice(&[0, 255, 255, 0]);
                } else {
                    data.extend_from_slice(&[0, 0, 0, 128]);
                }
            }
        }
        let mut out = Vec::new();
        let mut enc = jpeg_encoder::Encoder::new(&mut out, 100);
        enc.set_sampling_factor(jpeg_encoder::SamplingFactor::R_4_4_4);
        enc.encode(&data, w, h, jpeg_encoder::ColorType::Cmyk)
            .expect("encode cmyk");
        let dec = image::codecs::jpeg::JpegDecoder::new(Cursor::new(&out[..])).expect("header");
        assert_eq!(
            dec.color_type(),
            image::ColorType::Rgb8,
            "zune reports CMYK as converted RGB"
        );
        let rgb = decode_rgb(&out).expect("decode cmyk");
        assert_eq!(rgb.dimensions(), (16, 8));
        assert!(
            close(&rgb.get_pixel(2, 4).0, &[255, 0, 0], 6),
            "red: {:?}",
            rgb.get_pixel(2, 4)
        );
        assert!(
            close(&rgb.get_pixel(13, 4).0, &[127, 127, 127], 6),
            "grey: {:?}",
            rgb.get_pixel(13, 4)
        );
    }

    #[test]
    fn budget_is_checked_from_the_header() {
        // A 4000x4000 black PNG compresses to a few KB; with a 1 Mpx budget it must be refused before decoding.
        let big = DynamicImage::ImageLuma8(GrayImage::new(4000, 4000));
        let bytes = png_bytes(&big);
        assert!(bytes.len() < 100_000);
        let err = decode_rgb_with_budget(&bytes, 1_000_000).expect_err("over budget");
        let msg = err.to_string();
        assert!(
            matches!(
                err,
                ImageDecodeError::TooLarge {
                    width: 4000,
                    height: 4000,
                    ..
                }
            ),
            "{msg}"
        );
        assert!(msg.contains("16000000") && msg.contains("1000000"), "{msg}");
        let jpg = jpeg_bytes(&DynamicImage::ImageLuma8(GrayImage::new(2000, 600)));
        let err = decode_rgb_with_budget(&jpg, 1_000_000).expect_err("over budget");
        assert!(matches!(err, ImageDecodeError::TooLarge { .. }), "{err}");
        assert!(decode_rgb_with_budget(&jpg, 1_200_000).is_ok());
    }

    #[test]
    fn truncated_and_corrupt_data_is_an_error_not_a_panic() {
        let img = RgbImage::from_fn(40, 30, |x, y| {
            Rgb([(x * 6) as u8, (y * 8) as u8, ((x + y) * 3) as u8])
        });
        for bytes in [
            jpeg_bytes(&DynamicImage::ImageRgb8(img.clone())),
            png_bytes(&DynamicImage::ImageRgb8(img)),
        ] {
            for cut in (0..bytes.len()).step_by(7) {
                let _ = decode_rgb(&bytes[..cut]);
            }
            // Flip bytes throughout: decoding may succeed or fail, but must not panic.
            for i in (0..bytes.len()).step_by(5) {
                let mut b = bytes.clone();
                b[i] ^= 0x5a;
                let _ = decode_rgb(&b);
            }
            assert!(
                decode_rgb(&bytes[..bytes.len() / 2]).is_err(),
                "half a file must not decode"
            );
        }
    }

    #[test]
    fn errors_name_the_file_and_the_problem() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("broken.jpg");
        std::fs::write(&path, b"hello, not an image").expect("write");
        let msg = read_rgb(&path).expect_err("not an image").to_string();
        assert!(
            msg.contains("broken.jpg") && msg.contains("JPEG or PNG"),
            "{msg}"
        );
        let missing = dir.path().join("missing.png");
        let msg = read_rgb(&missing).expect_err("missing").to_string();
        assert!(
            msg.contains("missing.png") && msg.contains("cannot read"),
            "{msg}"
        );
        let empty = dir.path().join("empty.png");
        std::fs::write(&empty, b"").expect("write");
        let msg = read_rgb(&empty).expect_err("empty").to_string();
        assert!(msg.contains("empty.png") && msg.contains("empty"), "{msg}");
        let gif = dir.path().join("anim.gif");
        std::fs::write(&gif, b"GIF89a\x01\x00\x01\x00\x00\x00\x00").expect("write");
        let msg = read_rgb(&gif).expect_err("gif").to_string();
        assert!(
            msg.contains("anim.gif") && msg.contains("Gif") && msg.contains("JPEG or PNG"),
            "{msg}"
        );
        let png = png_bytes(&DynamicImage::ImageLuma8(GrayImage::new(10, 10)));
        let trunc = dir.path().join("trunc.png");
        std::fs::write(&trunc, &png[..png.len() - 20]).expect("write");
        let msg = read_rgb(&trunc).expect_err("truncated").to_string();
        assert!(
            msg.contains("trunc.png") && msg.contains("corrupt or truncated PNG"),
            "{msg}"
        );
    }

    #[test]
    fn dimensions_come_from_the_header() {
        let dir = tempfile::tempdir().expect("tempdir");
        let png = png_bytes(&DynamicImage::ImageLuma8(GrayImage::new(31, 17)));
        let jpg = jpeg_bytes(&DynamicImage::ImageRgb8(RgbImage::new(23, 9)));
        assert_eq!(image_dimensions(&png).expect("png"), (31, 17));
        assert_eq!(image_dimensions(&jpg).expect("jpg"), (23, 9));
        let (p, j) = (dir.path().join("a.png"), dir.path().join("b.jpg"));
        std::fs::write(&p, &png).expect("write");
        std::fs::write(&j, &jpg).expect("write");
        assert_eq!(read_image_dimensions(&p).expect("png"), (31, 17));
        assert_eq!(read_image_dimensions(&j).expect("jpg"), (23, 9));
        let bad = dir.path().join("c.jpg");
        std::fs::write(&bad, b"GIF89a....").expect("write");
        let msg = read_image_dimensions(&bad).expect_err("gif").to_string();
        assert!(
            msg.contains("c.jpg") && msg.contains("JPEG or PNG"),
            "{msg}"
        );
        std::fs::write(&bad, &png[..20]).expect("write");
        let msg = read_image_dimensions(&bad)
            .expect_err("truncated")
            .to_string();
        assert!(msg.contains("c.jpg") && msg.contains("corrupt"), "{msg}");
    }

    #[test]
    fn png_encoder_output_is_accepted_via_image_encoder_api() {
        // Guard against format sniffing surprises: a PNG written through the ImageEncoder trait.
        let mut out = Vec::new();
        image::codecs::png::PngEncoder::new(&mut out)
            .write_image(&[1, 2, 3, 4, 5, 6], 2, 1, image::ExtendedColorType::Rgb8)
            .expect("encode");
        assert_eq!(
            decode_rgb(&out).expect("decode").as_raw(),
            &vec![1, 2, 3, 4, 5, 6]
        );
    }
}

//! Decoding training / inference images (JPEG or PNG) into 8-bit RGB.
//!
//! Every supported input ends up as an [`image::RgbImage`]: grayscale is replicated to three channels, alpha is
//! dropped (not composited), 16-bit samples are scaled to 8 bits, and CMYK / YCCK JPEGs are converted to RGB by the
//! JPEG decoder. EXIF orientation is deliberately NOT applied: the pixel grid is used exactly as stored, which is
//! the grid the annotation PNG (which carries no EXIF) has to match.
//!
//! Before any pixel is decoded the header's width × height is checked against a pixel budget
//! ([`DEFAULT_MAX_PIXELS`] unless the caller passes another), so a decompression bomb is refused with a clear error
//! instead of exhausting memory. Truncated or corrupt data is an error, never a panic: a JPEG must run to its
//! end-of-image marker ([`super::jpeg_end`]), since the JPEG decoder would fill in a missing scan and report success.

use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageFormat, RgbImage};

use super::decode_error::{DecodeError, DecodeErrorKind};
use super::jpeg_end::{self, Truncated};

/// Default pixel budget per image: 64 Mpx (for example 8192 × 8192).
pub const DEFAULT_MAX_PIXELS: u64 = 64 * 1024 * 1024;

/// Why an image could not be turned into RGB pixels, and which file it was.
pub type ImageDecodeError = DecodeError<ImageErrorKind>;

/// What was wrong with an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageErrorKind {
    #[error("cannot read the file: {0}; check that it exists and is readable")]
    Read(#[source] std::io::Error),
    #[error("the file is empty; replace it with a JPEG or PNG image")]
    Empty,
    #[error(
        "unsupported image format ({format}); images must be JPEG or PNG, convert the file \
         (for example with `convert in.{ext} out.jpg`)"
    )]
    UnsupportedFormat { format: String, ext: String },
    #[error("not a JPEG or PNG image (the first bytes are {magic}); images must be JPEG or PNG files")]
    UnknownFormat { magic: String },
    #[error(
        "image is {width}x{height} = {pixels} pixels, over the limit of {max_pixels} pixels; \
         downscale it (the training pipeline rescales to about base_size anyway) or raise the pixel budget"
    )]
    TooLarge {
        width: u32,
        height: u32,
        pixels: u64,
        max_pixels: u64,
    },
    #[error("image has a zero dimension ({width}x{height}); replace it with a real image")]
    ZeroSize { width: u32, height: u32 },
    #[error("corrupt or truncated {format} data: {err}; re-export or re-download the file")]
    Corrupt {
        format: &'static str,
        #[source]
        err: image::ImageError,
    },
    #[error("corrupt or truncated JPEG data: {0}; re-export or re-download the file")]
    TruncatedJpeg(#[source] Truncated),
}

impl DecodeErrorKind for ImageErrorKind {
    const PREFIX: &'static str = "";
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
    read(path)
        .and_then(|bytes| decode_rgb_with_budget(&bytes, max_pixels))
        .map_err(|e| e.with_file(path))
}

/// Decode JPEG or PNG bytes to RGB, refusing (from the header, before decoding) images over `max_pixels`, and a JPEG
/// that stops before its end-of-image marker (see [`jpeg_end`]).
pub fn decode_rgb_with_budget(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, ImageDecodeError> {
    let image = match sniff(bytes)? {
        ImageFormat::Png => {
            let dec = image::codecs::png::PngDecoder::new(Cursor::new(bytes)).map_err(corrupt("PNG"))?;
            decode_checked(dec, max_pixels, "PNG")?
        }
        _ => {
            let dec = image::codecs::jpeg::JpegDecoder::new(Cursor::new(bytes)).map_err(corrupt("JPEG"))?;
            check_jpeg_end(bytes)?;
            decode_checked(dec, max_pixels, "JPEG")?
        }
    };
    Ok(image.into_rgb8())
}

/// Width and height of JPEG or PNG bytes from the header, without decoding any pixel; a JPEG must also run to its
/// end-of-image marker, so a truncated file is refused as decoding it would be.
pub fn image_dimensions(bytes: &[u8]) -> Result<(u32, u32), ImageDecodeError> {
    Ok(match sniff(bytes)? {
        ImageFormat::Png => image::codecs::png::PngDecoder::new(Cursor::new(bytes))
            .map_err(corrupt("PNG"))?
            .dimensions(),
        _ => {
            let dimensions = image::codecs::jpeg::JpegDecoder::new(Cursor::new(bytes))
                .map_err(corrupt("JPEG"))?
                .dimensions();
            check_jpeg_end(bytes)?;
            dimensions
        }
    })
}

/// [`image_dimensions`] of a file (cheap: for checking that images and annotations pair up before training); errors
/// name `path`.
pub fn read_image_dimensions(path: &Path) -> Result<(u32, u32), ImageDecodeError> {
    read(path)
        .and_then(|bytes| image_dimensions(&bytes))
        .map_err(|e| e.with_file(path))
}

fn read(path: &Path) -> Result<Vec<u8>, ImageDecodeError> {
    std::fs::read(path).map_err(|err| ImageErrorKind::Read(err).into())
}

/// The format of `bytes` if it is one we decode (JPEG or PNG), else the matching error.
fn sniff(bytes: &[u8]) -> Result<ImageFormat, ImageDecodeError> {
    if bytes.is_empty() {
        return Err(ImageErrorKind::Empty.into());
    }
    match image::guess_format(bytes) {
        Ok(ImageFormat::Jpeg) => Ok(ImageFormat::Jpeg),
        Ok(ImageFormat::Png) => Ok(ImageFormat::Png),
        Ok(other) => {
            let ext = other.extensions_str().first().copied().unwrap_or("img");
            Err(ImageErrorKind::UnsupportedFormat {
                format: format!("{other:?}"),
                ext: ext.to_string(),
            }
            .into())
        }
        Err(_) => Err(ImageErrorKind::UnknownFormat {
            magic: magic_hex(bytes),
        }
        .into()),
    }
}

fn corrupt(format: &'static str) -> impl Fn(image::ImageError) -> ImageDecodeError {
    move |err| ImageErrorKind::Corrupt { format, err }.into()
}

fn check_jpeg_end(bytes: &[u8]) -> Result<(), ImageDecodeError> {
    jpeg_end::find_end_of_image(bytes)
        .map(drop)
        .map_err(|truncated| ImageErrorKind::TruncatedJpeg(truncated).into())
}

fn decode_checked(
    mut dec: impl ImageDecoder,
    max_pixels: u64,
    format: &'static str,
) -> Result<DynamicImage, ImageDecodeError> {
    let (width, height) = dec.dimensions();
    check_budget(width, height, max_pixels).map_err(|(pixels, too_large)| {
        if too_large {
            ImageErrorKind::TooLarge {
                width,
                height,
                pixels,
                max_pixels,
            }
        } else {
            ImageErrorKind::ZeroSize { width, height }
        }
    })?;
    // The budget above is the real guard; the allocation limit only has to admit 16-bit RGBA of that size.
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(max_pixels.saturating_mul(8).saturating_add(64 << 20));
    let corrupt = corrupt(format);
    dec.set_limits(limits).map_err(&corrupt)?;
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
                err.kind,
                ImageErrorKind::TooLarge {
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
        assert!(matches!(err.kind, ImageErrorKind::TooLarge { .. }), "{err}");
        assert!(decode_rgb_with_budget(&jpg, 1_200_000).is_ok());
    }

    #[test]
    fn truncated_and_corrupt_data_is_an_error_not_a_panic() {
        let img = RgbImage::from_fn(40, 30, |x, y| Rgb([(x * 6) as u8, (y * 8) as u8, ((x + y) * 3) as u8]));
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
    fn a_jpeg_cut_anywhere_after_its_headers_is_refused_naming_the_file() {
        let img = RgbImage::from_fn(64, 48, |x, y| Rgb([(x * 4) as u8, (y * 5) as u8, ((x ^ y) * 3) as u8]));
        let jpeg = jpeg_bytes(&DynamicImage::ImageRgb8(img));
        // The headers end where the scan starts (SOS, FF DA); the decoder would fill in any scan cut short.
        let scan = jpeg.windows(2).position(|w| w == [0xFF, 0xDA]).expect("a scan");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("half-copied.jpg");
        let len = jpeg.len();
        for cut in [
            scan + 16,
            scan + (len - scan) / 4,
            (scan + len) / 2,
            len - 100,
            len - 2,
            len - 1,
        ] {
            let err = decode_rgb(&jpeg[..cut]).expect_err("a truncated JPEG must not decode");
            assert!(
                matches!(err.kind, ImageErrorKind::TruncatedJpeg(_)),
                "cut at {cut}: {err}"
            );
            std::fs::write(&path, &jpeg[..cut]).expect("write");
            for err in [
                read_rgb(&path).expect_err("truncated"),
                read_image_dimensions(&path).expect_err("truncated"),
            ] {
                let msg = err.to_string();
                assert!(
                    msg.contains("half-copied.jpg")
                        && msg.contains("corrupt or truncated JPEG")
                        && msg.contains(&format!("ends at byte {cut}"))
                        && msg.contains("end-of-image marker"),
                    "{msg}"
                );
            }
        }
        // Whole, and whole with zero padding after the end-of-image marker: fine.
        assert_eq!(decode_rgb(&jpeg).expect("whole").dimensions(), (64, 48));
        let mut padded = jpeg.clone();
        padded.resize(len + 512, 0);
        assert_eq!(decode_rgb(&padded).expect("padded").dimensions(), (64, 48));
        assert_eq!(image_dimensions(&padded).expect("padded"), (64, 48));
    }

    #[test]
    fn errors_name_the_file_and_the_problem() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("broken.jpg");
        std::fs::write(&path, b"hello, not an image").expect("write");
        let msg = read_rgb(&path).expect_err("not an image").to_string();
        assert!(msg.contains("broken.jpg") && msg.contains("JPEG or PNG"), "{msg}");
        let missing = dir.path().join("missing.png");
        let msg = read_rgb(&missing).expect_err("missing").to_string();
        assert!(msg.contains("missing.png") && msg.contains("cannot read"), "{msg}");
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
        assert!(msg.contains("c.jpg") && msg.contains("JPEG or PNG"), "{msg}");
        std::fs::write(&bad, &png[..20]).expect("write");
        let msg = read_image_dimensions(&bad).expect_err("truncated").to_string();
        assert!(msg.contains("c.jpg") && msg.contains("corrupt"), "{msg}");
    }

    #[test]
    fn png_encoder_output_is_accepted_via_image_encoder_api() {
        // Guard against format sniffing surprises: a PNG written through the ImageEncoder trait.
        let mut out = Vec::new();
        image::codecs::png::PngEncoder::new(&mut out)
            .write_image(&[1, 2, 3, 4, 5, 6], 2, 1, image::ExtendedColorType::Rgb8)
            .expect("encode");
        assert_eq!(decode_rgb(&out).expect("decode").as_raw(), &vec![1, 2, 3, 4, 5, 6]);
    }
}

//! The request/response codecs of `POST /invocations`: the body decoded to an image, inference, and the answer
//! encoded in the type [`super::media::negotiate`] picked.
//!
//! The image header is checked against the pixel budget before any pixel is decoded (decompression bombs), and
//! decoding runs under an allocation limit ([`crate::data::image_io`], the decoder training uses). Answers: the
//! class-index mask as a palette PNG, probabilities as recordio-protobuf, or per-class pixel counts as JSON.

use std::time::Instant;

use image::RgbImage;
use serde::Serialize;

use super::error::ServeError;
use super::media::Output;
use super::protobuf;
use crate::data::image_io::{self, ImageErrorKind};
use crate::infer::{encode, Inference};

/// Limits on what one request may make the server allocate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest decoded image, width × height (checked from the header before decoding).
    pub max_image_pixels: u64,
    /// Largest probabilities response, C × H × W values (4 bytes each).
    pub max_probability_values: u64,
}

/// Decode a JPEG or PNG body to RGB, refusing images over the pixel budget (from the header) before decoding them.
pub fn decode_image(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, ServeError> {
    image_io::decode_rgb_with_budget(bytes, max_pixels).map_err(|error| match error.kind {
        ImageErrorKind::Empty => ServeError::EmptyBody,
        ImageErrorKind::TooLarge {
            width,
            height,
            max_pixels,
            ..
        } => ServeError::ImageTooLarge {
            width,
            height,
            max_pixels,
        },
        _ => ServeError::BadImage {
            detail: error.to_string(),
        },
    })
}

/// The JSON answer: per-class pixel counts and the mask's shape.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct ClassCounts {
    /// `[height, width]` of the mask (the input image's size).
    pub shape: [usize; 2],
    pub num_classes: usize,
    /// Pixels per class index, `num_classes` entries.
    pub class_pixel_counts: Vec<u64>,
}

/// A response body and its content type.
#[derive(Debug)]
pub struct Encoded {
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

/// Decode the body, run inference and encode the answer: everything an invocation does off the async runtime.
/// Logs the time of each step at debug level (target `semseg::serve::timing`; `scripts/bench-serve` reads it).
pub fn invoke(inference: &Inference, body: &[u8], output: Output, limits: DecodeLimits) -> Result<Encoded, ServeError> {
    let started = Instant::now();
    let image = decode_image(body, limits.max_image_pixels)?;
    let decoded = Instant::now();
    let content_type = output.content_type();
    let internal =
        |what: &str, e: &dyn std::fmt::Display| ServeError::Internal(anyhow::anyhow!("cannot encode {what}: {e}"));
    let (inferred, body) = match output {
        Output::MaskPng => {
            let mask = inference.mask(&image).map_err(ServeError::Internal)?;
            let inferred = Instant::now();
            (inferred, encode::mask_png(&mask).map_err(|e| internal("the mask", &e))?)
        }
        Output::Json => {
            let mask = inference.mask(&image).map_err(ServeError::Internal)?;
            let inferred = Instant::now();
            let counts = ClassCounts {
                shape: [mask.height(), mask.width()],
                num_classes: inference.num_classes(),
                class_pixel_counts: mask.class_pixel_counts(inference.num_classes()),
            };
            (
                inferred,
                serde_json::to_vec(&counts).map_err(|e| internal("the JSON answer", &e))?,
            )
        }
        Output::Probabilities { .. } => {
            let values = inference.num_classes() as u64 * u64::from(image.width()) * u64::from(image.height());
            if values > limits.max_probability_values {
                return Err(ServeError::ProbabilitiesTooLarge {
                    values,
                    max_values: limits.max_probability_values,
                });
            }
            let probabilities = inference.probabilities(&image).map_err(ServeError::Internal)?;
            let inferred = Instant::now();
            (
                inferred,
                protobuf::encode_probabilities(probabilities).map_err(|e| internal("the probabilities", &e))?,
            )
        }
    };
    let ms = |from: Instant, to: Instant| (to - from).as_secs_f64() * 1e3;
    tracing::debug!(
        target: "semseg::serve::timing",
        width = image.width(),
        height = image.height(),
        decode_ms = ms(started, decoded),
        model_ms = ms(decoded, inferred),
        encode_ms = ms(inferred, Instant::now()),
        content_type,
        "invocation"
    );
    Ok(Encoded { content_type, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_decoding_errors() {
        use std::io::Cursor;
        assert!(matches!(decode_image(b"", 100), Err(ServeError::EmptyBody)));
        assert!(matches!(
            decode_image(b"hello world", 100),
            Err(ServeError::BadImage { .. })
        ));
        let mut png = Vec::new();
        let img = RgbImage::from_pixel(20, 10, image::Rgb([1, 2, 3]));
        img.write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
            .expect("encoding a PNG in memory");
        assert!(matches!(decode_image(&png, 199), Err(ServeError::ImageTooLarge { .. })));
        assert_eq!(decode_image(&png, 200).map(|i| i.dimensions()).ok(), Some((20, 10)));
        assert!(matches!(
            decode_image(&png[..png.len() / 2], 200),
            Err(ServeError::BadImage { .. })
        ));
    }
}

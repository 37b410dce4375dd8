//! Content negotiation and the request/response codecs of `POST /invocations`.
//!
//! Requests: `image/jpeg`, `image/png` or `application/x-image` (the format is then taken from the bytes). The image
//! header is checked against the pixel budget before any pixel is decoded (decompression bombs), and decoding runs
//! under an allocation limit ([`crate::data::image_io`], the decoder training uses). Responses: the class-index mask
//! as a palette PNG (`image/png`, the default for a missing Accept or `*/*`), probabilities as recordio-protobuf
//! (`application/x-recordio-protobuf` or `application/x-protobuf`), or per-class pixel counts as JSON
//! (`application/json`).

use std::time::Instant;

use image::RgbImage;
use serde::Serialize;

use super::error::ServeError;
use super::protobuf;
use crate::data::image_io::{self, ImageDecodeError};
use crate::infer::{encode, Inference};

/// Accepted request content types.
pub const REQUEST_TYPES: [&str; 3] = ["image/jpeg", "image/png", "application/x-image"];
/// Response content types, in the order `*/*` prefers them.
pub const RESPONSE_TYPES: [&str; 4] = [
    "image/png",
    "application/x-recordio-protobuf",
    "application/x-protobuf",
    "application/json",
];

/// What the client asked to get back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// Palette PNG of class indices.
    MaskPng,
    /// RecordIO-framed `aialgs.data.Record` with the probabilities; the content type echoes the one asked for.
    Probabilities { content_type: &'static str },
    /// Per-class pixel counts and the mask's shape.
    Json,
}

impl Output {
    pub fn content_type(self) -> &'static str {
        match self {
            Output::MaskPng => "image/png",
            Output::Probabilities { content_type } => content_type,
            Output::Json => "application/json",
        }
    }

    fn from_media_type(media: &str) -> Option<Self> {
        match media {
            "image/png" | "image/*" | "*/*" => Some(Output::MaskPng),
            "application/x-recordio-protobuf" => Some(Output::Probabilities {
                content_type: "application/x-recordio-protobuf",
            }),
            "application/x-protobuf" => Some(Output::Probabilities {
                content_type: "application/x-protobuf",
            }),
            "application/json" => Some(Output::Json),
            _ => None,
        }
    }
}

/// The media type of a header value: before any `;`, trimmed, lower-case.
fn media_type(value: &str) -> String {
    value.split(';').next().unwrap_or("").trim().to_ascii_lowercase()
}

/// Check the request's Content-Type (415 if missing or unsupported).
pub fn check_content_type(value: Option<&str>) -> Result<(), ServeError> {
    let media = value.map(media_type).unwrap_or_default();
    if REQUEST_TYPES.contains(&media.as_str()) {
        Ok(())
    } else {
        Err(ServeError::UnsupportedMediaType {
            got: value.unwrap_or("(none)").to_string(),
        })
    }
}

/// Pick the response type from an Accept header (RFC 9110: comma-separated media ranges with optional `q`).
/// A missing or empty header means `image/png`; the highest `q` wins, ties go to the earlier entry; `q=0` refuses.
pub fn negotiate(accept: Option<&str>) -> Result<Output, ServeError> {
    let Some(accept) = accept.filter(|a| !a.trim().is_empty()) else {
        return Ok(Output::MaskPng);
    };
    let mut best: Option<(f32, Output)> = None;
    for range in accept.split(',') {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.trim().strip_prefix("q=").or_else(|| p.trim().strip_prefix("Q=")))
            .filter_map(|q| q.trim().parse::<f32>().ok())
            .next()
            .unwrap_or(1.0);
        if q.is_nan() || q <= 0.0 {
            continue;
        }
        if let Some(output) = Output::from_media_type(&media) {
            if best.is_none_or(|(bq, _)| q > bq) {
                best = Some((q, output));
            }
        }
    }
    best.map(|(_, o)| o).ok_or_else(|| ServeError::NotAcceptable {
        got: accept.to_string(),
    })
}

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
    image_io::decode_rgb_with_budget(bytes, max_pixels).map_err(|error| match error {
        ImageDecodeError::Empty { .. } => ServeError::EmptyBody,
        ImageDecodeError::TooLarge {
            width,
            height,
            max_pixels,
            ..
        } => ServeError::ImageTooLarge {
            width,
            height,
            max_pixels,
        },
        other => ServeError::BadImage {
            detail: other.to_string(),
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
    fn accept_negotiation() -> Result<(), ServeError> {
        let probs = Output::Probabilities {
            content_type: "application/x-recordio-protobuf",
        };
        assert_eq!(negotiate(None)?, Output::MaskPng);
        assert_eq!(negotiate(Some(""))?, Output::MaskPng);
        assert_eq!(negotiate(Some("*/*"))?, Output::MaskPng);
        assert_eq!(negotiate(Some("image/*"))?, Output::MaskPng);
        assert_eq!(negotiate(Some("Application/X-RecordIO-Protobuf"))?, probs);
        assert_eq!(
            negotiate(Some("application/x-protobuf"))?,
            Output::Probabilities {
                content_type: "application/x-protobuf"
            }
        );
        assert_eq!(
            negotiate(Some("text/html, application/json;q=0.9, */*;q=0.1"))?,
            Output::Json
        );
        assert_eq!(
            negotiate(Some("image/png;q=0.5, application/x-recordio-protobuf"))?,
            probs
        );
        assert!(matches!(
            negotiate(Some("text/csv")),
            Err(ServeError::NotAcceptable { .. })
        ));
        assert!(matches!(
            negotiate(Some("image/png;q=0")),
            Err(ServeError::NotAcceptable { .. })
        ));
        Ok(())
    }

    #[test]
    fn content_types() {
        assert!(check_content_type(Some("image/jpeg")).is_ok());
        assert!(check_content_type(Some("IMAGE/PNG; charset=binary")).is_ok());
        assert!(check_content_type(Some("application/x-image")).is_ok());
        assert!(matches!(
            check_content_type(Some("text/csv")),
            Err(ServeError::UnsupportedMediaType { .. })
        ));
        assert!(matches!(
            check_content_type(None),
            Err(ServeError::UnsupportedMediaType { .. })
        ));
    }

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

//! Media types of `POST /invocations` and content negotiation.
//!
//! Requests: `image/jpeg`, `image/png` or `application/x-image` (the format is then taken from the bytes). Responses:
//! the class-index mask as a palette PNG (`image/png`, the default for a missing Accept or `*/*`), probabilities as
//! recordio-protobuf (`application/x-recordio-protobuf` or `application/x-protobuf`), or per-class pixel counts as
//! JSON (`application/json`).

use super::error::ServeError;

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
            supported: &REQUEST_TYPES,
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
        supported: &RESPONSE_TYPES,
    })
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
}

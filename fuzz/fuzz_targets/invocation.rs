//! The request decoding path of `POST /invocations` on arbitrary input: header parsing (Content-Type, Accept), image
//! decoding under the pixel budget, inference and every response encoder, plus the recordio-protobuf decoder. Any
//! outcome is fine except a panic (which the server would turn into a 500) or a runaway allocation.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use semseg::infer::{Inference, InferenceLimits, NearestColour};
use semseg::serve::codec::{self, DecodeLimits};
use semseg::serve::media::{self, Output};
use semseg::serve::protobuf;

fn inference() -> &'static Inference {
    static INFERENCE: OnceLock<Inference> = OnceLock::new();
    INFERENCE.get_or_init(|| {
        let segmenter = NearestColour::new(vec![[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]]);
        Inference::new(Arc::new(segmenter), InferenceLimits { max_model_pixels: 64 * 64, min_model_side: 8 })
    })
}

fuzz_target!(|data: &[u8]| {
    // First byte: how many of the following bytes form the header text; then the headers; the rest is the body.
    let Some((&split, rest)) = data.split_first() else { return };
    let split = usize::from(split).min(rest.len());
    let (header, body) = rest.split_at(split);
    let header = String::from_utf8_lossy(header);
    let (content_type, accept) = header.split_once('\n').unwrap_or((&header, ""));
    let _ = media::check_content_type(Some(content_type));
    let output = media::negotiate(Some(accept)).unwrap_or(Output::MaskPng);
    let limits = DecodeLimits { max_image_pixels: 1 << 20, max_probability_values: 1 << 22 };
    for output in [output, Output::Json] {
        if let Ok(encoded) = codec::invoke(inference(), body, output, limits) {
            if let Output::Probabilities { .. } = output {
                protobuf::decode_probabilities(&encoded.body).expect("our own answer decodes");
            }
        }
    }
    let _ = protobuf::decode_probabilities(body);
});

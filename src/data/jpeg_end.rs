//! Whether JPEG data runs to its end-of-image marker.
//!
//! The `image` crate decodes JPEGs with zune-jpeg in its lenient mode (`image` 0.25 sets `strict_mode(false)` and
//! offers no switch): a scan that the data stops short of is filled in and reported as success. A truncated upload
//! or a half-copied training file would then be segmented (or trained on) as if it were whole. Walking the marker
//! segments to the EOI marker (FF D9) catches that before any pixel is decoded; what follows EOI (padding, a
//! camera's trailer) is left alone, as decoders do.

/// Where the data stopped short of the end-of-image marker.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the data ends at byte {len} {inside}, without the end-of-image marker (FF D9)")]
pub struct Truncated {
    /// Length of the data.
    pub len: usize,
    /// What was being read when the data ran out.
    pub inside: &'static str,
}

/// The offset just past the end-of-image marker of `jpeg` (which starts with SOI, FF D8), or where the data stops
/// short of it. Bytes between segments that are not a marker are skipped, as lenient decoders skip them.
pub fn find_end_of_image(jpeg: &[u8]) -> Result<usize, Truncated> {
    let truncated = |inside| Truncated {
        len: jpeg.len(),
        inside,
    };
    let mut pos = 2;
    loop {
        let marker_at = next_marker(jpeg, pos).ok_or(truncated("between segments"))?;
        let marker = jpeg[marker_at];
        pos = marker_at + 1;
        match marker {
            0xD9 => return Ok(pos),
            // Markers without a length: TEM, restart markers, SOI (and a stray stuffed 00 outside a scan).
            0x00 | 0x01 | 0xD0..=0xD8 => {}
            _ => {
                let length = jpeg
                    .get(pos..pos + 2)
                    .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
                    .ok_or(truncated("in a segment's length"))?;
                pos += length.max(2);
                if pos > jpeg.len() {
                    return Err(truncated("inside a marker segment"));
                }
                if marker == 0xDA {
                    pos = end_of_scan(jpeg, pos).ok_or(truncated("inside the compressed image data"))?;
                }
            }
        }
    }
}

/// The offset of the marker byte after the next FF at or after `from` (skipping FF fill bytes), if any.
fn next_marker(jpeg: &[u8], from: usize) -> Option<usize> {
    let ff = from + jpeg.get(from..)?.iter().position(|&b| b == 0xFF)?;
    (ff + 1..jpeg.len()).find(|&i| jpeg[i] != 0xFF)
}

/// The offset of the first FF that starts a marker after the entropy-coded data starting at `from`: FF 00 is a
/// stuffed FF byte and FF D0..D7 a restart marker, both part of the scan.
fn end_of_scan(jpeg: &[u8], mut from: usize) -> Option<usize> {
    loop {
        let marker_at = next_marker(jpeg, from)?;
        if !matches!(jpeg[marker_at], 0x00 | 0xD0..=0xD7) {
            return Some(marker_at - 1);
        }
        from = marker_at + 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jpeg(width: u32, height: u32, progressive: bool) -> Vec<u8> {
        let pixels: Vec<u8> = (0..width * height * 3).map(|i| (i * 37 % 251) as u8).collect();
        let mut out = Vec::new();
        let mut encoder = jpeg_encoder::Encoder::new(&mut out, 90);
        encoder.set_progressive(progressive);
        encoder.set_restart_interval(if progressive { 0 } else { 4 });
        encoder
            .encode(&pixels, width as u16, height as u16, jpeg_encoder::ColorType::Rgb)
            .expect("encode");
        out
    }

    #[test]
    fn whole_jpegs_end_at_their_eoi_even_with_bytes_after_it() {
        for progressive in [false, true] {
            let mut data = jpeg(40, 24, progressive);
            let len = data.len();
            assert_eq!(find_end_of_image(&data), Ok(len), "progressive {progressive}");
            data.extend_from_slice(&[0; 100]);
            assert_eq!(find_end_of_image(&data), Ok(len), "zero padding after EOI");
            data.extend_from_slice(b"trailer");
            assert_eq!(find_end_of_image(&data), Ok(len), "a trailer after EOI");
        }
    }

    #[test]
    fn every_cut_before_the_eoi_is_truncated() {
        for progressive in [false, true] {
            let data = jpeg(40, 24, progressive);
            for cut in 2..data.len() {
                let err = find_end_of_image(&data[..cut]).expect_err("truncated");
                assert_eq!(err.len, cut);
                // A cut file padded with zeros (a preallocated, half-written file) is still truncated.
                let mut padded = data[..cut].to_vec();
                padded.resize(cut + 64, 0);
                assert!(find_end_of_image(&padded).is_err(), "cut at {cut}, zero padded");
            }
        }
    }

    #[test]
    fn the_message_says_where_the_data_stopped() {
        let data = jpeg(40, 24, false);
        let msg = find_end_of_image(&data[..data.len() - 10])
            .expect_err("cut")
            .to_string();
        assert!(
            msg.contains("inside the compressed image data") && msg.contains("FF D9"),
            "{msg}"
        );
    }
}

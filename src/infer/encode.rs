//! Output files shared by `serve` and `predict`: the class-index mask as an 8-bit palette PNG and probabilities as a
//! NumPy `.npy` file.
//!
//! The mask PNG stores the class index of each pixel as its palette index (the label format of the annotations), with
//! the PASCAL VOC colour map as palette so it is visible in any viewer: 0 black, 1 dark red, 2 dark green, ...,
//! 255 (ignore) cream. Reading it back as palette indices (e.g. PIL `Image.open(p)` in mode `P`, `np.array(...)`) gives
//! the labels.

use std::io::Write;

use super::{Mask, Probabilities};

pub use crate::data::annotation::voc_palette;

/// The mask as an 8-bit palette PNG (fast compression: masks compress well anyway).
pub fn mask_png(mask: &Mask) -> Result<Vec<u8>, png::EncodingError> {
    let mut out = Vec::with_capacity(mask.labels().len() / 8 + 1024);
    let width = u32::try_from(mask.width()).map_err(|_| too_large("width"))?;
    let height = u32::try_from(mask.height()).map_err(|_| too_large("height"))?;
    let mut encoder = png::Encoder::new(&mut out, width, height);
    encoder.set_color(png::ColorType::Indexed);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_palette(voc_palette().concat());
    encoder.set_compression(png::Compression::Fast);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(mask.labels())?;
    writer.finish()?;
    Ok(out)
}

fn too_large(what: &str) -> png::EncodingError {
    png::EncodingError::IoError(std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!("the mask {what} does not fit a PNG (at most 2^32 - 1)"),
    ))
}

/// Write probabilities as a NumPy `.npy` (format 1.0, little-endian float32, C order, shape `(C, H, W)`).
pub fn write_npy(out: &mut impl Write, probabilities: &Probabilities) -> std::io::Result<()> {
    let [c, h, w] = probabilities.shape();
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({c}, {h}, {w}), }}");
    // magic (6) + version (2) + header length (2) + header + '\n', padded with spaces to a multiple of 64.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let header_len = u16::try_from(header.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "npy header too long"))?;
    out.write_all(b"\x93NUMPY\x01\x00")?;
    out.write_all(&header_len.to_le_bytes())?;
    out.write_all(header.as_bytes())?;
    let mut buf = Vec::with_capacity(64 * 1024);
    for chunk in probabilities.as_slice().chunks(16 * 1024) {
        buf.clear();
        for v in chunk {
            buf.extend_from_slice(&v.to_le_bytes());
        }
        out.write_all(&buf)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn palette_follows_voc() {
        let p = voc_palette();
        assert_eq!(p[0], [0, 0, 0]);
        assert_eq!(p[1], [128, 0, 0]);
        assert_eq!(p[2], [0, 128, 0]);
        assert_eq!(p[15], [192, 128, 128]);
        assert_eq!(p[255], [224, 224, 192]);
    }

    #[test]
    fn mask_png_keeps_indices() -> anyhow::Result<()> {
        let mask = Mask::new(3, 2, vec![0, 1, 2, 3, 254, 255])?;
        let bytes = mask_png(&mask)?;
        let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        decoder.set_transformations(png::Transformations::IDENTITY);
        let mut reader = decoder.read_info()?;
        let info = reader.info();
        assert_eq!(info.color_type, png::ColorType::Indexed);
        assert_eq!(info.palette.as_ref().map(|p| p.len()), Some(768));
        let mut buf = vec![0; reader.output_buffer_size().unwrap_or(0)];
        let frame = reader.next_frame(&mut buf)?;
        assert_eq!((frame.width, frame.height), (3, 2));
        assert_eq!(&buf[..6], mask.labels());
        Ok(())
    }

    #[test]
    fn npy_header_is_aligned_and_data_follows() -> anyhow::Result<()> {
        let p = Probabilities::new(2, 1, 3, vec![0.5, 0.25, 1.0, 0.5, 0.75, 0.0])?;
        let mut out = Vec::new();
        write_npy(&mut out, &p)?;
        let header_len = usize::from(u16::from_le_bytes([out[8], out[9]]));
        assert_eq!((10 + header_len) % 64, 0);
        let header = std::str::from_utf8(&out[10..10 + header_len])?;
        assert!(header.contains("'shape': (2, 1, 3)"), "{header}");
        assert!(header.ends_with('\n'));
        let data = &out[10 + header_len..];
        assert_eq!(data.len(), 24);
        assert_eq!(f32::from_le_bytes([data[4], data[5], data[6], data[7]]), 0.25);
        Ok(())
    }
}

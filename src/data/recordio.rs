//! RecordIO framing (dmlc-core `recordio.h`), as used by SageMaker's Pipe mode (`RecordWrapperType: RecordIO`) and by
//! the `application/x-recordio-protobuf` inference response.
//!
//! A record on the wire is `u32 magic = 0xced7230a`, `u32 lrec` (little-endian; `cflag = lrec >> 29`,
//! `len = lrec & (2^29 − 1)`), `len` bytes of data, then zero padding to a multiple of 4. `cflag` 0 is a whole record;
//! dmlc's writer splits a record wherever the magic number occurs (4-byte aligned) inside its data, into a first (1),
//! middle (2, any number) and last (3) part, dropping the magic itself; the reader puts the magic back between parts.
//!
//! [`RecordWriter`] writes cflag 0 only (what SageMaker's Python SDK reader, which ignores cflag, can read);
//! [`RecordWriter::dmlc_splitting`] reproduces dmlc's splitting writer. [`RecordReader`] reads both, checks the part
//! sequence, and refuses records over a size limit before allocating them.

use std::io::{self, Read, Write};

/// The RecordIO magic number.
pub const MAGIC: u32 = 0xced7_230a;
/// Largest length one part can declare (29 bits).
pub const MAX_PART_LEN: usize = (1 << 29) - 1;
/// Default limit on one reassembled record: 1 GiB.
pub const DEFAULT_MAX_RECORD_LEN: usize = 1 << 30;

/// Why a RecordIO stream could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RecordIoError {
    #[error("cannot read the RecordIO stream: {0}")]
    Io(#[from] io::Error),
    #[error("not a RecordIO stream: expected the magic number 0xced7230a at byte {offset}, found {found:#010x}")]
    BadMagic { offset: u64, found: u32 },
    #[error("truncated RecordIO stream: {what} ends at byte {offset}")]
    Truncated { what: &'static str, offset: u64 },
    #[error("invalid RecordIO part sequence at byte {offset}: part flag {cflag} {reason}")]
    BadSequence {
        offset: u64,
        cflag: u32,
        reason: &'static str,
    },
    #[error("RecordIO record at byte {offset} is larger than the limit of {limit} bytes")]
    TooLarge { offset: u64, limit: usize },
}

/// Split a header word into `(cflag, len)`.
pub fn decode_lrec(lrec: u32) -> (u32, usize) {
    (lrec >> 29, (lrec & ((1 << 29) - 1)) as usize)
}

/// Build a header word from a part flag (0..=3) and a length (< 2^29).
pub fn encode_lrec(cflag: u32, len: usize) -> u32 {
    debug_assert!(cflag <= 3 && len <= MAX_PART_LEN);
    (cflag << 29) | (len as u32 & ((1 << 29) - 1))
}

fn padding(len: usize) -> usize {
    (4 - len % 4) % 4
}

/// The 8-byte header of a part: magic, then `lrec` (both little-endian).
pub fn header(cflag: u32, len: usize) -> [u8; 8] {
    let mut out = [0u8; 8];
    out[..4].copy_from_slice(&MAGIC.to_le_bytes());
    out[4..].copy_from_slice(&encode_lrec(cflag, len).to_le_bytes());
    out
}

/// The zero bytes that follow `len` bytes of data to reach a multiple of 4.
pub fn padding_bytes(len: usize) -> &'static [u8] {
    &[0u8; 3][..padding(len)]
}

/// The number of bytes [`RecordWriter::write_record`] (cflag 0) produces for `len` bytes of data.
pub fn framed_len(len: usize) -> usize {
    8 + len + padding(len)
}

/// Writes records to any [`Write`].
#[derive(Debug)]
pub struct RecordWriter<W> {
    inner: W,
    split_on_magic: bool,
}

impl<W: Write> RecordWriter<W> {
    /// A writer that emits every record whole (cflag 0).
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            split_on_magic: false,
        }
    }

    /// A writer that splits records where the magic number occurs in the data, exactly as dmlc-core's writer does.
    pub fn dmlc_splitting(inner: W) -> Self {
        Self {
            inner,
            split_on_magic: true,
        }
    }

    /// Write one record. Fails if the data (or, when splitting, a part) is longer than 2^29 − 1 bytes.
    pub fn write_record(&mut self, data: &[u8]) -> io::Result<()> {
        let mut start = 0;
        if self.split_on_magic {
            let magic = MAGIC.to_le_bytes();
            let aligned_end = data.len() / 4 * 4;
            let mut i = 0;
            while i < aligned_end {
                if data[i..i + 4] == magic {
                    let cflag = if start == 0 { 1 } else { 2 };
                    self.write_part(cflag, &data[start..i])?;
                    start = i + 4;
                }
                i += 4;
            }
        }
        let cflag = if start == 0 { 0 } else { 3 };
        self.write_part(cflag, &data[start..])
    }

    fn write_part(&mut self, cflag: u32, part: &[u8]) -> io::Result<()> {
        if part.len() > MAX_PART_LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a RecordIO record holds at most {MAX_PART_LEN} bytes, got {}",
                    part.len()
                ),
            ));
        }
        self.inner.write_all(&header(cflag, part.len()))?;
        self.inner.write_all(part)?;
        self.inner.write_all(padding_bytes(part.len()))
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }

    pub fn into_inner(self) -> W {
        self.inner
    }
}

/// Frame `data` as one whole record (cflag 0) into a new buffer.
pub fn frame_record(data: &[u8]) -> io::Result<Vec<u8>> {
    let mut writer = RecordWriter::new(Vec::with_capacity(framed_len(data.len())));
    writer.write_record(data)?;
    Ok(writer.into_inner())
}

/// Reads records from any [`Read`] (a file, a Pipe-mode FIFO, an HTTP body).
#[derive(Debug)]
pub struct RecordReader<R> {
    inner: R,
    offset: u64,
    max_record_len: usize,
}

impl<R: Read> RecordReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            offset: 0,
            max_record_len: DEFAULT_MAX_RECORD_LEN,
        }
    }

    /// Refuse records (after reassembly) longer than `max` bytes.
    pub fn with_max_record_len(mut self, max: usize) -> Self {
        self.max_record_len = max;
        self
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The next whole record, `None` at a clean end of stream (no bytes at a record boundary).
    pub fn next_record(&mut self) -> Result<Option<Vec<u8>>, RecordIoError> {
        let record_start = self.offset;
        let mut record = Vec::new();
        let mut in_split = false;
        loop {
            let header_at = self.offset;
            let mut header = [0u8; 8];
            let got = self.read_up_to(&mut header)?;
            if got == 0 && !in_split {
                return Ok(None);
            }
            if got < header.len() {
                return Err(RecordIoError::Truncated {
                    what: "a record header",
                    offset: self.offset,
                });
            }
            let magic = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
            if magic != MAGIC {
                return Err(RecordIoError::BadMagic {
                    offset: header_at,
                    found: magic,
                });
            }
            let (cflag, len) = decode_lrec(u32::from_le_bytes([header[4], header[5], header[6], header[7]]));
            match (in_split, cflag) {
                (false, 0 | 1) | (true, 2 | 3) => {}
                (false, _) => {
                    return Err(RecordIoError::BadSequence {
                        offset: header_at,
                        cflag,
                        reason: "(middle or last part) where a record starts",
                    })
                }
                (true, _) => {
                    return Err(RecordIoError::BadSequence {
                        offset: header_at,
                        cflag,
                        reason: "(a new record) inside a split record",
                    })
                }
            }
            let separator = if in_split { 4 } else { 0 };
            if record.len() + separator + len > self.max_record_len {
                return Err(RecordIoError::TooLarge {
                    offset: record_start,
                    limit: self.max_record_len,
                });
            }
            if in_split {
                record.extend_from_slice(&MAGIC.to_le_bytes());
            }
            let before = record.len();
            let read = (&mut self.inner).take(len as u64).read_to_end(&mut record)?;
            self.offset += read as u64;
            if record.len() - before < len {
                return Err(RecordIoError::Truncated {
                    what: "record data",
                    offset: self.offset,
                });
            }
            let mut pad = [0u8; 3];
            let pad = &mut pad[..padding(len)];
            if self.read_up_to(pad)? < pad.len() {
                return Err(RecordIoError::Truncated {
                    what: "record padding",
                    offset: self.offset,
                });
            }
            match cflag {
                0 | 3 => return Ok(Some(record)),
                _ => in_split = true,
            }
        }
    }

    /// Fill `buf` as far as the stream allows; returns the bytes read (less than `buf.len()` only at end of stream).
    fn read_up_to(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut filled = 0;
        while filled < buf.len() {
            match self.inner.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.offset += filled as u64;
        Ok(filled)
    }
}

impl<R: Read> Iterator for RecordReader<R> {
    type Item = Result<Vec<u8>, RecordIoError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_record().transpose()
    }
}

/// Read every record of an in-memory stream.
pub fn read_all(bytes: &[u8]) -> Result<Vec<Vec<u8>>, RecordIoError> {
    RecordReader::new(bytes).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_all(records: &[&[u8]], splitting: bool) -> Vec<u8> {
        let mut w = if splitting {
            RecordWriter::dmlc_splitting(Vec::new())
        } else {
            RecordWriter::new(Vec::new())
        };
        for r in records {
            w.write_record(r).expect("writing to a Vec");
        }
        w.into_inner()
    }

    #[test]
    fn round_trip_with_every_padding() -> anyhow::Result<()> {
        let records: Vec<Vec<u8>> = (0..9).map(|n| (0..n as u8).collect()).collect();
        let refs: Vec<&[u8]> = records.iter().map(Vec::as_slice).collect();
        for splitting in [false, true] {
            let bytes = write_all(&refs, splitting);
            assert_eq!(bytes.len() % 4, 0);
            assert_eq!(read_all(&bytes)?, records);
        }
        assert_eq!(frame_record(b"abcde")?.len(), framed_len(5));
        Ok(())
    }

    #[test]
    fn header_layout_matches_dmlc() -> anyhow::Result<()> {
        let bytes = frame_record(b"hello")?;
        assert_eq!(&bytes[..4], &[0x0a, 0x23, 0xd7, 0xce]);
        assert_eq!(u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]), 5);
        assert_eq!(&bytes[8..13], b"hello");
        assert_eq!(&bytes[13..], &[0, 0, 0]);
        assert_eq!(decode_lrec(encode_lrec(3, 12345)), (3, 12345));
        Ok(())
    }

    #[test]
    fn records_containing_the_magic_are_split_and_reassembled() -> anyhow::Result<()> {
        let magic = MAGIC.to_le_bytes();
        // magic at the start, in the middle twice in a row, at the end, and once unaligned (not split).
        let mut data = Vec::new();
        data.extend_from_slice(&magic);
        data.extend_from_slice(b"abcdefgh");
        data.extend_from_slice(&magic);
        data.extend_from_slice(&magic);
        data.extend_from_slice(b"ij");
        data.extend_from_slice(&magic); // offset 26: unaligned, stays inside a part
        data.extend_from_slice(b"kl");
        data.extend_from_slice(&magic); // offset 32: aligned, last
        let bytes = write_all(&[&data, b"next"], true);
        let flags: Vec<u32> = headers(&bytes).iter().map(|&(c, _)| c).collect();
        assert_eq!(flags, vec![1, 2, 2, 2, 3, 0]);
        assert_eq!(read_all(&bytes)?, vec![data.clone(), b"next".to_vec()]);
        // The whole-record writer keeps it in one part, which reads back the same.
        assert_eq!(read_all(&write_all(&[&data], false))?, vec![data]);
        Ok(())
    }

    /// `(cflag, len)` of every part, walking the framing.
    fn headers(bytes: &[u8]) -> Vec<(u32, usize)> {
        let mut out = Vec::new();
        let mut at = 0;
        while at + 8 <= bytes.len() {
            let (c, len) = decode_lrec(u32::from_le_bytes([
                bytes[at + 4],
                bytes[at + 5],
                bytes[at + 6],
                bytes[at + 7],
            ]));
            out.push((c, len));
            at += 8 + len + padding(len);
        }
        out
    }

    #[test]
    fn hand_built_split_record_is_reassembled() -> anyhow::Result<()> {
        let mut bytes = Vec::new();
        for (cflag, part) in [(1u32, &b"ab"[..]), (2, b""), (3, b"cdefg")] {
            bytes.extend_from_slice(&MAGIC.to_le_bytes());
            bytes.extend_from_slice(&encode_lrec(cflag, part.len()).to_le_bytes());
            bytes.extend_from_slice(part);
            bytes.extend(std::iter::repeat_n(0u8, padding(part.len())));
        }
        let m = MAGIC.to_le_bytes();
        let expected = [&b"ab"[..], &m, &m, b"cdefg"].concat();
        assert_eq!(read_all(&bytes)?, vec![expected]);
        Ok(())
    }

    #[test]
    fn malformed_streams_are_errors_not_panics() {
        let good = frame_record(b"payload!").expect("framing");
        assert!(matches!(read_all(&good[..3]), Err(RecordIoError::Truncated { .. })));
        assert!(matches!(read_all(&good[..10]), Err(RecordIoError::Truncated { .. })));
        let mut bad = good.clone();
        bad[0] ^= 1;
        assert!(matches!(read_all(&bad), Err(RecordIoError::BadMagic { offset: 0, .. })));
        let lone_last = [MAGIC.to_le_bytes(), encode_lrec(3, 0).to_le_bytes()].concat();
        assert!(matches!(
            read_all(&lone_last),
            Err(RecordIoError::BadSequence { cflag: 3, .. })
        ));
        let unfinished = [MAGIC.to_le_bytes(), encode_lrec(1, 0).to_le_bytes()].concat();
        assert!(matches!(read_all(&unfinished), Err(RecordIoError::Truncated { .. })));
        let restart = [unfinished.clone(), unfinished].concat();
        assert!(matches!(
            read_all(&restart),
            Err(RecordIoError::BadSequence { cflag: 1, .. })
        ));
        let huge = [MAGIC.to_le_bytes(), encode_lrec(0, MAX_PART_LEN).to_le_bytes()].concat();
        assert!(matches!(
            RecordReader::new(&huge[..]).with_max_record_len(1024).next_record(),
            Err(RecordIoError::TooLarge { .. })
        ));
        assert!(matches!(read_all(&huge), Err(RecordIoError::Truncated { .. })));
        assert!(read_all(&[]).map(|r| r.is_empty()).unwrap_or(false));
    }
}

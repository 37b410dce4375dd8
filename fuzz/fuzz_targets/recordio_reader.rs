//! The RecordIO reader on arbitrary bytes: never panics, never allocates past its limit, and every record it
//! returns survives a write/read round trip through both writers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use semseg::data::recordio::{RecordReader, RecordWriter};

fuzz_target!(|data: &[u8]| {
    let mut records = Vec::new();
    for record in RecordReader::new(data).with_max_record_len(1 << 20) {
        match record {
            Ok(r) => records.push(r),
            Err(_) => break,
        }
    }
    for splitting in [false, true] {
        let mut writer = if splitting {
            RecordWriter::dmlc_splitting(Vec::new())
        } else {
            RecordWriter::new(Vec::new())
        };
        for r in &records {
            writer.write_record(r).expect("records read are small enough to write");
        }
        let bytes = writer.into_inner();
        let again: Vec<Vec<u8>> = RecordReader::new(&bytes[..])
            .collect::<Result<_, _>>()
            .expect("what the writer wrote reads back");
        assert_eq!(again, records);
    }
});

//! Pipe-mode reading throughput: RecordIO records/s and MB/s through a FIFO, as a training job reads a channel, with
//! image/annotation records the size of VOC-like JPEGs and PNGs. The reader must outrun training by far (a GPU trains
//! on the order of 10²–10³ images/s at crop 480; the CPU recipe about 10). Run with `cargo bench --bench recordio`.
//!
//! Output lines are `key=value` pairs, one measurement per line: the FIFO read (a writer thread on the other end, as
//! the platform), and the same stream read from memory (the framing alone).

use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use semseg::data::pipe::{read_examples, ExampleReader, StreamOrigin};
use semseg::data::recordio::{RecordWriter, MAGIC};

const PAIRS: usize = 1500;
const IMAGE_BYTES: usize = 120_000;
const ANNOTATION_BYTES: usize = 12_000;

/// `PAIRS` image/annotation records of random bytes, with the magic number planted now and then so that some records
/// arrive split (cflag 1–3), as dmlc's writer produces them.
fn stream() -> Vec<u8> {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut writer = RecordWriter::dmlc_splitting(Vec::with_capacity(PAIRS * (IMAGE_BYTES + ANNOTATION_BYTES + 64)));
    for _ in 0..PAIRS {
        for len in [IMAGE_BYTES, ANNOTATION_BYTES] {
            let mut data = vec![0u8; len];
            rng.fill(&mut data[..]);
            if rng.random_bool(0.1) {
                let at = rng.random_range(0..len / 4) * 4;
                data[at..at + 4].copy_from_slice(&MAGIC.to_le_bytes());
            }
            writer.write_record(&data).expect("writing to a Vec");
        }
    }
    writer.into_inner()
}

fn attributes() -> [String; 2] {
    ["source-ref".to_string(), "city-streets-ref".to_string()]
}

fn report(source: &str, examples: usize, bytes: usize, seconds: f64) {
    println!(
        "recordio source={source} pairs={examples} records={} mb={:.1} seconds={seconds:.3} records_per_s={:.0} \
         pairs_per_s={:.0} mb_per_s={:.0}",
        2 * examples,
        bytes as f64 / 1e6,
        2.0 * examples as f64 / seconds,
        examples as f64 / seconds,
        bytes as f64 / 1e6 / seconds
    );
}

fn main() {
    let bytes = stream();
    let dir = tempfile::tempdir().expect("tempdir");
    for round in 0..3 {
        let fifo = dir.path().join(format!("train_{round}"));
        let path = CString::new(fifo.as_os_str().as_bytes()).expect("path");
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0, "mkfifo");
        let origin = StreamOrigin {
            channel: "train".into(),
            epoch: round + 1,
            fifo: fifo.clone(),
        };
        let to_write = bytes.clone();
        let writer = std::thread::spawn(move || {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .open(&fifo)
                .expect("open the FIFO");
            for chunk in to_write.chunks(1 << 16) {
                file.write_all(chunk).expect("write");
            }
        });
        let started = Instant::now();
        let mut count = 0;
        for example in read_examples(origin, attributes(), Duration::from_secs(10)).expect("open") {
            let example = example.expect("a whole example");
            assert_eq!(
                example.image.len() + example.annotation.len(),
                IMAGE_BYTES + ANNOTATION_BYTES
            );
            count += 1;
        }
        let seconds = started.elapsed().as_secs_f64();
        writer.join().expect("writer");
        assert_eq!(count, PAIRS);
        report("fifo", count, bytes.len(), seconds);
    }
    let started = Instant::now();
    let origin = StreamOrigin {
        channel: "train".into(),
        epoch: 1,
        fifo: "memory".into(),
    };
    let mut count = 0;
    for example in ExampleReader::new(&bytes[..], origin, attributes()) {
        example.expect("a whole example");
        count += 1;
    }
    report("memory", count, bytes.len(), started.elapsed().as_secs_f64());
}

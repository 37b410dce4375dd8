//! A trained model as it arrives from outside: a `model.tar.gz` in the `model` channel of incremental training
//! (`package::unpack_to_scratch`) and in the model directory of `serve` / `predict` (`package::unpack_in_place`),
//! then `model.json` + `model.safetensors` read and checked against the network they describe
//! (`InferenceModel::from_parts`). Any error is fine; a panic, a runaway allocation, or a file written or changed
//! outside the directory being extracted into is not.
//!
//! The first input byte picks how the rest becomes the tarball:
//! - 0: a list of tar entries (kind, raw name bytes, data) that this target packs with valid headers and gzips, so the
//!   fuzzer reaches the entry names (`..`, absolute paths, symlinks and hard links pointing out) and the files'
//!   contents without having to forge tar checksums;
//! - 1: the tarball's bytes as they are (the gzip layer);
//! - 2: tar bytes, which this target gzips (the tar layer).
#![no_main]

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::Device;
use libfuzzer_sys::fuzz_target;
use semseg::model::artifact::{self, InferenceModel};
use semseg::model::package::{self, MODEL_TARBALL};

/// A per-process scratch root holding the three directories the code under test may write to, beside `outside/`,
/// which it must never touch. `TMPDIR` points into it, so `unpack_in_place`'s fallback stays inside too.
struct Root {
    root: PathBuf,
    channel: PathBuf,
    scratch: PathBuf,
    serve: PathBuf,
    tmp: PathBuf,
    outside: PathBuf,
}

const SENTINEL: &[u8] = b"must stay as it is";

fn root() -> &'static Root {
    static ROOT: OnceLock<Root> = OnceLock::new();
    ROOT.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
        // One level more than needed, so an entry escaping the root by one `..` too many is caught as well.
        let root = base.join(format!("semseg-fuzz-model-{}", std::process::id())).join("root");
        let r = Root {
            channel: root.join("channel"),
            scratch: root.join("scratch"),
            serve: root.join("serve"),
            tmp: root.join("tmp"),
            outside: root.join("outside"),
            root,
        };
        // Single-threaded at this point (the first iteration), before any other thread reads the environment.
        std::env::set_var("TMPDIR", &r.tmp);
        r
    })
}

fn reset(dir: &Path) {
    if let Ok(meta) = fs::symlink_metadata(dir) {
        if meta.is_dir() {
            // A directory left read-only by an entry's mode must still go.
            make_writable(dir);
            fs::remove_dir_all(dir).expect("clear a scratch directory");
        } else {
            fs::remove_file(dir).expect("clear a scratch file");
        }
    }
    fs::create_dir_all(dir).expect("create a scratch directory");
}

fn make_writable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o755));
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                make_writable(&entry.path());
            }
        }
    }
}

fn take<'a>(data: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (head, rest) = data.split_at(data.len().min(n));
    *data = rest;
    head
}

fn take_u8(data: &mut &[u8]) -> u8 {
    take(data, 1).first().copied().unwrap_or(0)
}

/// Entries `[kind][name length][name][data length: u16 le][data]...` packed into a tar with valid checksums. The
/// name goes into the header's name field byte for byte (no path checks on the way in); kind 1 and 2 put the data in
/// the link name field (a symlink, a hard link), kind 3 is a directory, anything else a regular file.
fn pack_entries(mut data: &[u8]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    while !data.is_empty() {
        let kind = take_u8(&mut data) % 5;
        let name_len = usize::from(take_u8(&mut data) % 100);
        let name = take(&mut data, name_len);
        let len = usize::from(u16::from_le_bytes([take_u8(&mut data), take_u8(&mut data)]));
        let body = take(&mut data, len);
        let mut header = tar::Header::new_gnu();
        header.as_old_mut().name[..name.len()].copy_from_slice(name);
        header.set_mode(if kind == 4 { 0o555 } else { 0o644 });
        let contents: &[u8] = match kind {
            1 | 2 => {
                let target = &body[..body.len().min(100)];
                header.as_old_mut().linkname[..target.len()].copy_from_slice(target);
                header.set_entry_type(if kind == 1 { tar::EntryType::Symlink } else { tar::EntryType::Link });
                &[]
            }
            3 | 4 => {
                header.set_entry_type(tar::EntryType::Directory);
                &[]
            }
            _ => {
                header.set_entry_type(tar::EntryType::Regular);
                body
            }
        };
        header.set_size(contents.len() as u64);
        header.set_cksum();
        builder.append(&header, contents).expect("tar into memory");
    }
    builder.into_inner().expect("finish the tar")
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).expect("gzip into memory");
    encoder.finish().expect("finish the gzip")
}

/// Reads and checks the artifact in `dir` the way incremental training and serving do.
fn load(dir: &Path) {
    let Ok((meta, tensors)) = artifact::read(dir) else { return };
    let names: BTreeSet<String> = tensors.keys().cloned().collect();
    match InferenceModel::from_parts(meta.clone(), tensors, &Device::Cpu) {
        // Only a complete, exactly shaped state dict builds a network.
        Ok(model) => assert_eq!(model.meta(), &meta),
        Err(error) => assert!(!error.to_string().is_empty(), "errors name the problem ({names:?})"),
    }
}

fuzz_target!(|input: &[u8]| {
    let r = root();
    for dir in [&r.channel, &r.scratch, &r.serve, &r.tmp, &r.outside] {
        reset(dir);
    }
    fs::write(r.outside.join("sentinel"), SENTINEL).expect("write the sentinel");

    let Some((&mode, rest)) = input.split_first() else { return };
    let tarball = match mode % 3 {
        0 => gzip(&pack_entries(rest)),
        1 => rest.to_vec(),
        _ => gzip(rest),
    };
    fs::write(r.channel.join(MODEL_TARBALL), &tarball).expect("write the channel's tarball");
    fs::write(r.serve.join(MODEL_TARBALL), &tarball).expect("write the model directory's tarball");

    // Incremental training: the channel is left as it is, the tarball goes to the scratch directory.
    if let Ok(dir) = package::unpack_to_scratch(&r.channel, &r.scratch) {
        assert_eq!(dir, r.scratch);
        load(&dir);
    }
    // Serving: extracted beside the tarball (or under TMPDIR when that fails).
    if let Ok(dir) = package::unpack_in_place(&r.serve) {
        assert!(dir.starts_with(&r.serve) || dir.starts_with(&r.tmp), "{}", dir.display());
        load(&dir);
    }

    // Nothing escaped: the root holds only its own directories, the channel only its tarball, and outside/ only the
    // untouched sentinel.
    let listing = |dir: &Path| -> BTreeSet<String> {
        fs::read_dir(dir)
            .expect("list a scratch directory")
            .map(|e| e.expect("read a directory entry").file_name().to_string_lossy().into_owned())
            .collect()
    };
    let expected: BTreeSet<String> =
        ["channel", "scratch", "serve", "tmp", "outside"].iter().map(|s| s.to_string()).collect();
    assert_eq!(listing(&r.root), expected, "an entry escaped into the root");
    let parent = r.root.parent().expect("the root has a parent");
    assert_eq!(listing(parent), BTreeSet::from(["root".to_string()]), "an entry escaped above the root");
    assert_eq!(listing(&r.channel), BTreeSet::from([MODEL_TARBALL.to_string()]), "the channel was changed");
    assert_eq!(fs::read(r.channel.join(MODEL_TARBALL)).expect("read the channel's tarball"), tarball);
    assert_eq!(listing(&r.outside), BTreeSet::from(["sentinel".to_string()]), "a file escaped into outside/");
    assert_eq!(fs::read(r.outside.join("sentinel")).expect("read the sentinel"), SENTINEL);
});

//! Finding and unpacking a trained model: the one place that knows a model may arrive as `model.tar.gz` (what
//! SageMaker packs `/opt/ml/model` into) or as the artifact's files themselves ([`super::artifact`]).
//!
//! SageMaker hosting extracts `model.tar.gz` into `/opt/ml/model` itself; local runs, `docker run ... serve` with a
//! mounted training output and the `model` channel of incremental training may hand over the tarball as is.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::artifact::{META_FILE, WEIGHTS_FILE};

/// The tarball a training job's `model/` directory becomes.
pub const MODEL_TARBALL: &str = "model.tar.gz";

/// For serving and `predict`: the directory to load the artifact from. That is `dir` itself, after extracting
/// `dir/model.tar.gz` into it when present; if `dir` is read-only the tarball goes to a fresh temporary directory
/// instead, which is returned.
pub fn unpack_in_place(dir: &Path) -> Result<PathBuf> {
    anyhow::ensure!(
        dir.is_dir(),
        "the model directory {} does not exist; put the trained artifact (or its model.tar.gz) there",
        dir.display()
    );
    let tarball = dir.join(MODEL_TARBALL);
    if !tarball.is_file() {
        return Ok(dir.to_path_buf());
    }
    if is_writable(dir) {
        extract(&tarball, dir)?;
        tracing::info!(tarball = %tarball.display(), "extracted the model tarball");
        return Ok(dir.to_path_buf());
    }
    let fallback = std::env::temp_dir().join(format!("semseg-model-{}", std::process::id()));
    tracing::info!(
        "{} is read-only; extracting {} into {} instead",
        dir.display(),
        tarball.display(),
        fallback.display()
    );
    std::fs::create_dir_all(&fallback).with_context(|| format!("cannot create {}", fallback.display()))?;
    extract(&tarball, &fallback)?;
    Ok(fallback)
}

/// Whether files can be created in `dir` (a mount with `:ro`, or a directory of another user, cannot).
fn is_writable(dir: &Path) -> bool {
    let probe = dir.join(format!(".semseg-write-check-{}", std::process::id()));
    let created = File::create(&probe).is_ok();
    if created {
        let _ = std::fs::remove_file(&probe);
    }
    created
}

/// For incremental training: the directory holding the artifact in `channel_dir`, which is the channel itself when it
/// holds the artifact's files, or `scratch` (emptied first) after extracting the channel's `model.tar.gz`. The
/// channel is left untouched (it may be read-only).
pub fn unpack_to_scratch(channel_dir: &Path, scratch: &Path) -> Result<PathBuf> {
    if channel_dir.join(META_FILE).is_file() && channel_dir.join(WEIGHTS_FILE).is_file() {
        return Ok(channel_dir.to_path_buf());
    }
    let tarball = channel_dir.join(MODEL_TARBALL);
    if !tarball.is_file() {
        bail!(
            "the model channel {} holds neither {MODEL_TARBALL} nor {META_FILE} + {WEIGHTS_FILE}; point it at the \
             {MODEL_TARBALL} of an earlier semseg training job",
            channel_dir.display()
        );
    }
    if scratch.exists() {
        std::fs::remove_dir_all(scratch).with_context(|| format!("cannot clear {}", scratch.display()))?;
    }
    std::fs::create_dir_all(scratch).with_context(|| format!("cannot create {}", scratch.display()))?;
    extract(&tarball, scratch)?;
    Ok(scratch.to_path_buf())
}

/// Extract a gzip-compressed tar into `into`. Entries that would land outside `into` (`..`, paths through a symlink)
/// and entries that are not plain files or directories (symlinks, hard links, FIFOs, devices) are refused, naming
/// the entry; an absolute name is taken relative to `into`, as GNU tar does. A model is two plain files, and a link
/// or a FIFO named `model.safetensors` would make loading read some other file or block for ever.
fn extract(tarball: &Path, into: &Path) -> Result<()> {
    let file = File::open(tarball).with_context(|| format!("cannot open {}", tarball.display()))?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    archive.set_overwrite(true);
    archive.set_preserve_permissions(false);
    let unreadable = || format!("cannot extract {} (is it a gzip-compressed tar?)", tarball.display());
    for entry in archive.entries().with_context(unreadable)? {
        let mut entry = entry.with_context(unreadable)?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let kind = entry.header().entry_type();
        let refused = match () {
            _ if kind.is_symlink() => Some("symbolic link"),
            _ if kind.is_hard_link() => Some("hard link"),
            _ if kind.is_fifo() => Some("FIFO"),
            _ if kind.is_character_special() || kind.is_block_special() => Some("device file"),
            _ => None,
        };
        if let Some(what) = refused {
            bail!(
                "{}: the entry {name:?} is a {what}; a model tarball holds only plain files and directories",
                tarball.display()
            );
        }
        let inside = entry
            .unpack_in(into)
            .with_context(|| format!("cannot extract {name:?} from {}", tarball.display()))?;
        anyhow::ensure!(
            inside,
            "{}: the entry {name:?} points outside the directory it is extracted into",
            tarball.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_tarball(path: &Path, files: &[(&str, &[u8])]) -> Result<()> {
        let file = File::create(path)?;
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(file, flate2::Compression::fast()));
        for (name, data) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder.append_data(&mut header, name, *data)?;
        }
        builder.into_inner()?.finish()?;
        Ok(())
    }

    #[test]
    fn extracts_a_tarball_in_place() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let data = br#"{"num_classes": 3}"#;
        write_tarball(&dir.path().join(MODEL_TARBALL), &[("model.json", data)])?;
        let ready = unpack_in_place(dir.path())?;
        assert_eq!(ready, dir.path());
        assert_eq!(std::fs::read(dir.path().join("model.json"))?, data);
        Ok(())
    }

    #[test]
    fn a_plain_directory_is_used_as_is_and_a_missing_one_is_an_error() -> Result<()> {
        let dir = tempfile::tempdir()?;
        assert_eq!(unpack_in_place(dir.path())?, dir.path());
        let missing = dir.path().join("nope");
        let err = unpack_in_place(&missing)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("does not exist"), "{err}");
        let bad = dir.path().join(MODEL_TARBALL);
        std::fs::write(&bad, b"not a tarball")?;
        assert!(unpack_in_place(dir.path()).is_err());
        Ok(())
    }

    #[test]
    fn a_channel_tarball_goes_to_a_fresh_scratch_directory() -> Result<()> {
        let channel = tempfile::tempdir()?;
        let scratch = tempfile::tempdir()?;
        std::fs::write(scratch.path().join("stale"), b"from an earlier run")?;
        write_tarball(
            &channel.path().join(MODEL_TARBALL),
            &[(META_FILE, b"{}"), (WEIGHTS_FILE, b"w")],
        )?;
        assert_eq!(unpack_to_scratch(channel.path(), scratch.path())?, scratch.path());
        assert!(scratch.path().join(WEIGHTS_FILE).is_file());
        assert!(!scratch.path().join("stale").exists());
        assert!(
            !channel.path().join(META_FILE).exists(),
            "the channel is not written to"
        );

        // Files already extracted in the channel are used where they are.
        let extracted = tempfile::tempdir()?;
        std::fs::write(extracted.path().join(META_FILE), b"{}")?;
        std::fs::write(extracted.path().join(WEIGHTS_FILE), b"w")?;
        assert_eq!(unpack_to_scratch(extracted.path(), scratch.path())?, extracted.path());

        let empty = tempfile::tempdir()?;
        let err = unpack_to_scratch(empty.path(), scratch.path())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("holds neither model.tar.gz"), "{err}");
        Ok(())
    }

    /// A tar entry with its name (and link target) written into the header byte for byte, as a hostile or broken
    /// archive would have them: `tar::Builder`'s own path methods refuse `..`.
    fn raw_entry(kind: tar::EntryType, name: &str, link: &str, data: &[u8]) -> (tar::Header, Vec<u8>) {
        let mut header = tar::Header::new_gnu();
        header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        header.set_entry_type(kind);
        header.set_mode(0o644);
        header.set_size(data.len() as u64);
        header.set_cksum();
        (header, data.to_vec())
    }

    #[test]
    fn a_tarball_cannot_write_outside_the_directory_it_is_extracted_into() -> Result<()> {
        let root = tempfile::tempdir()?;
        let (channel, scratch, outside) = (
            root.path().join("channel"),
            root.path().join("scratch"),
            root.path().join("outside"),
        );
        for dir in [&channel, &scratch, &outside] {
            std::fs::create_dir(dir)?;
        }
        let sentinel = outside.join("sentinel");
        std::fs::write(&sentinel, b"untouched")?;
        let (outside_text, sentinel_text) = (outside.display().to_string(), sentinel.display().to_string());
        // Each way out a tarball could try; every one is its own archive, so one refusal does not hide the next.
        let attempts: Vec<Vec<(tar::Header, Vec<u8>)>> = vec![
            vec![raw_entry(tar::EntryType::Regular, "../escaped", "", b"x")],
            vec![raw_entry(tar::EntryType::Regular, "sub/../../escaped", "", b"x")],
            vec![raw_entry(
                tar::EntryType::Regular,
                &format!("{}/escaped", outside_text),
                "",
                b"x",
            )],
            vec![
                raw_entry(tar::EntryType::Symlink, "link", &outside_text, b""),
                raw_entry(tar::EntryType::Regular, "link/escaped", "", b"x"),
            ],
            vec![
                raw_entry(tar::EntryType::Symlink, "relative", "../outside", b""),
                raw_entry(tar::EntryType::Regular, "relative/escaped", "", b"x"),
            ],
            vec![
                raw_entry(tar::EntryType::Symlink, META_FILE, &sentinel_text, b""),
                raw_entry(tar::EntryType::Regular, META_FILE, "", b"overwritten"),
            ],
            vec![
                raw_entry(tar::EntryType::Link, "hard", &sentinel_text, b""),
                raw_entry(tar::EntryType::Regular, "hard", "", b"overwritten"),
            ],
            vec![
                raw_entry(tar::EntryType::Link, "hard", "../outside/sentinel", b""),
                raw_entry(tar::EntryType::Regular, "hard", "", b"overwritten"),
            ],
            // Not a way out, but loading would block for ever on it.
            vec![raw_entry(tar::EntryType::Fifo, WEIGHTS_FILE, "", b"")],
        ];
        for (i, entries) in attempts.iter().enumerate() {
            let file = File::create(channel.join(MODEL_TARBALL))?;
            let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(file, flate2::Compression::fast()));
            for (header, data) in entries {
                builder.append(header, data.as_slice())?;
            }
            builder.into_inner()?.finish()?;
            match unpack_to_scratch(&channel, &scratch) {
                // An absolute name is taken relative to the directory, as GNU tar does.
                Ok(_) if i == 2 => assert!(scratch.join(outside.strip_prefix("/")?).join("escaped").is_file()),
                Ok(_) => panic!("attempt {i} was extracted without an error"),
                Err(e) => {
                    let err = format!("{e:#}");
                    let named =
                        |h: &tar::Header| err.contains(&format!("{:?}", String::from_utf8_lossy(&h.path_bytes())));
                    assert!(
                        entries.iter().any(|(h, _)| named(h)),
                        "attempt {i}: the error names the entry: {err}"
                    );
                }
            }
            let mut names: Vec<_> = std::fs::read_dir(root.path())?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<Result<_, _>>()?;
            names.sort();
            assert_eq!(
                names,
                ["channel", "outside", "scratch"],
                "attempt {i}: an entry escaped into the root"
            );
            let outside_names: Vec<_> = std::fs::read_dir(&outside)?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<Result<_, _>>()?;
            assert_eq!(
                outside_names,
                ["sentinel"],
                "attempt {i}: an entry escaped into a sibling directory"
            );
            assert_eq!(
                std::fs::read(&sentinel)?,
                b"untouched",
                "attempt {i}: a file outside was overwritten"
            );
        }
        Ok(())
    }

    #[test]
    fn a_tarball_made_with_tar_from_inside_the_directory_extracts() -> Result<()> {
        // `tar czf model.tar.gz -C model .` names its entries `./`, `./model.json`, ...
        let dir = tempfile::tempdir()?;
        let file = File::create(dir.path().join(MODEL_TARBALL))?;
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(file, flate2::Compression::fast()));
        let mut entries = vec![raw_entry(tar::EntryType::Directory, "./", "", b"")];
        entries.push(raw_entry(tar::EntryType::Regular, "./model.json", "", b"{}"));
        entries.push(raw_entry(tar::EntryType::Directory, "./extra/", "", b""));
        entries.push(raw_entry(tar::EntryType::Regular, "./extra/notes.txt", "", b"n"));
        for (header, data) in &entries {
            builder.append(header, data.as_slice())?;
        }
        builder.into_inner()?.finish()?;
        assert_eq!(unpack_in_place(dir.path())?, dir.path());
        assert_eq!(std::fs::read(dir.path().join(META_FILE))?, b"{}");
        assert!(dir.path().join("extra/notes.txt").is_file());
        Ok(())
    }
}

//! semseg patch (PATCHED.md): each PTX module also packed as a fat binary holding machine code (SASS) for the GPUs
//! named in `CUDA_SASS_ARCHS`, beside the PTX itself. Loading a fat binary whose SASS matches the GPU skips the
//! driver's JIT compilation of the PTX; on any other GPU the driver JIT-compiles the PTX inside it, as before.
//!
//! `CUDA_SASS_ARCHS`: compute capabilities, separated by spaces or commas (`"75 80 86 89 90"`); unset, the
//! `CUDA_COMPUTE_CAP` the PTX was built for; `none` (or empty) writes no fat binaries. PTX built for compute
//! capability `c` assembles only for `c` and later ones (an architecture-specific target such as `90a`, which
//! cudaforge makes of `CUDA_COMPUTE_CAP=90`, only for itself): the others are left out with a build warning. SASS
//! for `x.y` runs on GPUs `x.z` with `z ≥ y`; SASS for `90a` on 9.0 GPUs (H100, H200).
//!
//! Candle's bf16 kernels (every `#if __CUDA_ARCH__ >= 800` section) exist only in code compiled for 8.0 or later,
//! so PTX built for an older `CUDA_COMPUTE_CAP` (70 in semseg's Dockerfile.train, for the V100) has none. Where such
//! a build also names capabilities of 8.0 or later, each module's source is compiled once more to PTX for 8.0: the
//! machine code for those capabilities is assembled from it, and it goes into the fat binary beside the older PTX,
//! so that any GPU of 8.0 or later without machine code here JIT-compiles a PTX that has the bf16 kernels. One
//! binary then runs on a V100 and trains in bf16 on an A100 or H100.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use cudaforge::{Error, Result};

/// Modules left as PTX: candle's quantized kernels (the largest module by far) are never loaded by semseg, which
/// runs no quantized op; any other user of this copy would JIT them on first use, as upstream does.
const PTX_ONLY: &[&str] = &["quantized"];

/// The first compute capability whose code has Candle's bf16 kernels.
const BF16_ARCH: u32 = 80;

/// Writes `OUT_DIR/fatbin.rs`: for each module of `ptx.rs`, `pub const <NAME>: Option<&[u8]>`, its fat binary or
/// `None`. `nvcc_args` are the arguments the PTX was compiled with (for compiling a module's source again).
pub fn write_fatbins(out_dir: &Path, nvcc_args: &[&str]) -> Result<()> {
    println!("cargo::rerun-if-env-changed=CUDA_SASS_ARCHS");
    let wanted = wanted_archs()?;
    let tools = Tools {
        nvcc: tool("nvcc"),
        ptxas: tool("ptxas"),
        fatbinary: tool("fatbinary"),
        nvcc_args: nvcc_args.iter().map(|a| a.to_string()).collect(),
    };
    let mut rust = String::new();
    for ptx in ptx_files(out_dir)? {
        let name = ptx.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
        let constant = name.to_uppercase().replace(['.', '-'], "_");
        let fatbin = if PTX_ONLY.contains(&name.as_str()) || wanted.is_empty() {
            None
        } else {
            fatbin(&ptx, &wanted, &tools, out_dir)?
        };
        match fatbin {
            Some(path) => writeln!(
                rust,
                "pub const {constant}: Option<&[u8]> = Some(include_bytes!({:?}));",
                path.display().to_string()
            ),
            None => writeln!(rust, "pub const {constant}: Option<&[u8]> = None;"),
        }
        .expect("writing to a String");
    }
    std::fs::write(out_dir.join("fatbin.rs"), rust)?;
    Ok(())
}

/// The compute capabilities asked for, as `ptxas` names them without `sm_` (`"90"`, `"90a"`).
fn wanted_archs() -> Result<Vec<String>> {
    let list = match std::env::var("CUDA_SASS_ARCHS") {
        Ok(list) => list,
        Err(_) => std::env::var("CUDA_COMPUTE_CAP").unwrap_or_default(),
    };
    if list.trim() == "none" {
        return Ok(Vec::new());
    }
    list.split([' ', ','])
        .filter(|a| !a.is_empty())
        .map(|a| {
            let a = a.trim_start_matches("sm_").to_string();
            if arch_number(&a).is_some() {
                Ok(a)
            } else {
                Err(Error::InvalidConfig(format!(
                    "CUDA_SASS_ARCHS: {a:?} is not a compute capability (write e.g. \"80 86 90\")"
                )))
            }
        })
        .collect()
}

/// `"90a"` → 90.
fn arch_number(arch: &str) -> Option<u32> {
    arch.trim_end_matches(|c: char| c.is_ascii_alphabetic()).parse().ok()
}

/// The `.ptx` files that cudaforge wrote into `out_dir`.
fn ptx_files(out_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(out_dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|e| e == "ptx"))
        .collect();
    files.sort();
    Ok(files)
}

/// The architecture a PTX file targets (its `.target sm_XX` line, without `sm_`).
fn ptx_target(ptx: &Path) -> Result<String> {
    let text = std::fs::read_to_string(ptx)?;
    text.lines()
        .find_map(|line| line.trim().strip_prefix(".target sm_"))
        .map(|rest| rest.split([',', ' ']).next().unwrap_or_default().to_string())
        .ok_or_else(|| Error::CompilationFailed {
            path: ptx.to_path_buf(),
            message: "no `.target sm_XX` line in the PTX".into(),
        })
}

/// Assembles `ptx` for each wanted architecture it can run on and packs the results and the PTX into
/// `<name>.fatbin`; `None` if none of them can take it. Below [`BF16_ARCH`], the module's source is compiled to PTX
/// for it as well (see the module's notes).
fn fatbin(ptx: &Path, wanted: &[String], tools: &Tools, out_dir: &Path) -> Result<Option<PathBuf>> {
    let target = ptx_target(ptx)?;
    let target_number = arch_number(&target).unwrap_or(u32::MAX);
    let specific = target.ends_with(|c: char| c.is_ascii_alphabetic());
    let wants_bf16 = wanted
        .iter()
        .any(|arch| arch_number(arch).is_some_and(|n| n >= BF16_ARCH));
    let bf16_ptx = if !specific && target_number < BF16_ARCH && wants_bf16 {
        Some(compile_ptx_for_bf16(ptx, tools, out_dir)?)
    } else {
        None
    };
    let mut images = Vec::new();
    for arch in wanted {
        // cudaforge builds for `90a` when asked for 90: that PTX assembles for sm_90a alone, which runs on every
        // 9.0 GPU, so "90" in the list takes it.
        let fits = if specific {
            arch_number(arch) == Some(target_number)
        } else {
            arch_number(arch).is_some_and(|n| n >= target_number)
        };
        if !fits {
            println!(
                "cargo:warning={}: PTX built for sm_{target} cannot be assembled for sm_{arch}; that GPU JIT-compiles it",
                ptx.display()
            );
            continue;
        }
        let arch = if specific { &target } else { arch };
        if images.iter().any(|image: &String| image.contains(&format!(",sm={arch},"))) {
            continue; // "90" and "90a" both listed
        }
        let from = match &bf16_ptx {
            Some(bf16) if arch_number(arch).is_some_and(|n| n >= BF16_ARCH) => bf16.as_path(),
            _ => ptx,
        };
        let cubin = ptx.with_extension(format!("sm_{arch}.cubin"));
        run(
            Command::new(&tools.ptxas)
                .arg(format!("-arch=sm_{arch}"))
                .arg("-O3")
                .arg(from)
                .arg("-o")
                .arg(&cubin),
            ptx,
        )?;
        images.push(format!("--image3=kind=elf,sm={arch},file={}", cubin.display()));
    }
    if images.is_empty() {
        return Ok(None);
    }
    if let Some(bf16) = &bf16_ptx {
        images.push(format!("--image3=kind=ptx,sm={BF16_ARCH},file={}", bf16.display()));
    }
    let fatbin = ptx.with_extension("fatbin");
    run(
        Command::new(&tools.fatbinary)
            .arg(format!("--create={}", fatbin.display()))
            .arg("-64")
            .args(&images)
            .arg(format!("--image3=kind=ptx,sm={target},file={}", ptx.display())),
        ptx,
    )?;
    Ok(Some(fatbin))
}

/// Compiles the source of the module whose PTX is `ptx` (`src/<name>.cu`) to PTX for [`BF16_ARCH`], with the
/// arguments cudaforge compiled it with, into `OUT_DIR/bf16/<name>.ptx` (a folder of its own: every `.ptx` file in
/// `OUT_DIR` is taken for a module).
fn compile_ptx_for_bf16(ptx: &Path, tools: &Tools, out_dir: &Path) -> Result<PathBuf> {
    let name = ptx.file_stem().unwrap_or_default();
    let source = Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default())
        .join("src")
        .join(name)
        .with_extension("cu");
    if !source.exists() {
        return Err(Error::CompilationFailed {
            path: ptx.to_path_buf(),
            message: format!("its source {} is missing", source.display()),
        });
    }
    let dir = out_dir.join("bf16");
    std::fs::create_dir_all(&dir)?;
    let output = dir.join(name).with_extension("ptx");
    let mut command = Command::new(&tools.nvcc);
    command
        .arg(format!("-gencode=arch=compute_{BF16_ARCH},code=compute_{BF16_ARCH}"))
        .arg("--ptx")
        .args(["--default-stream", "per-thread"])
        .args(&tools.nvcc_args);
    if let Ok(ccbin) = std::env::var("NVCC_CCBIN") {
        command.arg("-allow-unsupported-compiler").args(["-ccbin", &ccbin]);
    }
    run(command.arg(&source).arg("-o").arg(&output), ptx)?;
    Ok(output)
}

/// The CUDA tools this needs, found once.
struct Tools {
    nvcc: PathBuf,
    ptxas: PathBuf,
    fatbinary: PathBuf,
    /// The arguments cudaforge compiled the PTX with, besides the architecture and the default stream.
    nvcc_args: Vec<String>,
}

/// A CUDA tool beside the `nvcc` that cudaforge found (it sits in the toolkit's `bin`).
fn tool(name: &str) -> PathBuf {
    cudaforge::CudaToolkit::detect()
        .ok()
        .and_then(|t| t.nvcc_path.parent().map(|bin| bin.join(name)))
        .filter(|path| path.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

fn run(command: &mut Command, ptx: &Path) -> Result<()> {
    let output = command.output().map_err(|e| Error::CompilationFailed {
        path: ptx.to_path_buf(),
        message: format!("cannot run {:?}: {e}", command.get_program()),
    })?;
    if !output.status.success() {
        return Err(Error::CompilationFailed {
            path: ptx.to_path_buf(),
            message: format!(
                "{:?} failed:\n{}{}",
                command.get_program(),
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        });
    }
    Ok(())
}

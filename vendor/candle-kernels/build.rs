use cudaforge::{KernelBuilder, Result};

mod sass;
use std::env;
use std::path::PathBuf;

const CUTILE_FEATURE: &str = "CARGO_FEATURE_CUTILE";

fn main() -> Result<()> {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src");
    println!("cargo::rerun-if-changed=src/compatibility.cuh");
    println!("cargo::rerun-if-changed=src/cuda_utils.cuh");
    println!("cargo::rerun-if-changed=src/binary_op_macros.cuh");

    // Build for PTX
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let ptx_path = out_dir.join("ptx.rs");
    // semseg patch: the arguments named once, for sass.rs to compile a module's source again.
    const PTX_ARGS: [&str; 3] = ["--expt-relaxed-constexpr", "-std=c++17", "-O3"];
    let bindings = KernelBuilder::new()
        .source_dir("src") // Scan src/ for .cu files
        .exclude(&["moe_*.cu", "mmvq_gguf.cu", "mmq_*.cu"]) // Exclude statically compiled kernels from ptx build
        .args(PTX_ARGS)
        .build_ptx()?;

    bindings.write(&ptx_path)?;
    // semseg patch (PATCHED.md): machine code for the GPUs named in CUDA_SASS_ARCHS, so that loading a module does
    // not JIT-compile its PTX (about 20 s of CPU on a fresh machine), and the bf16 kernels for GPUs of 8.0 or later
    // when CUDA_COMPUTE_CAP is older.
    sass::write_fatbins(&out_dir, &PTX_ARGS)?;

    let mut moe_sources = vec![
        "src/moe/moe_gguf.cu",
        "src/moe/moe_wmma.cu",
        "src/moe/moe_wmma_gguf.cu",
        "src/mmvq_gguf.cu",
        "src/mmq_gguf/mmq_quantize.cu",
        "src/mmq_gguf/mmq_instance_q4_0.cu",
        "src/mmq_gguf/mmq_instance_q4_1.cu",
        "src/mmq_gguf/mmq_instance_q5_0.cu",
        "src/mmq_gguf/mmq_instance_q5_1.cu",
        "src/mmq_gguf/mmq_instance_q8_0.cu",
        "src/mmq_gguf/mmq_instance_q2_k.cu",
        "src/mmq_gguf/mmq_instance_q3_k.cu",
        "src/mmq_gguf/mmq_instance_q4_k.cu",
        "src/mmq_gguf/mmq_instance_q5_k.cu",
        "src/mmq_gguf/mmq_instance_q6_k.cu",
    ];
    if env::var_os(CUTILE_FEATURE).is_some() {
        moe_sources.push("src/moe/moe_align.cu");
    }

    let mut moe_builder = KernelBuilder::default()
        .source_files(moe_sources)
        .arg("--expt-relaxed-constexpr")
        .arg("-std=c++17")
        .arg("-O3");

    // Disable bf16 WMMA kernels on GPUs older than sm_80 (Ampere).
    // bf16 WMMA fragments require compute capability >= 8.0.
    let compute_cap = cudaforge::detect_compute_cap()
        .map(|arch| arch.base())
        .unwrap_or(80);
    if compute_cap < 80 {
        moe_builder = moe_builder.arg("-DNO_BF16_KERNEL");
    }

    let mut is_target_msvc = false;
    if let Ok(target) = std::env::var("TARGET") {
        if target.contains("msvc") {
            is_target_msvc = true;
            moe_builder = moe_builder.arg("-D_USE_MATH_DEFINES");
        }
    }

    if !is_target_msvc {
        moe_builder = moe_builder.arg("-Xcompiler").arg("-fPIC");
    }

    moe_builder.build_lib(out_dir.join("libmoe.a"))?;
    println!("cargo:rustc-link-search={}", out_dir.display());
    println!("cargo:rustc-link-lib=moe");
    // The CUDA runtime, linked statically (nvcc's own default), so that a binary with these kernels starts where
    // libcudart.so is absent: with no NVIDIA driver (cudart opens libcuda.so.1 itself, on its first call), the
    // program can run on the CPU instead of being stopped by the dynamic linker.
    match static_cudart_dir() {
        Some(dir) if !is_target_msvc => {
            println!("cargo:rustc-link-search=native={}", dir.display());
            println!("cargo:rustc-link-lib=static=cudart_static");
            for system in ["dl", "rt", "pthread"] {
                println!("cargo:rustc-link-lib=dylib={system}");
            }
        }
        _ => {
            if !is_target_msvc {
                println!(
                    "cargo:warning=libcudart_static.a not found: linking libcudart.so, which the binary then needs \
                     to start"
                );
            }
            println!("cargo:rustc-link-lib=dylib=cudart");
        }
    }
    if !is_target_msvc {
        println!("cargo:rustc-link-lib=stdc++");
    }
    Ok(())
}

/// The folder holding `libcudart_static.a`: lib64/ beside nvcc's bin/ (NVIDIA's images), lib/ (NVIDIA's pip
/// wheels), or wherever the C compiler finds it (Debian's packages, in the multiarch folder). rustc looks for a
/// static library only in the folders it is given, so the folder is named even where the linker would find it.
fn static_cudart_dir() -> Option<PathBuf> {
    const FILE: &str = "libcudart_static.a";
    let toolkit = cudaforge::CudaToolkit::detect().ok();
    let beside_nvcc = toolkit.iter().flat_map(|toolkit| {
        let lib = toolkit.lib_dir.parent().map(|root| root.join("lib"));
        std::iter::once(toolkit.lib_dir.clone()).chain(lib)
    });
    let compiler = env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let from_compiler = std::process::Command::new(compiler)
        .arg(format!("-print-file-name={FILE}"))
        .output()
        .ok()
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .map(|path| PathBuf::from(path.trim()))
        .filter(|path| path.is_absolute())
        .and_then(|path| path.parent().map(PathBuf::from));
    beside_nvcc
        .chain(from_compiler)
        .find(|dir| dir.join(FILE).is_file())
}

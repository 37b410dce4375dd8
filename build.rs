//! Decides, at build time, whether the tests that need tools from outside Rust are mandatory (cfg
//! `semseg_external_tests`): the container tests (Docker, root, debootstrap, python3 with the SageMaker SDK), the
//! Python recordio-protobuf decoder test (python3 with protobuf) and the ONNX export test (python3 with numpy and
//! onnxruntime). They are when `CI=true` (CI runs exactly
//! `cargo test --release --locked`) or `SEMSEG_EXTERNAL_TESTS=1`; otherwise they are built `#[ignore]`d, so that
//! cargo lists them as ignored, with the reason, instead of passing them without running them. `#[ignore]` is fixed
//! when a test is compiled, hence a build script rather than a check at run time.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(semseg_external_tests)");
    println!("cargo::rerun-if-env-changed=CI");
    println!("cargo::rerun-if-env-changed=SEMSEG_EXTERNAL_TESTS");
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let asked = std::env::var("SEMSEG_EXTERNAL_TESTS").is_ok_and(|v| v == "1");
    if ci || asked {
        println!("cargo::rustc-cfg=semseg_external_tests");
    }
    // The compute capability Candle's CUDA kernels are compiled for (bf16 kernels need 80 or more): recorded so that
    // the binary's message, when precision=bf16 cannot run on a GPU, says what it was built for.
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_default();
    println!("cargo::rustc-env=SEMSEG_CUDA_COMPUTE_CAP={cap}");
    // And the capabilities given machine code (vendor/candle-kernels/sass.rs), named when bf16 cannot run.
    println!("cargo::rerun-if-env-changed=CUDA_SASS_ARCHS");
    let sass = std::env::var("CUDA_SASS_ARCHS").unwrap_or_default();
    println!("cargo::rustc-env=SEMSEG_CUDA_SASS_ARCHS={sass}");
}

//! A state dict as `semseg import` reads it (`artifact::read_state_dict`): a `torch.save` file (a zip holding a
//! pickle and the tensors' storages, Candle's reader) or a safetensors file, on arbitrary bytes. Any error is fine; a
//! panic or a runaway allocation is not, and every tensor read is f32 with as many values as its shape says.
//!
//! The first input byte picks the extension: even `.pth`, odd `.safetensors`.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use semseg::model::artifact;

fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("semseg-fuzz-state-dict-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the scratch directory");
        dir
    })
}

fuzz_target!(|input: &[u8]| {
    let Some((&kind, bytes)) = input.split_first() else { return };
    let path = scratch().join(if kind % 2 == 0 { "weights.pth" } else { "weights.safetensors" });
    std::fs::write(&path, bytes).expect("write the state dict");
    if let Ok(tensors) = artifact::read_state_dict(&path) {
        for (name, tensor) in tensors {
            assert_eq!(tensor.dtype(), candle_core::DType::F32, "{name}");
            let values = tensor.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("the tensor's values read");
            assert_eq!(values.len(), tensor.elem_count(), "{name}");
        }
    }
});

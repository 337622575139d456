//! CUDA against the CPU (feature `cuda`): the fixtures' logits, f32, every position, in one pass
//! and one token at a time, within 1e-3 of the CPU's. Without a CUDA device, or without the
//! feature, the test says why and passes: the CUDA build is checked on machines without a GPU
//! (`scripts/cuda_build.sh check`), and the GPU run is `scripts/cuda_device.sh`.

mod common;

use common::{fixture_dir, max_abs_diff, reference, reference_tokens, HF_FIXTURES};
use mirror_core::{load_model_dir, DirFiles, LoadOptions, Tensor};

const TOLERANCE: f32 = 1e-3;

#[cfg(feature = "cuda")]
fn cuda_device() -> Option<mirror_core::Device> {
    match mirror_core::Device::new_cuda_with_stream(0) {
        Ok(device) => Some(device),
        Err(e) => {
            eprintln!("skipping: no CUDA device ({e})");
            None
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_device() -> Option<mirror_core::Device> {
    eprintln!("skipping: built without --features cuda");
    None
}

#[test]
fn cuda_logits_match_cpu_logits_in_f32() {
    let Some(device) = cuda_device() else {
        return;
    };
    for name in HF_FIXTURES {
        let files = DirFiles::local(&fixture_dir(name)).unwrap();
        let cpu = load_model_dir(&files, &LoadOptions::default()).unwrap();
        let gpu = load_model_dir(
            &files,
            &LoadOptions {
                device: device.clone(),
                ..LoadOptions::default()
            },
        )
        .unwrap();
        let reference = reference(name);
        for i in 0..3 {
            let tokens = reference_tokens(&reference, i);
            let mut cache = cpu.new_cache(1, 32).unwrap();
            let expected = cpu.forward_causal(&tokens, &mut cache).unwrap();
            let mut cache = gpu.new_cache(1, 32).unwrap();
            let full = gpu.forward_causal(&tokens, &mut cache).unwrap();
            cache.clear();
            let rows: Vec<Tensor> = tokens
                .iter()
                .map(|&t| gpu.forward_causal(&[t], &mut cache).unwrap())
                .collect();
            let incremental = Tensor::cat(&rows, 0).unwrap();
            for (what, logits) in [("one pass", full), ("token by token", incremental)] {
                let logits = logits.to_device(&mirror_core::Device::Cpu).unwrap();
                let diff = max_abs_diff(&logits, &expected);
                assert!(
                    diff <= TOLERANCE,
                    "{name} sequence {i}, {what}: max |cuda - cpu| {diff}"
                );
            }
        }
    }
}

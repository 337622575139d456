//! GGUF loading checked against transformers: the tiny fixtures are written as GGUF files the way
//! llama.cpp exports them (llama: q/k rows permuted for interleaved RoPE; qwen2: unchanged), then
//! loaded through our GGUF path and compared with the reference logits.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use common::{fixture_dir, max_abs_diff, reference, reference_tokens};
use mirror_core::models::config_from_gguf;
use mirror_core::weights::{GgufWeights, WeightSource};
use mirror_core::{Model, ModelConfig};

/// llama.cpp's permutation of q/k rows: half-split (NeoX) pairs become adjacent pairs.
fn permute_for_interleaved(w: &Tensor, heads: usize) -> Tensor {
    let (rows, cols) = w.dims2().unwrap();
    w.reshape((heads, 2, rows / heads / 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((rows, cols))
        .unwrap()
        .contiguous()
        .unwrap()
}

fn gguf_name(hf: &str) -> String {
    GgufWeights::gguf_name(hf).unwrap_or_else(|| panic!("no GGUF name for {hf}"))
}

/// Writes a fixture checkpoint as an f32 GGUF file with llama.cpp metadata keys.
pub fn write_fixture_gguf(name: &str, arch: &str, out: &Path) -> ModelConfig {
    let dir = fixture_dir(name);
    let config_text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let config = ModelConfig::from_json(&config_text, "fixture").unwrap();
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap().to_str().unwrap().to_string();
        if file.ends_with(".safetensors") && file != "reference.safetensors" {
            tensors.extend(candle_core::safetensors::load(&path, &Device::Cpu).unwrap());
        }
    }
    let mut qtensors = Vec::new();
    for (hf, t) in &tensors {
        let t = if arch == "llama" && hf.ends_with("q_proj.weight") {
            permute_for_interleaved(t, config.num_attention_heads)
        } else if arch == "llama" && hf.ends_with("k_proj.weight") {
            permute_for_interleaved(t, config.num_kv_heads())
        } else {
            t.clone()
        };
        qtensors.push((
            gguf_name(hf),
            QTensor::quantize(&t, GgmlDType::F32).unwrap(),
        ));
    }
    let u32v = |v: usize| Value::U32(v as u32);
    let metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (
            format!("{arch}.block_count"),
            u32v(config.num_hidden_layers),
        ),
        (
            format!("{arch}.context_length"),
            u32v(config.max_position_embeddings),
        ),
        (format!("{arch}.embedding_length"), u32v(config.hidden_size)),
        (
            format!("{arch}.feed_forward_length"),
            u32v(config.intermediate_size),
        ),
        (
            format!("{arch}.attention.head_count"),
            u32v(config.num_attention_heads),
        ),
        (
            format!("{arch}.attention.head_count_kv"),
            u32v(config.num_kv_heads()),
        ),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(config.rms_norm_eps as f32),
        ),
        (
            format!("{arch}.rope.freq_base"),
            Value::F32(config.rope_theta as f32),
        ),
    ];
    let metadata_refs: Vec<(&str, &Value)> =
        metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> =
        qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::fs::File::create(out).unwrap();
    gguf_file::write(&mut file, &metadata_refs, &tensor_refs).unwrap();
    config
}

fn load_gguf_model(path: &Path) -> Model {
    let weights = GgufWeights::open(path).unwrap();
    let config = config_from_gguf(weights.content(), path).unwrap();
    Model::load(
        config,
        &weights as &dyn WeightSource,
        &mirror_core::LoadOptions::default(),
    )
    .unwrap()
}

#[test]
fn gguf_exports_reproduce_transformers_logits() {
    for (name, arch) in [("llama", "llama"), ("qwen2", "qwen2")] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(format!("{name}.gguf"));
        write_fixture_gguf(name, arch, &path);
        let model = load_gguf_model(&path);
        assert_eq!(model.config().rope_interleaved, arch == "llama");
        let reference = reference(name);
        for i in 0..3 {
            let tokens = reference_tokens(&reference, i);
            let mut cache = model.new_cache(1, 32).unwrap();
            let logits = model.forward_causal(&tokens, &mut cache).unwrap();
            let diff = max_abs_diff(&logits, &reference[&format!("logits_{i}")]);
            assert!(diff < 1e-4, "{name} via GGUF, sequence {i}: {diff}");
        }
    }
}

#[test]
fn every_loader_honours_the_thread_option() {
    use mirror_core::{load_dir, load_gguf, DirFiles, LoadOptions};
    let options = LoadOptions {
        threads: Some(1),
        ..LoadOptions::default()
    };
    let files = DirFiles::local(&fixture_dir("qwen2")).unwrap();
    assert_eq!(load_dir(&files, &options).unwrap().model.threads(), Some(1));
    assert_eq!(
        load_dir(&files, &LoadOptions::default())
            .unwrap()
            .model
            .threads(),
        None
    );
    if let Some(real) = common::smollm2_path() {
        assert_eq!(load_gguf(&real, &options).unwrap().model.threads(), Some(1));
    }
}

//! Every bad input gets a typed error that names the file and the problem, never a panic.

mod common;

use std::path::{Path, PathBuf};

use common::fixture_dir;
use mirror_core::{load, load_dir, load_model_dir, DirFiles, Error, LoadOptions, ModelSource};

/// A copy of a fixture directory that a test can damage.
fn copy_fixture(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(name);
    std::fs::create_dir(&dir).unwrap();
    for entry in std::fs::read_dir(fixture_dir(name)).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    (tmp, dir)
}

fn load_model(dir: &Path) -> Result<mirror_core::Model, Error> {
    load_model_dir(&DirFiles::local(dir)?, &LoadOptions::default())
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(path, config.to_string()).unwrap();
}

#[test]
fn missing_directory_and_files() {
    let err = load(
        &ModelSource::Dir("/nonexistent/model".into()),
        &LoadOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::MissingFile { .. }), "{err}");

    let (_tmp, dir) = copy_fixture("qwen2");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let err = load_model(&dir).unwrap_err();
    assert!(
        matches!(&err, Error::MissingFile { path, .. } if path.ends_with("config.json")),
        "{err}"
    );

    let (_tmp, dir) = copy_fixture("qwen2");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let err = load_model(&dir).unwrap_err();
    assert!(matches!(err, Error::MissingFile { .. }), "{err}");

    let (_tmp, dir) = copy_fixture("qwen2");
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let err = load_dir(&DirFiles::local(&dir).unwrap(), &LoadOptions::default()).unwrap_err();
    assert!(
        matches!(&err, Error::MissingFile { path, .. } if path.ends_with("tokenizer.json")),
        "{err}"
    );

    let err = load(
        &ModelSource::Gguf("/nonexistent/model.gguf".into()),
        &LoadOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::MissingFile { .. }), "{err}");
}

#[test]
fn truncated_and_corrupt_weights_name_the_file() {
    let (_tmp, dir) = copy_fixture("qwen2");
    let weights = dir.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_model(&dir).unwrap_err();
    assert!(
        matches!(&err, Error::CorruptFile { path, .. } if *path == weights),
        "{err}"
    );

    std::fs::write(&weights, b"this is not a safetensors file at all").unwrap();
    let err = load_model(&dir).unwrap_err();
    assert!(
        matches!(&err, Error::CorruptFile { path, .. } if *path == weights),
        "{err}"
    );

    // A shard listed by the index that is missing on disk.
    let (_tmp, dir) = copy_fixture("llama");
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let err = load_model(&dir).unwrap_err();
    assert!(
        matches!(&err, Error::MissingFile { path, .. } if path.ends_with("model-00002-of-00002.safetensors")),
        "{err}"
    );
}

#[test]
fn missing_tensor_and_wrong_shapes() {
    // Untied config over tied weights: lm_head.weight is absent.
    let (_tmp, dir) = copy_fixture("llama3_scaled");
    edit_config(&dir, |c| c["tie_word_embeddings"] = false.into());
    let err = load_model(&dir).unwrap_err();
    assert!(
        matches!(&err, Error::MissingTensor { name, .. } if name == "lm_head.weight"),
        "{err}"
    );

    // A config that does not match the weights.
    let (_tmp, dir) = copy_fixture("qwen2");
    edit_config(&dir, |c| c["intermediate_size"] = 96.into());
    let err = load_model(&dir).unwrap_err();
    match &err {
        Error::TensorShape {
            name,
            expected,
            actual,
            ..
        } => {
            assert!(name.contains("mlp"), "{err}");
            assert_ne!(expected, actual);
        }
        other => panic!("expected TensorShape, got {other}"),
    }
}

#[test]
fn bad_configs() {
    let (_tmp, dir) = copy_fixture("qwen2");
    std::fs::write(dir.join("config.json"), "{ not json").unwrap();
    let err = load_model(&dir).unwrap_err();
    assert!(matches!(err, Error::InvalidConfig { .. }), "{err}");

    let (_tmp, dir) = copy_fixture("qwen2");
    edit_config(&dir, |c| c["model_type"] = "gpt_neox".into());
    let err = load_model(&dir).unwrap_err();
    assert!(
        matches!(&err, Error::UnsupportedArchitecture { architecture, .. } if architecture == "gpt_neox"),
        "{err}"
    );

    let (_tmp, dir) = copy_fixture("qwen2");
    edit_config(&dir, |c| c["num_key_value_heads"] = 3.into());
    let err = load_model(&dir).unwrap_err();
    assert!(matches!(err, Error::InvalidConfig { .. }), "{err}");

    let (_tmp, dir) = copy_fixture("llama");
    edit_config(
        &dir,
        |c| {
            c["rope_parameters"] =
                serde_json::json!({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0})
        },
    );
    let err = load_model(&dir).unwrap_err();
    assert!(err.to_string().contains("yarn"), "{err}");

    let (_tmp, dir) = copy_fixture("qwen2");
    edit_config(&dir, |c| c["hidden_act"] = "gelu".into());
    let err = load_model(&dir).unwrap_err();
    assert!(matches!(err, Error::InvalidConfig { .. }), "{err}");
}

#[test]
fn tokenizer_larger_than_the_model_vocabulary() {
    // The fixture's tokenizer has 300 ids; cut the model's vocabulary to 256 rows.
    let (_tmp, dir) = copy_fixture("qwen2");
    let path = dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        let t = tensors[name]
            .narrow(0, 0, 256)
            .unwrap()
            .contiguous()
            .unwrap();
        tensors.insert(name.to_string(), t);
    }
    candle_core::safetensors::save(&tensors, &path).unwrap();
    edit_config(&dir, |c| c["vocab_size"] = 256.into());
    let err = load_dir(&DirFiles::local(&dir).unwrap(), &LoadOptions::default()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::VocabularyMismatch {
                tokenizer_vocab: 300,
                model_vocab: 256,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn corrupt_tokenizer_files() {
    let (_tmp, dir) = copy_fixture("qwen2");
    std::fs::write(dir.join("tokenizer.json"), "{\"model\": 17}").unwrap();
    let err = load_dir(&DirFiles::local(&dir).unwrap(), &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Tokenizer { .. }), "{err}");

    let (_tmp, dir) = copy_fixture("qwen2");
    std::fs::write(dir.join("tokenizer_config.json"), "[broken").unwrap();
    let err = load_dir(&DirFiles::local(&dir).unwrap(), &LoadOptions::default()).unwrap_err();
    assert!(
        matches!(&err, Error::CorruptFile { path, .. } if path.ends_with("tokenizer_config.json")),
        "{err}"
    );
}

#[test]
fn truncated_and_foreign_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("truncated.gguf");
    // A real GGUF cut short (the SmolLM2 file when present, else a header-only stub).
    let bytes = match common::smollm2_path() {
        Some(real) => std::fs::read(real).unwrap()[..5_000_000].to_vec(),
        None => b"GGUF\x03\x00\x00\x00".to_vec(),
    };
    std::fs::write(&path, bytes).unwrap();
    let err = load(&ModelSource::Gguf(path.clone()), &LoadOptions::default()).unwrap_err();
    assert!(
        matches!(&err, Error::CorruptFile { path: p, .. } if *p == path),
        "{err}"
    );

    std::fs::write(&path, b"definitely not gguf").unwrap();
    let err = load(&ModelSource::Gguf(path.clone()), &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, Error::CorruptFile { .. }), "{err}");

    // A well-formed GGUF of an architecture we do not implement.
    use candle_core::quantized::gguf_file::{write, Value};
    let arch = Value::String("gpt2".into());
    let mut file = std::fs::File::create(&path).unwrap();
    write(&mut file, &[("general.architecture", &arch)], &[]).unwrap();
    drop(file);
    let err = load(&ModelSource::Gguf(path), &LoadOptions::default()).unwrap_err();
    assert!(
        matches!(&err, Error::UnsupportedArchitecture { architecture, .. } if architecture == "gpt2"),
        "{err}"
    );
}

#[test]
fn runtime_misuse_is_an_error_not_a_panic() {
    let model = common::load_fixture("qwen2");
    let mut cache = model.new_cache(1, 8).unwrap();
    let err = model.forward_causal(&[1, 2, 320], &mut cache).unwrap_err();
    assert!(
        matches!(
            err,
            Error::TokenOutOfRange {
                token: 320,
                vocab_size: 320
            }
        ),
        "{err}"
    );
    let err = model.forward_causal(&[1; 9], &mut cache).unwrap_err();
    assert!(
        matches!(
            err,
            Error::ContextOverflow {
                requested: 9,
                capacity: 8
            }
        ),
        "{err}"
    );
    // After the failed append nothing is half-written: the cache is still empty.
    assert_eq!(cache.len(), 0);
    // Positions past the context limit (256 for the fixture), even with cache rows to spare.
    let mut big = model.new_cache(1, 300).unwrap();
    let err = model.forward_causal(&[1; 257], &mut big).unwrap_err();
    assert!(
        matches!(
            err,
            Error::ContextOverflow {
                requested: 257,
                capacity: 256
            }
        ),
        "{err}"
    );
    let err = model.forward_causal(&[], &mut cache).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    let err = cache.compact(0, &[3, 2]).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
}

/// Sizes in a config are not allocation sizes: found by `tests/fuzz.rs`, where a
/// `max_position_embeddings` of 2^40 aborted the process (RoPE tables for every position).
#[test]
fn huge_config_sizes_are_not_allocated() {
    let (_tmp, dir) = copy_fixture("qwen2");
    edit_config(&dir, |c| c["max_position_embeddings"] = (1u64 << 40).into());
    let model = load_model(&dir).unwrap();
    assert_eq!(model.context_limit(), 1 << 20);
    let mut cache = model.new_cache(1, 4).unwrap();
    model.forward_causal(&[1, 2], &mut cache).unwrap();

    let (_tmp, dir) = copy_fixture("qwen2");
    edit_config(&dir, |c| c["num_hidden_layers"] = (1u64 << 40).into());
    let err = load_model(&dir).unwrap_err();
    assert!(
        matches!(&err, Error::MissingTensor { name, .. } if name.starts_with("model.layers.3.")),
        "{err}"
    );
}

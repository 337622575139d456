//! Loading from the Hugging Face hub cache layout, offline: `models--org--name/refs/main` names a
//! snapshot, `snapshots/<commit>/` holds the files (as `huggingface_hub` lays them out).

mod common;

use std::path::Path;

use common::{fixture_dir, max_abs_diff, reference, reference_tokens};
use mirror_core::{load_hub, Error, HubRepo, LoadOptions, ModelSource};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn make_cache(root: &Path, repo: &str, files: &[(&str, &Path)]) {
    let folder = root.join(format!("models--{}", repo.replace('/', "--")));
    let snapshot = folder.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(folder.join("refs")).unwrap();
    std::fs::write(folder.join("refs/main"), COMMIT).unwrap();
    for (name, source) in files {
        std::fs::copy(source, snapshot.join(name)).unwrap();
    }
}

#[test]
fn safetensors_repo_loads_from_the_cache_offline() {
    let cache = tempfile::tempdir().unwrap();
    let dir = fixture_dir("qwen2");
    let names = [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ];
    let files: Vec<(&str, std::path::PathBuf)> = names.iter().map(|n| (*n, dir.join(n))).collect();
    let refs: Vec<(&str, &Path)> = files.iter().map(|(n, p)| (*n, p.as_path())).collect();
    make_cache(cache.path(), "mirror-sd/tiny-qwen2", &refs);

    let hub = HubRepo::new("mirror-sd/tiny-qwen2", None)
        .with_cache_dir(cache.path())
        .offline(true);
    let loaded = load_hub(&hub, None, &LoadOptions::default()).unwrap();
    assert!(loaded.tokenizer.chat_template().is_some());
    let reference = reference("qwen2");
    let tokens = reference_tokens(&reference, 2);
    let mut kv = loaded.model.new_cache(1, 32).unwrap();
    let logits = loaded.model.forward_causal(&tokens, &mut kv).unwrap();
    assert!(max_abs_diff(&logits, &reference["logits_2"]) < 1e-4);
}

#[test]
fn gguf_file_of_a_repo_loads_from_the_cache_offline() {
    let Some(gguf) = common::smollm2_path() else {
        return;
    };
    let cache = tempfile::tempdir().unwrap();
    let name = "SmolLM2-135M-Instruct.Q4_1.gguf";
    make_cache(cache.path(), "mirror-sd/smollm2-gguf", &[(name, &gguf)]);
    let hub = HubRepo::new("mirror-sd/smollm2-gguf", None)
        .with_cache_dir(cache.path())
        .offline(true);
    let loaded = load_hub(&hub, Some(name), &LoadOptions::default()).unwrap();
    assert_eq!(loaded.model.num_layers(), 30);
}

#[test]
fn offline_miss_is_a_hub_error() {
    let cache = tempfile::tempdir().unwrap();
    let hub = HubRepo::new("mirror-sd/not-cached", None)
        .with_cache_dir(cache.path())
        .offline(true);
    let err = load_hub(&hub, None, &LoadOptions::default()).unwrap_err();
    assert!(
        matches!(&err, Error::Hub { repo, file, .. } if repo == "mirror-sd/not-cached" && file == "config.json"),
        "{err}"
    );
}

#[test]
fn model_source_parsing() -> mirror_core::Result<()> {
    let dir = fixture_dir("qwen2");
    let text = dir.to_str().expect("the fixture path is UTF-8");
    assert_eq!(ModelSource::parse(text)?, ModelSource::Dir(dir.clone()));
    let gguf = common::repo_root().join("tests/fixtures/gguf/qwen2-quantized.gguf");
    let text = gguf.to_str().expect("the fixture path is UTF-8");
    assert_eq!(ModelSource::parse(text)?, ModelSource::Gguf(gguf.clone()));
    let missing = dir.join("no-such-model");
    let text = missing.to_str().expect("the fixture path is UTF-8");
    assert!(
        matches!(ModelSource::parse(text), Err(Error::ModelPathNotFound { path }) if path == missing)
    );
    assert_eq!(
        ModelSource::parse(
            "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF:qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
        )?,
        ModelSource::Hub {
            repo: "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF".into(),
            revision: None,
            file: Some("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf".into()),
        }
    );
    assert_eq!(
        ModelSource::parse("HuggingFaceTB/SmolLM2-135M-Instruct@v1")?,
        ModelSource::Hub {
            repo: "HuggingFaceTB/SmolLM2-135M-Instruct".into(),
            revision: Some("v1".into()),
            file: None
        }
    );
    Ok(())
}

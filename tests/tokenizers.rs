//! Tokenizers and chat templates against Hugging Face transformers' own output
//! (tests/fixtures/tokenizers.json, written by scripts/make_fixtures.py).

mod common;

use std::path::Path;

use mirror_core::formats::gguf::GgufWeights;
use mirror_core::{load_dir, ChatMessage, DirFiles, LoadOptions, Tokenizer};
use serde_json::Value;

fn references() -> Value {
    let path = common::repo_root().join("tests/fixtures/tokenizers.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn check_against(tokenizer: &Tokenizer, reference: &Value, what: &str) {
    for (text, ids) in reference["encodings"].as_object().unwrap() {
        let expected: Vec<u32> = serde_json::from_value(ids.clone()).unwrap();
        let got = tokenizer.encode(text, false).unwrap();
        assert_eq!(got, expected, "{what}: encoding of {text:?}");
        assert_eq!(
            tokenizer.decode(&got, false).unwrap(),
            *text,
            "{what}: round trip of {text:?}"
        );
    }
    let messages: Vec<ChatMessage> = serde_json::from_value(reference["messages"].clone()).unwrap();
    for (key, generation_prompt) in [
        ("chat_with_generation_prompt", true),
        ("chat_without_generation_prompt", false),
    ] {
        let rendered = tokenizer
            .apply_chat_template(&messages, generation_prompt)
            .unwrap();
        assert_eq!(rendered, reference[key].as_str().unwrap(), "{what}: {key}");
    }
}

fn gguf_tokenizer(path: &Path) -> Tokenizer {
    let gguf = GgufWeights::open(path).unwrap();
    Tokenizer::from_gguf(gguf.content(), path).unwrap()
}

#[test]
fn tokenizer_json_with_chat_template_matches_transformers() {
    let files = DirFiles::local(&common::fixture_dir("qwen2")).unwrap();
    let loaded = load_dir(&files, &LoadOptions::default()).unwrap();
    check_against(
        &loaded.tokenizer,
        &references()["tokenizers"]["hf/qwen2"],
        "tiny tokenizer",
    );
    // eos from tokenizer_config.json (<|im_end|>) and config.json (id 2).
    let im_end = loaded.tokenizer.token_to_id("<|im_end|>").unwrap();
    assert!(loaded.tokenizer.eos_ids().contains(&im_end));
    assert!(loaded.tokenizer.eos_ids().contains(&2));
}

#[test]
fn smollm2_gguf_tokenizer_matches_transformers() {
    let Some(path) = common::smollm2_path() else {
        return;
    };
    let tokenizer = gguf_tokenizer(&path);
    let file = path.file_name().unwrap().to_str().unwrap();
    check_against(&tokenizer, &references()["tokenizers"][file], "SmolLM2");
    // "The" without a leading space is the vocabulary's own "The", not "ĠThe".
    assert_eq!(
        tokenizer.encode("The", false).unwrap(),
        vec![tokenizer.token_to_id("The").unwrap()]
    );
    assert_eq!(tokenizer.eos_ids(), &[2]);
}

#[test]
fn qwen_gguf_tokenizer_matches_transformers_when_present() {
    // The Qwen pair is opt-in (python3 scripts/fetch_models.py qwen): skip quietly without it.
    let path = common::repo_root().join("models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf");
    if !path.is_file() {
        eprintln!("skipping: {} is absent", path.display());
        return;
    }
    let tokenizer = gguf_tokenizer(&path);
    check_against(
        &tokenizer,
        &references()["tokenizers"]["qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"],
        "Qwen2.5-Coder",
    );
}

#[test]
fn chat_template_errors_are_typed() {
    let messages = [ChatMessage::new("user", "hi")];
    let err = mirror_core::tokenizer::render_chat_template("{% if %}", &messages, true, "", "")
        .unwrap_err();
    assert!(matches!(err, mirror_core::Error::ChatTemplate(_)), "{err}");
    let err = mirror_core::tokenizer::render_chat_template(
        "{{ raise_exception('only user and assistant roles') }}",
        &messages,
        true,
        "",
        "",
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("only user and assistant roles"),
        "{err}"
    );
}

//! Tool calling end to end on the default pair's target (Qwen2.5-Coder 1.5B), whose chat template
//! renders tools itself. Opt-in (`cargo test --release --test tools_qwen -- --ignored`): it needs
//! `python3 scripts/fetch_models.py qwen-target` (1.1 GB), which CI does not fetch.

mod common;

use std::sync::Arc;

use mirror_core::tools::parse_output;
use mirror_core::{load, ChatMessage, LoadOptions, ModelSource, Tool, ToolCall};
use mirror_sd::mirror_scheduler::{Autoregressive, Engine, GenerationConfig, Prompt};
use serde_json::json;

#[test]
#[ignore = "needs the 1.1 GB Qwen2.5-Coder 1.5B (scripts/fetch_models.py qwen-target)"]
fn qwen_calls_a_tool_through_its_own_template_and_reads_the_result() {
    let Some(path) = common::model_path(
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        "qwen-target",
        false,
    ) else {
        return;
    };
    let loaded = load(&ModelSource::Gguf(path), &LoadOptions::default()).unwrap();
    let tokenizer = loaded.tokenizer.clone();
    assert!(tokenizer.template_takes_tools());
    let tool = Tool {
        name: "get_weather".into(),
        description: Some("The weather forecast of a city for a number of days".into()),
        parameters: json!({
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"]
        }),
    };
    let ask = vec![ChatMessage::new(
        "user",
        "What is the weather in Lisbon for the next three days?",
    )];
    let tools = [tool];
    let rendered = tokenizer
        .apply_chat_template_with_tools(&ask, &tools, true)
        .unwrap();
    assert!(
        rendered.contains("<tools>") && rendered.contains("\"get_weather\""),
        "{rendered}"
    );
    let mut engine = Engine::new(
        Box::new(Autoregressive::new(Arc::new(loaded.model))),
        tokenizer.clone(),
    );
    let generation = engine
        .generate(
            Prompt::ChatWithTools(&ask, &tools),
            &GenerationConfig::greedy(64),
        )
        .unwrap();
    // Qwen2.5-Coder writes the call as a fenced JSON object rather than in the tags.
    let text = tokenizer.decode(&generation.tokens, true).unwrap();
    let parsed = parse_output(&text, &["get_weather"]);
    assert_eq!(parsed.calls.len(), 1, "{text}");
    let (name, arguments) = &parsed.calls[0];
    assert_eq!(name, "get_weather");
    assert_eq!(arguments["city"], "Lisbon", "{text}");
    assert_eq!(arguments["days"], 3, "{text}");
    // The call and its result in the history, rendered by the template's own tool blocks.
    let mut history = ask.clone();
    history.push(ChatMessage {
        tool_calls: vec![ToolCall {
            id: "call_1".into(),
            name: name.clone(),
            arguments: arguments.clone(),
        }],
        ..ChatMessage::new("assistant", "")
    });
    history.push(ChatMessage {
        tool_call_id: Some("call_1".into()),
        ..ChatMessage::new("tool", "Sunny, 24 C, all three days")
    });
    let rendered = tokenizer
        .apply_chat_template_with_tools(&history, &tools, true)
        .unwrap();
    assert!(rendered.contains("<tool_response>"), "{rendered}");
    assert!(
        rendered.contains("\"city\": \"Lisbon\"") || rendered.contains("\"city\":\"Lisbon\""),
        "{rendered}"
    );
    // (What the 1.5B coder model answers after the result is up to it: it often calls again.)
    let answer = engine
        .generate(
            Prompt::ChatWithTools(&history, &tools),
            &GenerationConfig::greedy(32),
        )
        .unwrap();
    assert!(!answer.tokens.is_empty());
}

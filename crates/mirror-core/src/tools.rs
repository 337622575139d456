//! Tool calling in chat: the tools a model may call ([`Tool`]), the calls it makes
//! ([`ToolCall`]), how they reach its chat template, and how its output is read back.
//!
//! Templates that take a `tools` variable (Qwen2.5, Llama 3.x, Mistral's recent ones) get the
//! tools in Hugging Face's convention (`{"type": "function", "function": {name, description,
//! parameters}}`) and render calls and results themselves. For a template without one, the
//! tools are described in a system message in the Hermes format (NousResearch's
//! Hermes-Function-Calling prompt, which Qwen2.5's own template also uses): the functions'
//! signatures inside `<tools></tools>`, each call as a JSON object inside
//! `<tool_call></tool_call>`, each result inside `<tool_response></tool_response>`.
//!
//! Reading the output back ([`parse_tool_calls`]) understands that Hermes/Qwen format: every
//! `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` block is a call; text before the
//! first block is the message's content. A block whose JSON does not parse, or lacks a name, is
//! left in the content as text (the model did not make a call). [`parse_output`] also takes an
//! output that is nothing but one such object, bare or in a Markdown code fence, when it names
//! an offered tool: Qwen2.5-Coder answers so.

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;

/// Opening and closing tags of a call in the Hermes/Qwen format.
pub const CALL_OPEN: &str = "<tool_call>";
/// See [`CALL_OPEN`].
pub const CALL_CLOSE: &str = "</tool_call>";

/// A function the model may call.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Tool {
    /// Its name.
    pub name: String,
    /// What it does, for the model.
    #[serde(default)]
    pub description: Option<String>,
    /// Its arguments, as a JSON schema (an object schema; `{}` when it takes none).
    #[serde(default = "empty_object")]
    pub parameters: Value,
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}

/// Templates read tools as `{"type": "function", "function": {...}}`.
impl Serialize for Tool {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut function = serde_json::Map::new();
        function.insert("name".into(), Value::String(self.name.clone()));
        if let Some(d) = &self.description {
            function.insert("description".into(), Value::String(d.clone()));
        }
        function.insert("parameters".into(), self.parameters.clone());
        let mut map = serializer.serialize_map(Some(2))?;
        map.serialize_entry("type", "function")?;
        map.serialize_entry("function", &function)?;
        map.end()
    }
}

/// A call the model made (or made earlier in the conversation).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ToolCall {
    /// Its id, which the tool's result message names.
    pub id: String,
    /// The function.
    pub name: String,
    /// Its arguments (a JSON object).
    pub arguments: Value,
}

/// Templates read calls as `{"id", "type": "function", "function": {"name", "arguments"}}`,
/// with the arguments as an object (as transformers passes them).
impl Serialize for ToolCall {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let function = serde_json::json!({"name": self.name, "arguments": self.arguments});
        let mut map = serializer.serialize_map(Some(3))?;
        map.serialize_entry("id", &self.id)?;
        map.serialize_entry("type", "function")?;
        map.serialize_entry("function", &function)?;
        map.end()
    }
}

/// The text of a Hermes call block.
pub fn call_block(name: &str, arguments: &Value) -> String {
    let call = serde_json::json!({"name": name, "arguments": arguments});
    format!("{CALL_OPEN}\n{call}\n{CALL_CLOSE}")
}

/// The Hermes system message that describes `tools` to a model whose template cannot.
pub fn hermes_system_prompt(tools: &[Tool]) -> String {
    let signatures: Vec<String> = tools
        .iter()
        .map(|t| serde_json::to_string(t).unwrap_or_default())
        .collect();
    format!(
        "You are a function calling AI model. You are provided with function signatures within \
         <tools></tools> XML tags. You may call one or more functions to assist with the user \
         query. Don't make assumptions about what values to plug into functions.\n<tools>\n{}\n\
         </tools>\nFor each function call, return a json object with function name and \
         arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": \
         <function-name>, \"arguments\": <args-dict>}}\n</tool_call>",
        signatures.join("\n")
    )
}

/// What a model's output says: its text content, and the calls it made.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ParsedOutput {
    /// Text outside the call blocks (before the first one, and any unparsable block).
    pub content: String,
    /// The calls, in order, as (name, arguments).
    pub calls: Vec<(String, Value)>,
}

/// Reads `<tool_call>...</tool_call>` blocks (Hermes/Qwen) out of `text`. An unclosed last
/// block is read to the end of the text (a generation that stopped at its end token).
pub fn parse_tool_calls(text: &str) -> ParsedOutput {
    let mut out = ParsedOutput::default();
    let mut rest = text;
    while let Some(start) = rest.find(CALL_OPEN) {
        out.content.push_str(&rest[..start]);
        let after = &rest[start + CALL_OPEN.len()..];
        let (body, next) = match after.find(CALL_CLOSE) {
            Some(end) => (&after[..end], &after[end + CALL_CLOSE.len()..]),
            None => (after, ""),
        };
        match parse_call(body) {
            Some(call) => out.calls.push(call),
            None => {
                out.content.push_str(&rest[start..rest.len() - next.len()]);
            }
        }
        rest = next;
    }
    out.content.push_str(rest);
    out.content = out.content.trim().to_string();
    out
}

/// [`parse_tool_calls`], or else the whole output as one bare call (optionally in a Markdown
/// code fence) of one of `tools`.
pub fn parse_output(text: &str, tools: &[&str]) -> ParsedOutput {
    let parsed = parse_tool_calls(text);
    if !parsed.calls.is_empty() {
        return parsed;
    }
    let trimmed = text.trim();
    let body = trimmed
        .strip_prefix("```json")
        .or_else(|| trimmed.strip_prefix("```"))
        .and_then(|rest| rest.strip_suffix("```"))
        .unwrap_or(trimmed);
    match parse_call(body) {
        Some(call) if tools.contains(&call.0.as_str()) => ParsedOutput {
            content: String::new(),
            calls: vec![call],
        },
        _ => parsed,
    }
}

/// Whether `text` so far could still be the start of a bare call (see [`parse_output`]).
pub fn may_be_bare_call(text: &str) -> bool {
    let t = text.trim_start();
    t.is_empty() || t.starts_with('{') || "```json".starts_with(t) || t.starts_with("```json")
}

/// One call's JSON: `{"name": ..., "arguments": {...}}` (arguments may be a JSON string, as
/// some models write them).
pub fn parse_call(body: &str) -> Option<(String, Value)> {
    let value: Value = serde_json::from_str(body.trim()).ok()?;
    let name = value.get("name")?.as_str()?.to_string();
    let arguments = match value.get("arguments").or_else(|| value.get("parameters")) {
        Some(Value::String(s)) => serde_json::from_str(s).ok()?,
        Some(v @ Value::Object(_)) => v.clone(),
        None => empty_object(),
        Some(_) => return None,
    };
    Some((name, arguments))
}

/// How many bytes at the end of `text` could begin a call tag: text a stream holds back until
/// it knows whether a call starts there.
pub fn partial_open_tag(text: &str) -> usize {
    (1..CALL_OPEN.len())
        .rev()
        .find(|&n| text.ends_with(&CALL_OPEN[..n]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn calls_are_read_from_recorded_outputs() {
        // No call.
        let none = parse_tool_calls("The capital of France is Paris.");
        assert_eq!(none.content, "The capital of France is Paris.");
        assert!(none.calls.is_empty());
        // One call, as Qwen2.5 writes it.
        let one = parse_tool_calls(
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Lisbon\", \"days\": 3}}\n</tool_call>",
        );
        assert_eq!(one.content, "");
        assert_eq!(
            one.calls,
            vec![("get_weather".into(), json!({"city": "Lisbon", "days": 3}))]
        );
        // Two calls after some text, arguments once as a JSON string.
        let two = parse_tool_calls(
            "Let me check both.\n<tool_call>\n{\"name\": \"a\", \"arguments\": {}}\n</tool_call>\n\
             <tool_call>\n{\"name\": \"b\", \"arguments\": \"{\\\"x\\\": 1}\"}\n</tool_call>",
        );
        assert_eq!(two.content, "Let me check both.");
        assert_eq!(
            two.calls,
            vec![("a".into(), json!({})), ("b".into(), json!({"x": 1}))]
        );
        // Broken JSON stays text; an unclosed last block is read to the end.
        let broken = parse_tool_calls("<tool_call>\n{\"name\": \"a\", \"argu\n</tool_call>");
        assert!(broken.calls.is_empty());
        assert!(broken.content.contains("\"argu"));
        let unclosed =
            parse_tool_calls("<tool_call>{\"name\": \"a\", \"arguments\": {\"k\": [1]}}");
        assert_eq!(unclosed.calls, vec![("a".into(), json!({"k": [1]}))]);
    }

    #[test]
    fn a_partial_tag_is_held_back_and_tools_render_as_templates_expect() {
        assert_eq!(partial_open_tag("Sure <tool_"), "<tool_".len());
        assert_eq!(partial_open_tag("Sure <"), 1);
        assert_eq!(partial_open_tag("Sure."), 0);
        let tool = Tool {
            name: "f".into(),
            description: Some("does f".into()),
            parameters: json!({"type": "object"}),
        };
        assert_eq!(
            serde_json::to_value(&tool).unwrap(),
            json!({"type": "function", "function": {"name": "f", "description": "does f", "parameters": {"type": "object"}}})
        );
        let call = ToolCall {
            id: "call_1".into(),
            name: "f".into(),
            arguments: json!({"x": 1}),
        };
        assert_eq!(
            serde_json::to_value(&call).unwrap(),
            json!({"id": "call_1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}})
        );
        let block = call_block("f", &json!({"x": 1}));
        assert_eq!(
            parse_tool_calls(&block).calls,
            vec![("f".into(), json!({"x": 1}))]
        );
        // A bare call, fenced as Qwen2.5-Coder writes it, of an offered tool only.
        let fenced = "```json\n{\n  \"name\": \"f\",\n  \"arguments\": {\"x\": 2}\n}\n```";
        assert_eq!(
            parse_output(fenced, &["f"]).calls,
            vec![("f".into(), json!({"x": 2}))]
        );
        assert!(parse_output(fenced, &["g"]).calls.is_empty());
        assert!(may_be_bare_call("  ```js") && may_be_bare_call("{\"na"));
        assert!(!may_be_bare_call("The answer"));
    }
}

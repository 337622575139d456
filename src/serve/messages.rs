//! Chat messages and tools in requests: OpenAI's message shapes (text parts, assistant
//! `tool_calls`, `tool` results), `tools` and `tool_choice`, checked strictly.
//!
//! A forced call (`tool_choice: "required"` or a named function) is decoded under a JSON-schema
//! constraint: the output is one `{"name": ..., "arguments": {...}}` object whose arguments
//! follow the tool's parameter schema, so it always parses and validates.

use mirror_core::{ChatMessage, Tool, ToolCall};
use mirror_scheduler::Constraint;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InputMessage {
    role: String,
    #[serde(default)]
    content: Value,
    /// A function name on `tool` messages (accepted; the call id identifies the call).
    #[allow(dead_code)]
    name: Option<String>,
    tool_calls: Option<Vec<InputToolCall>>,
    tool_call_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InputToolCall {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    function: InputFunctionCall,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InputFunctionCall {
    name: String,
    /// A JSON object, as a string (OpenAI's shape).
    arguments: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InputTool {
    #[serde(rename = "type")]
    kind: String,
    function: InputFunction,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InputFunction {
    name: String,
    description: Option<String>,
    parameters: Option<Value>,
    /// Accepted: a forced call always follows the schema.
    #[allow(dead_code)]
    strict: Option<bool>,
}

/// Whether and which tool the model must call.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum ToolChoice {
    /// No tools, or `"none"`: plain text.
    #[default]
    None,
    /// `"auto"` (the default with tools): the model may call tools, in the Hermes format.
    Auto,
    /// `"required"`: one call of any of the tools.
    Required,
    /// One call of this function.
    Function(String),
}

impl ToolChoice {
    /// Whether the whole output is one forced call.
    pub fn is_forced(&self) -> bool {
        matches!(self, ToolChoice::Required | ToolChoice::Function(_))
    }
}

fn bad(param: impl Into<String>, message: impl Into<String>) -> ApiError {
    ApiError::invalid_param(param, message)
}

pub(crate) fn parse_messages(value: Value) -> Result<Vec<ChatMessage>, ApiError> {
    let messages: Vec<InputMessage> = serde_path_to_error::deserialize(value).map_err(|e| {
        // The path inside the array starts with its index: `[0].content`.
        let inner = e.path().to_string();
        let path = if inner == "." {
            "messages".to_string()
        } else {
            format!("messages{inner}")
        };
        bad(path.clone(), format!("{path}: {}", e.into_inner()))
    })?;
    if messages.is_empty() {
        return Err(bad(
            "messages",
            "messages must contain at least one message",
        ));
    }
    messages
        .into_iter()
        .enumerate()
        .map(|(i, message)| parse_message(i, message))
        .collect()
}

fn parse_message(i: usize, message: InputMessage) -> Result<ChatMessage, ApiError> {
    // OpenAI's current API says `developer` where it said `system`.
    let role = match message.role.as_str() {
        "developer" => "system",
        "system" | "user" | "assistant" | "tool" => message.role.as_str(),
        _ => {
            return Err(bad(
                format!("messages[{i}].role"),
                format!(
                    "messages[{i}].role `{}` is not supported (system, developer, user, assistant or tool)",
                    message.role
                ),
            ))
        }
    };
    let calls = message.tool_calls.unwrap_or_default();
    if !calls.is_empty() && role != "assistant" {
        return Err(bad(
            format!("messages[{i}].tool_calls"),
            "only assistant messages carry tool_calls",
        ));
    }
    // An assistant message that calls tools may have no content.
    let content = match (&message.content, calls.is_empty()) {
        (Value::Null, false) => String::new(),
        (content, _) => message_text(content).ok_or_else(|| {
            bad(
                format!("messages[{i}].content"),
                format!("messages[{i}].content must be a string or an array of text parts"),
            )
        })?,
    };
    let tool_calls = calls
        .into_iter()
        .enumerate()
        .map(|(j, call)| {
            let param = format!("messages[{i}].tool_calls[{j}]");
            if call.kind != "function" {
                return Err(bad(&param, format!("{param}.type must be \"function\"")));
            }
            let arguments: Value = serde_json::from_str(&call.function.arguments)
                .ok()
                .filter(Value::is_object)
                .ok_or_else(|| {
                    bad(
                        &param,
                        format!("{param}.function.arguments is not a JSON object"),
                    )
                })?;
            Ok(ToolCall {
                id: call.id,
                name: call.function.name,
                arguments,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if role == "tool" && message.tool_call_id.is_none() {
        return Err(bad(
            format!("messages[{i}].tool_call_id"),
            "a tool message names the call it answers (tool_call_id)",
        ));
    }
    Ok(ChatMessage {
        tool_calls,
        tool_call_id: message.tool_call_id,
        ..ChatMessage::new(role, content)
    })
}

/// A message's text: a string, or text parts (`{"type": "text", "text": ...}`) joined by newlines.
fn message_text(content: &Value) -> Option<String> {
    match content {
        Value::String(text) => Some(text.clone()),
        Value::Array(parts) => {
            let texts: Option<Vec<&str>> = parts
                .iter()
                .map(|part| {
                    let object = part.as_object()?;
                    if object.len() != 2 || object.get("type")?.as_str()? != "text" {
                        return None;
                    }
                    object.get("text")?.as_str()
                })
                .collect();
            texts.map(|t| t.join("\n"))
        }
        _ => None,
    }
}

/// `tools` and `tool_choice`: the tools to offer and whether a call is forced.
pub(crate) fn parse_tools(
    tools: Option<Value>,
    choice: Option<Value>,
) -> Result<(Vec<Tool>, ToolChoice), ApiError> {
    let inputs: Vec<InputTool> = match tools {
        None | Some(Value::Null) => Vec::new(),
        Some(value) => serde_path_to_error::deserialize(value).map_err(|e| {
            let path = format!("tools{}", e.path()).replace("tools.", "tools");
            bad(path.clone(), format!("{path}: {}", e.into_inner()))
        })?,
    };
    let tools = inputs
        .into_iter()
        .enumerate()
        .map(|(i, tool)| {
            if tool.kind != "function" {
                return Err(bad(
                    format!("tools[{i}].type"),
                    "only function tools are supported",
                ));
            }
            let parameters = tool
                .function
                .parameters
                .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
            if !parameters.is_object() {
                return Err(bad(
                    format!("tools[{i}].function.parameters"),
                    "parameters must be a JSON schema object",
                ));
            }
            Ok(Tool {
                name: tool.function.name,
                description: tool.function.description,
                parameters,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let choice = match choice {
        None | Some(Value::Null) if tools.is_empty() => ToolChoice::None,
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(bad(
                    "tool_choice",
                    format!("tool_choice `{other}` is not none, auto, required or a function"),
                ))
            }
        },
        Some(value) => {
            let name = value
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| value.get("type").and_then(Value::as_str) == Some("function"))
                .ok_or_else(|| {
                    bad(
                        "tool_choice",
                        "tool_choice must be a string or {\"type\": \"function\", \"function\": {\"name\": ...}}",
                    )
                })?;
            ToolChoice::Function(name.to_string())
        }
    };
    let known = |name: &str| tools.iter().any(|t| t.name == name);
    match &choice {
        ToolChoice::Required | ToolChoice::Function(_) if tools.is_empty() => {
            return Err(bad(
                "tool_choice",
                "tool_choice asks for a call but there are no tools",
            ))
        }
        ToolChoice::Function(name) if !known(name) => {
            return Err(bad(
                "tool_choice",
                format!("tool_choice names `{name}`, which is not among the tools"),
            ))
        }
        _ => {}
    }
    Ok((tools, choice))
}

/// The constraint of a forced call: one `{"name", "arguments"}` object for one of the tools
/// `choice` allows.
pub(crate) fn forced_call_constraint(tools: &[Tool], choice: &ToolChoice) -> Option<Constraint> {
    let allowed: Vec<Value> = tools
        .iter()
        .filter(|t| match choice {
            ToolChoice::Required => true,
            ToolChoice::Function(name) => &t.name == name,
            _ => false,
        })
        .map(|t| {
            json!({
                "type": "object",
                "properties": {"name": {"enum": [t.name]}, "arguments": t.parameters},
                "required": ["name", "arguments"],
                "additionalProperties": false,
            })
        })
        .collect();
    match allowed.len() {
        0 => None,
        1 => allowed.into_iter().next().map(Constraint::JsonSchema),
        _ => Some(Constraint::JsonSchema(json!({"anyOf": allowed}))),
    }
}

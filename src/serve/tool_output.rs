//! A generation's text on its way out when tools are offered: in `auto` mode, text streams
//! until a `<tool_call>` tag begins (a partial tag is held back), and the calls are read from
//! the whole text at the end; a forced call streams nothing and is read from the whole output.

use std::sync::atomic::{AtomicU64, Ordering};

use mirror_core::tools::{may_be_bare_call, parse_call, parse_output, partial_open_tag, CALL_OPEN};
use mirror_core::ToolCall;

use super::messages::ToolChoice;
use super::queue::Completed;

/// Text of one choice between the stop strings and the client.
#[derive(Debug)]
pub(crate) struct ToolOutput {
    choice: ToolChoice,
    /// The offered tools' names (a bare call must name one).
    names: Vec<String>,
    /// Text received and not yet passed on.
    held: String,
    /// A call tag began: nothing more streams.
    in_call: bool,
    /// Bytes passed on so far.
    streamed: usize,
}

impl ToolOutput {
    pub fn new(choice: ToolChoice, names: Vec<String>) -> Self {
        Self {
            choice,
            names,
            held: String::new(),
            in_call: false,
            streamed: 0,
        }
    }

    /// The part of `text` (newly committed) that may stream now.
    pub fn push(&mut self, text: &str) -> String {
        let out = match &self.choice {
            ToolChoice::None => text.to_string(),
            ToolChoice::Required | ToolChoice::Function(_) => String::new(),
            ToolChoice::Auto if self.in_call => String::new(),
            ToolChoice::Auto => {
                self.held.push_str(text);
                if let Some(at) = self.held.find(CALL_OPEN) {
                    self.in_call = true;
                    let out = self.held[..at].to_string();
                    self.held.clear();
                    out
                } else if self.streamed == 0 && may_be_bare_call(&self.held) {
                    // Perhaps the whole output is one bare call: wait and see.
                    String::new()
                } else {
                    let keep = partial_open_tag(&self.held);
                    let out = self.held[..self.held.len() - keep].to_string();
                    self.held.drain(..self.held.len() - keep);
                    out
                }
            }
        };
        self.streamed += out.len();
        out
    }

    /// Reads the calls out of `completed` (its text becomes the content around them, its finish
    /// reason `tool_calls`); returns the text still to stream when there were none.
    pub fn finish(&mut self, completed: &mut Completed) -> String {
        let calls: Vec<(String, serde_json::Value)> = match &self.choice {
            ToolChoice::None => return String::new(),
            ToolChoice::Required | ToolChoice::Function(_) => {
                parse_call(&completed.text).into_iter().collect()
            }
            ToolChoice::Auto => {
                let names: Vec<&str> = self.names.iter().map(String::as_str).collect();
                let parsed = parse_output(&completed.text, &names);
                if !parsed.calls.is_empty() {
                    completed.text = parsed.content;
                }
                parsed.calls
            }
        };
        if calls.is_empty() {
            // Not a call after all: what was held back streams now.
            return completed
                .text
                .get(self.streamed..)
                .unwrap_or("")
                .to_string();
        }
        completed.tool_calls = calls
            .into_iter()
            .map(|(name, arguments)| ToolCall {
                id: call_id(),
                name,
                arguments,
            })
            .collect();
        if self.choice.is_forced() {
            completed.text.clear();
        }
        completed.finish_reason = "tool_calls";
        String::new()
    }
}

/// A fresh call id (`call_` and 16 hex digits, unique within the process).
fn call_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    format!("call_{:016x}", (nanos << 20) ^ n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::api::GenerationReport;
    use serde_json::json;

    fn completed(text: &str) -> Completed {
        Completed {
            text: text.to_string(),
            finish_reason: "stop",
            report: GenerationReport {
                method: "ar",
                token_ids: Vec::new(),
                queue_ms: 0.0,
                time_to_first_token_ms: None,
                generation_ms: 0.0,
                tokens_per_second: 0.0,
                gamma: 0,
                windows: 0,
                mean_accepted: 0.0,
                tokens_per_target_pass: 0.0,
                acceptance_by_position: Vec::new(),
                reuse_rate: 0.0,
                draft_hidden_fraction: 0.0,
                monitors: None,
            },
            tool_calls: Vec::new(),
            logprobs: Vec::new(),
        }
    }

    /// Streams `pieces` through an `auto` filter: (what streamed, the finished answer).
    fn stream(pieces: &[&str]) -> (String, Completed) {
        let mut output = ToolOutput::new(ToolChoice::Auto, vec!["get_weather".into()]);
        let mut streamed: String = pieces.iter().map(|p| output.push(p)).collect();
        let mut done = completed(&pieces.concat());
        streamed += &output.finish(&mut done);
        (streamed, done)
    }

    #[test]
    fn text_before_a_call_streams_and_a_tag_split_across_chunks_is_held_back() {
        let (streamed, done) = stream(&[
            "Checking",
            " now. <to",
            "ol_call>\n{\"name\": \"get_weather\", ",
            "\"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
        ]);
        assert_eq!(streamed, "Checking now. ");
        assert_eq!(done.finish_reason, "tool_calls");
        assert_eq!(done.text, "Checking now.");
        assert_eq!(done.tool_calls.len(), 1);
        assert_eq!(done.tool_calls[0].name, "get_weather");
        assert_eq!(done.tool_calls[0].arguments, json!({"city": "Paris"}));
        assert!(done.tool_calls[0].id.starts_with("call_"));
    }

    #[test]
    fn text_without_calls_streams_whole_even_when_it_looked_like_a_tag() {
        let (streamed, done) = stream(&["a <", "b <tool_call> not json"]);
        assert_eq!(streamed, "a <b <tool_call> not json");
        assert_eq!(done.finish_reason, "stop");
        assert!(done.tool_calls.is_empty());
        let (streamed, done) = stream(&["plain ", "text <"]);
        assert_eq!(streamed, "plain text <");
        assert_eq!(done.text, "plain text <");
        // A bare call is held back whole; a JSON answer that is no call streams at the end.
        let (streamed, done) = stream(&[
            "```json\n{\"name\": \"get_weather\",",
            " \"arguments\": {}}\n```",
        ]);
        assert_eq!(streamed, "");
        assert_eq!(done.tool_calls.len(), 1);
        let (streamed, done) = stream(&["{\"answer\":", " 42}"]);
        assert_eq!(streamed, "{\"answer\": 42}");
        assert!(done.tool_calls.is_empty());
    }

    #[test]
    fn a_forced_call_streams_nothing_and_is_read_whole() {
        let mut output = ToolOutput::new(ToolChoice::Required, vec!["f".into()]);
        let text = "{\"name\":\"f\",\"arguments\":{\"x\":1}}";
        assert_eq!(output.push(text), "");
        let mut done = completed(text);
        assert_eq!(output.finish(&mut done), "");
        assert_eq!(done.finish_reason, "tool_calls");
        assert_eq!(done.text, "");
        assert_eq!(done.tool_calls[0].arguments, json!({"x": 1}));
    }
}

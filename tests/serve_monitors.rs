//! `mirror_sd.monitors` in the HTTP server (SmolLM2): unknown names and bad options are 400s
//! in OpenAI's error shape; summaries come back in the `mirror_sd` report of whole and streamed
//! responses, with every field of each monitor, also when a stop string cuts the output, and
//! under Mirror; early stop answers `finish_reason: "monitor"`; `/metrics` has the
//! peak-instability histogram. Without the model the test skips.

#[path = "common/http.rs"]
mod client;
mod common;

use std::sync::Arc;
use std::time::Duration;

use mirror_sd::mirror_core::{load, LoadOptions, ModelSource};
use mirror_sd::mirror_scheduler::MirrorSettings;
use mirror_sd::serve::{Backend, Method, Server, ServerConfig};
use serde_json::{json, Value};

const TIMEOUT: Duration = Duration::from_secs(120);

fn body(monitors: Value, options: Value, stream: bool) -> Value {
    json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Name three colors, separated by commas."}],
        "max_tokens": 24,
        "temperature": 0,
        "stream": stream,
        "mirror_sd": {"method": "ar", "monitors": monitors, "monitor_options": options},
    })
}

fn assert_bad_request(response: &client::HttpResponse, param: Option<&str>) {
    assert_eq!(response.status, 400, "{}", response.text());
    let error = &response.json().unwrap()["error"];
    assert_eq!(error["type"], "invalid_request_error", "{error}");
    if let Some(param) = param {
        assert_eq!(error["param"], param, "{error}");
    }
    assert!(error["message"].is_string(), "{error}");
}

/// Every monitor's summary, with each field it must carry.
fn assert_summaries(report: &Value) {
    let summaries = report["monitors"]["summaries"]
        .as_array()
        .expect("summaries");
    let fields: [(&str, &[&str]); 3] = [
        (
            "instability",
            &[
                "tokens",
                "entropy_mean",
                "jsd_mean",
                "peak",
                "peak_index",
                "peak_position",
                "peak_timing",
            ],
        ),
        (
            "path_deviation",
            &[
                "tokens",
                "entropy_mean",
                "max_rpdi",
                "final_rpdi",
                "high_entropy_window_rate",
                "high_entropy_rate",
                "stop_index",
            ],
        ),
        (
            "latent_trajectory",
            &[
                "tokens",
                "chunks",
                "net_change",
                "cumulative_change",
                "aligned_change",
            ],
        ),
    ];
    assert_eq!(summaries.len(), 3, "{report}");
    for (summary, (name, keys)) in summaries.iter().zip(fields) {
        assert_eq!(summary["monitor"], name, "{summary}");
        for key in keys {
            assert!(summary.get(*key).is_some(), "{name} lacks {key}: {summary}");
        }
    }
    assert!(summaries[0]["peak"].as_f64().is_some_and(|p| p > 0.0));
    assert!(summaries[0]["tokens"].as_u64().is_some_and(|t| t > 0));
}

#[test]
fn monitors_are_validated_returned_and_measured() {
    let Some(path) = common::smollm2_path() else {
        return;
    };
    let loaded = load(&ModelSource::Gguf(path), &LoadOptions::default()).expect("load");
    let target = Arc::new(loaded.model);
    let draft = Arc::new(target.truncated(10).expect("draft"));
    let backend = Backend::new(
        target,
        Some(draft),
        loaded.tokenizer,
        &[Method::Autoregressive, Method::Lookup, Method::Mirror],
        Method::Autoregressive,
        &MirrorSettings::default(),
    )
    .expect("backend");
    let config = ServerConfig {
        model_name: "smollm2".into(),
        handle_signals: false,
        ..ServerConfig::default()
    };
    let mut server = Server::start("127.0.0.1:0".parse().unwrap(), backend, config).unwrap();
    let addr = server.local_addr();
    let chat = "/v1/chat/completions";
    let post = |body: &Value| client::post_json(addr, chat, body, TIMEOUT).unwrap();
    let all = json!(["instability", "path_deviation", "latent_trajectory"]);

    // Bad values: 400s naming the field.
    assert_bad_request(
        &post(&body(json!(["entropy"]), Value::Null, false)),
        Some("mirror_sd.monitors"),
    );
    assert_bad_request(
        &post(&body(json!("instability"), Value::Null, false)),
        Some("mirror_sd.monitors"),
    );
    assert_bad_request(
        &post(&body(json!([3]), Value::Null, false)),
        Some("mirror_sd.monitors"),
    );
    let unknown_option = json!({"path_deviation": {"windw": 4}});
    assert_bad_request(
        &post(&body(all.clone(), unknown_option, false)),
        Some("mirror_sd.monitor_options"),
    );
    // Checked against the model by the engine: a 400 too.
    let bad_layer = json!({"latent_trajectory": {"layer": 999}});
    assert_bad_request(&post(&body(all.clone(), bad_layer, false)), None);
    assert_bad_request(
        &post(&body(Value::Null, json!({"early_stop": true}), false)),
        Some("mirror_sd.monitor_options"),
    );

    // Whole response: every summary; no early stop by default.
    let whole = post(&body(all.clone(), Value::Null, false));
    assert_eq!(whole.status, 200, "{}", whole.text());
    let whole = whole.json().unwrap();
    assert_summaries(&whole["mirror_sd"]);
    assert_eq!(whole["mirror_sd"]["monitors"]["stopped_by"], Value::Null);
    assert_ne!(whole["choices"][0]["finish_reason"], "monitor");
    // Without monitors the report has no `monitors` field.
    let plain = post(&body(Value::Null, Value::Null, false)).json().unwrap();
    assert!(plain["mirror_sd"].get("monitors").is_none(), "{plain}");
    // Only the named monitors run.
    let one = post(&body(json!(["latent_trajectory"]), Value::Null, false))
        .json()
        .unwrap();
    let summaries = one["mirror_sd"]["monitors"]["summaries"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(summaries.len(), 1);
    assert_eq!(summaries[0]["monitor"], "latent_trajectory");

    // Streamed: the last content chunk carries the report.
    let mut stream = client::Connection::open(
        addr,
        "POST",
        chat,
        body(all.clone(), Value::Null, true).to_string().as_bytes(),
        TIMEOUT,
    )
    .unwrap();
    assert_eq!(stream.status, 200);
    let mut report = None;
    while let Some(data) = stream.next_event_data().unwrap() {
        if data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(&data).unwrap();
        if chunk.get("mirror_sd").is_some() {
            report = Some(chunk["mirror_sd"].clone());
        }
    }
    assert_summaries(&report.expect("a chunk with the report"));

    // A stop string cuts the output: the report still carries every summary, over the tokens
    // up to the cut (the engine ends the sequence at its next step).
    let content = whole["choices"][0]["message"]["content"].as_str().unwrap();
    let chars: Vec<char> = content.chars().collect();
    assert!(chars.len() >= 8, "a long enough output to cut: {content:?}");
    let at = chars.len() / 2;
    let stop_string: String = chars[at..at + 3].iter().collect();
    let kept: String = content[..content.find(&stop_string).unwrap()].to_string();
    let mut cut = body(all.clone(), Value::Null, false);
    cut["stop"] = json!([stop_string]);
    let cut = post(&cut).json().unwrap();
    assert_eq!(cut["choices"][0]["finish_reason"], "stop", "{cut}");
    assert_eq!(
        cut["choices"][0]["message"]["content"],
        kept.as_str(),
        "{cut}"
    );
    assert_summaries(&cut["mirror_sd"]);
    let observed = cut["mirror_sd"]["monitors"]["summaries"][0]["tokens"].as_u64();
    let all_tokens = whole["mirror_sd"]["monitors"]["summaries"][0]["tokens"].as_u64();
    assert!(
        observed < all_tokens,
        "{observed:?} of {all_tokens:?} tokens observed"
    );

    // Mirror (one sequence) returns every summary too; its latent monitor reads the tap's
    // layer, and another layer is a 400 before anything is queued.
    let mut on_mirror = body(all.clone(), Value::Null, false);
    on_mirror["mirror_sd"]["method"] = json!("mirror");
    let mirrored = post(&on_mirror);
    assert_eq!(mirrored.status, 200, "{}", mirrored.text());
    let mirrored = mirrored.json().unwrap();
    assert_eq!(mirrored["mirror_sd"]["method"], "mirror", "{mirrored}");
    assert_summaries(&mirrored["mirror_sd"]);
    assert_eq!(
        mirrored["choices"][0]["message"]["content"], whole["choices"][0]["message"]["content"],
        "greedy Mirror is the target's output"
    );
    on_mirror["mirror_sd"]["monitor_options"] = json!({"latent_trajectory": {"layer": 3}});
    assert_bad_request(&post(&on_mirror), Some("mirror_sd.monitor_options"));

    // Early stop at a low threshold: finish_reason "monitor", with the reading.
    let options = json!({
        "early_stop": true,
        "path_deviation": {"window": 2, "threshold": 0.5, "min_steps": 2},
    });
    let stopped = post(&body(all, options, false)).json().unwrap();
    assert_eq!(
        stopped["choices"][0]["finish_reason"], "monitor",
        "{stopped}"
    );
    let reading = &stopped["mirror_sd"]["monitors"]["stopped_by"];
    assert_eq!(reading["monitor"], "path_deviation", "{stopped}");
    assert!(reading["value"].as_f64().unwrap() > 0.5);

    // The peak instability histogram counted the monitored generations.
    let metrics = client::get(addr, "/metrics", TIMEOUT).unwrap().text();
    let count = metrics
        .lines()
        .find_map(|l| l.strip_prefix("mirror_sd_monitor_peak_instability_count "))
        .expect("the histogram's count");
    assert!(count.trim().parse::<f64>().unwrap() >= 3.0, "{metrics}");
    assert!(metrics.contains("mirror_sd_monitor_peak_instability_bucket{le=\"0.25\"}"));
    server.shutdown();
}

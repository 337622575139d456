//! Request fields parsed on their own: log-probabilities (OpenAI's two shapes) and the
//! `mirror_sd.monitors` extension.

use mirror_scheduler::monitor::{MonitorConfig, MonitorKind};
use serde_json::Value;

use super::api::Endpoint;
use super::error::ApiError;

/// Most alternatives per token (`top_logprobs`, or `logprobs` of a completion), as OpenAI allows.
pub const MAX_TOP_LOGPROBS: u64 = 20;

/// Chat's `logprobs: bool` with `top_logprobs`, or a completion's `logprobs: N`.
pub(crate) fn parse_logprobs(
    endpoint: Endpoint,
    logprobs: Option<Value>,
    top: Option<u64>,
) -> Result<Option<usize>, ApiError> {
    let bad = |param: &str, message: String| Err(ApiError::invalid_param(param, message));
    if top.is_some_and(|n| n > MAX_TOP_LOGPROBS) {
        return bad(
            "top_logprobs",
            format!("top_logprobs is at most {MAX_TOP_LOGPROBS}"),
        );
    }
    match (endpoint, logprobs) {
        (_, None | Some(Value::Null)) | (Endpoint::Chat, Some(Value::Bool(false))) => match top {
            Some(n) if n > 0 => bad(
                "top_logprobs",
                "top_logprobs needs \"logprobs\": true".into(),
            ),
            _ => Ok(None),
        },
        (Endpoint::Chat, Some(Value::Bool(true))) => Ok(Some(top.unwrap_or(0) as usize)),
        (Endpoint::Completions, Some(Value::Number(n))) => match n.as_u64() {
            Some(n) if n <= MAX_TOP_LOGPROBS => Ok(Some(n as usize)),
            _ => bad(
                "logprobs",
                format!("logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}]"),
            ),
        },
        (Endpoint::Chat, Some(_)) => bad("logprobs", "logprobs must be a boolean".into()),
        (Endpoint::Completions, Some(_)) => bad(
            "logprobs",
            format!("logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}]"),
        ),
    }
}

/// `mirror_sd.monitors` (an array of monitor names) with `mirror_sd.monitor_options` (a
/// `MonitorConfig`: each monitor's parameters and `early_stop`). Only the named monitors run;
/// options without `monitors` are refused, as is an unknown name.
pub(crate) fn parse_monitors(
    names: Option<Value>,
    options: Option<Value>,
) -> Result<Option<MonitorConfig>, ApiError> {
    let expected = MonitorKind::ALL.map(MonitorKind::name).join(", ");
    let names = match names {
        None | Some(Value::Null) => {
            if options.is_some_and(|o| !o.is_null()) {
                return Err(ApiError::invalid_param(
                    "mirror_sd.monitor_options",
                    "monitor_options needs mirror_sd.monitors",
                ));
            }
            return Ok(None);
        }
        Some(Value::Array(names)) => names,
        Some(_) => {
            return Err(ApiError::invalid_param(
                "mirror_sd.monitors",
                format!("monitors must be an array of names ({expected})"),
            ))
        }
    };
    let mut kinds = Vec::with_capacity(names.len());
    for name in &names {
        let kind = name.as_str().and_then(MonitorKind::from_name);
        match kind {
            Some(kind) => kinds.push(kind),
            None => {
                return Err(ApiError::invalid_param(
                    "mirror_sd.monitors",
                    format!("unknown monitor {name} (expected {expected})"),
                ))
            }
        }
    }
    let mut config: MonitorConfig = match options {
        None | Some(Value::Null) => MonitorConfig::default(),
        Some(options) => serde_path_to_error::deserialize(options).map_err(|e| {
            let path = e.path().to_string();
            ApiError::invalid_param(
                "mirror_sd.monitor_options",
                format!("mirror_sd.monitor_options.{path}: {}", e.into_inner()),
            )
        })?,
    };
    let named = |kind| kinds.contains(&kind);
    if !named(MonitorKind::Instability) {
        config.instability = None;
    }
    if !named(MonitorKind::PathDeviation) {
        config.path_deviation = None;
    }
    if !named(MonitorKind::LatentTrajectory) {
        config.latent_trajectory = None;
    }
    Ok(Some(config))
}

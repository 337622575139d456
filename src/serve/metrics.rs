//! Server counters, rendered in the Prometheus text format (version 0.0.4) at `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

use mirror_scheduler::{EngineLoad, Stats};

use super::backend::Method;

/// Upper bounds (seconds) of the latency histograms' buckets.
const BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

#[derive(Debug, Clone, Default)]
struct Histogram {
    /// Observations at or below each bucket bound (not cumulative; summed when rendered).
    counts: [u64; BUCKETS.len()],
    overflow: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        match BUCKETS.iter().position(|&bound| seconds <= bound) {
            Some(i) => self.counts[i] += 1,
            None => self.overflow += 1,
        }
        self.sum += seconds;
    }

    fn count(&self) -> u64 {
        self.counts.iter().sum::<u64>() + self.overflow
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, count) in BUCKETS.iter().zip(self.counts) {
            cumulative += count;
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count());
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count());
    }
}

/// How a generation that reached the engine ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` or the context limit.
    Length,
    /// The client went away; the engine stopped at its next commit.
    Cancelled,
    /// The request's deadline passed.
    Deadline,
    /// The server was shutting down and its grace period ran out.
    Shutdown,
    /// The engine returned an error or panicked.
    Error,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Stop => "stop",
            Outcome::Length => "length",
            Outcome::Cancelled => "cancelled",
            Outcome::Deadline => "deadline",
            Outcome::Shutdown => "shutdown",
            Outcome::Error => "error",
        }
    }
}

/// Why a queued request never reached the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Skipped {
    /// Its client disconnected while it waited.
    ClientGone,
    /// Its deadline passed while it waited.
    Deadline,
    /// The server shut down.
    Shutdown,
}

impl Skipped {
    fn label(self) -> &'static str {
        match self {
            Skipped::ClientGone => "client_gone",
            Skipped::Deadline => "deadline",
            Skipped::Shutdown => "shutdown",
        }
    }
}

#[derive(Debug, Clone, Default)]
struct MethodTotals {
    outcomes: BTreeMap<Outcome, u64>,
    generated_tokens: u64,
    generation_seconds: f64,
    windows: u64,
    accepted_draft_tokens: u64,
    reuse_hits: u64,
    reuse_partials: u64,
    reuse_misses: u64,
    draft_busy_seconds: f64,
    draft_hidden_seconds: f64,
}

#[derive(Debug, Default)]
struct Totals {
    requests: BTreeMap<(&'static str, u16), u64>,
    methods: BTreeMap<Method, MethodTotals>,
    skipped: BTreeMap<Skipped, u64>,
    time_to_first_token: Histogram,
    queue_wait: Histogram,
    request_latency: Histogram,
}

/// The server's counters; cheap to update from any thread.
#[derive(Debug, Default)]
pub struct Metrics {
    totals: Mutex<Totals>,
}

/// Gauges owned by the request queue, read when rendering.
#[derive(Debug, Clone, Copy)]
pub struct QueueGauges {
    /// Requests waiting (not the one running).
    pub depth: usize,
    /// Most requests that may wait.
    pub capacity: usize,
    /// 1 while the engine generates.
    pub engine_busy: bool,
    /// 1 while the server drains for shutdown.
    pub draining: bool,
    /// The batched engine's load, when it runs.
    pub batch: Option<EngineLoad>,
}

/// Routes with their own label; anything else counts as `other`.
const ROUTES: [&str; 6] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/health",
    "/metrics",
    "other",
];

impl Metrics {
    fn totals(&self) -> std::sync::MutexGuard<'_, Totals> {
        // A panic while holding the lock leaves counters that are still valid numbers.
        self.totals.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a response of `status` to a request for `path`.
    pub fn record_request(&self, path: &str, status: u16) {
        let route = ROUTES
            .iter()
            .copied()
            .find(|&r| r == path || (r == "/v1/models" && path.starts_with("/v1/models/")))
            .unwrap_or("other");
        let mut totals = self.totals();
        *totals.requests.entry((route, status)).or_default() += 1;
    }

    /// Counts a queued request that never reached the engine.
    pub fn record_skipped(&self, why: Skipped) {
        *self.totals().skipped.entry(why).or_default() += 1;
    }

    /// Records the time a request waited before the engine took it.
    pub fn record_queue_wait(&self, wait: Duration) {
        self.totals().queue_wait.observe(wait.as_secs_f64());
    }

    /// Records a generation's end: its outcome, statistics, time to first token and the
    /// request's latency from arrival to the last token.
    pub fn record_generation(
        &self,
        method: Method,
        outcome: Outcome,
        stats: Option<&Stats>,
        time_to_first_token: Option<Duration>,
        latency: Duration,
    ) {
        let mut totals = self.totals();
        totals.request_latency.observe(latency.as_secs_f64());
        if let Some(ttft) = time_to_first_token {
            totals.time_to_first_token.observe(ttft.as_secs_f64());
        }
        let entry = totals.methods.entry(method).or_default();
        *entry.outcomes.entry(outcome).or_default() += 1;
        if let Some(stats) = stats {
            entry.generated_tokens += stats.generated_tokens as u64;
            entry.generation_seconds += stats.time.total.as_secs_f64();
            entry.windows += stats.windows as u64;
            entry.accepted_draft_tokens += accepted_draft_tokens(stats);
            entry.reuse_hits += stats.reuse_hits as u64;
            entry.reuse_partials += stats.reuse_partials as u64;
            entry.reuse_misses += stats.reuse_misses as u64;
            entry.draft_busy_seconds += stats.time.draft_busy.as_secs_f64();
            entry.draft_hidden_seconds += stats.time.draft_hidden.as_secs_f64();
        }
    }

    /// Mean generation time per finished generation, in seconds (0 before the first).
    pub fn mean_generation_seconds(&self) -> f64 {
        let totals = self.totals();
        let (seconds, count) = totals.methods.values().fold((0.0, 0u64), |(s, n), m| {
            (
                s + m.generation_seconds,
                n + m.outcomes.values().sum::<u64>(),
            )
        });
        if count == 0 {
            0.0
        } else {
            seconds / count as f64
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self, gauges: QueueGauges) -> String {
        let totals = self.totals();
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, String)>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in samples {
                if labels.is_empty() {
                    let _ = writeln!(out, "{name} {value}");
                } else {
                    let _ = writeln!(out, "{name}{{{labels}}} {value}");
                }
            }
        };
        family(
            "mirror_sd_requests_total",
            "counter",
            "HTTP requests answered, by route and status.",
            totals
                .requests
                .iter()
                .map(|((route, status), n)| {
                    (
                        format!("route=\"{route}\",status=\"{status}\""),
                        n.to_string(),
                    )
                })
                .collect(),
        );
        let gauge = |value: usize| vec![(String::new(), value.to_string())];
        family(
            "mirror_sd_queue_depth",
            "gauge",
            "Requests waiting for an engine (Mirror's queue and the batch's admission).",
            gauge(gauges.depth),
        );
        family(
            "mirror_sd_queue_capacity",
            "gauge",
            "Most requests that may wait; beyond it requests get 429 (Mirror) or 503 (the batch).",
            gauge(gauges.capacity),
        );
        family(
            "mirror_sd_engine_busy",
            "gauge",
            "1 while an engine generates.",
            gauge(usize::from(gauges.engine_busy)),
        );
        family(
            "mirror_sd_draining",
            "gauge",
            "1 while the server shuts down.",
            gauge(usize::from(gauges.draining)),
        );
        let load = gauges.batch.unwrap_or_default();
        let number = |value: u64| vec![(String::new(), value.to_string())];
        family(
            "mirror_sd_batch_running",
            "gauge",
            "Sequences in the batched engine's batch.",
            gauge(load.running),
        );
        family(
            "mirror_sd_batch_waiting",
            "gauge",
            "Sequences waiting for admission into the batch (room in the batch or the KV pool).",
            gauge(load.waiting),
        );
        family(
            "mirror_sd_kv_pool_used_bytes",
            "gauge",
            "KV pool bytes in use (running sequences and the prefix cache).",
            number(load.pool_used),
        );
        family(
            "mirror_sd_kv_pool_free_bytes",
            "gauge",
            "KV pool bytes free.",
            number(load.pool_free),
        );
        family(
            "mirror_sd_prefix_cache_bytes",
            "gauge",
            "KV pool bytes held by the prefix cache (given back first when the pool fills).",
            number(load.prefix_bytes),
        );
        family(
            "mirror_sd_batch_steps_total",
            "counter",
            "Forwards the batched engine ran.",
            number(load.steps),
        );
        family(
            "mirror_sd_batch_rows_total",
            "counter",
            "Rows of those forwards (decode rows, verification windows, prompt chunks).",
            number(load.rows),
        );
        family(
            "mirror_sd_batch_rows_per_step",
            "gauge",
            "Mean rows per batched forward.",
            vec![(
                String::new(),
                ratio(load.rows as f64, load.steps as f64).to_string(),
            )],
        );
        family(
            "mirror_sd_batch_sequences_per_step",
            "gauge",
            "Mean sequences per batched forward (how batched the engine really ran).",
            vec![(
                String::new(),
                ratio(load.stepped_sequences as f64, load.steps as f64).to_string(),
            )],
        );
        family(
            "mirror_sd_skipped_in_queue_total",
            "counter",
            "Queued requests that never reached the engine, by reason.",
            totals
                .skipped
                .iter()
                .map(|(why, n)| (format!("reason=\"{}\"", why.label()), n.to_string()))
                .collect(),
        );
        let per_method = |value: &dyn Fn(&MethodTotals) -> String| -> Vec<(String, String)> {
            totals
                .methods
                .iter()
                .map(|(m, t)| (format!("method=\"{m}\""), value(t)))
                .collect()
        };
        family(
            "mirror_sd_generations_total",
            "counter",
            "Generations the engine ran, by method and outcome.",
            totals
                .methods
                .iter()
                .flat_map(|(m, t)| {
                    t.outcomes.iter().map(move |(o, n)| {
                        (
                            format!("method=\"{m}\",outcome=\"{}\"", o.label()),
                            n.to_string(),
                        )
                    })
                })
                .collect(),
        );
        family(
            "mirror_sd_generated_tokens_total",
            "counter",
            "Tokens generated, by method.",
            per_method(&|t| t.generated_tokens.to_string()),
        );
        family(
            "mirror_sd_generation_seconds_total",
            "counter",
            "Wall time of generations (prefill included), by method.",
            per_method(&|t| t.generation_seconds.to_string()),
        );
        family(
            "mirror_sd_tokens_per_second",
            "gauge",
            "Generated tokens per second of generation time, over all generations, by method.",
            per_method(&|t| ratio(t.generated_tokens as f64, t.generation_seconds).to_string()),
        );
        family(
            "mirror_sd_windows_total",
            "counter",
            "Verification windows, by method.",
            per_method(&|t| t.windows.to_string()),
        );
        family(
            "mirror_sd_accepted_draft_tokens_total",
            "counter",
            "Draft tokens accepted, by method.",
            per_method(&|t| t.accepted_draft_tokens.to_string()),
        );
        family(
            "mirror_sd_mean_accepted_tokens",
            "gauge",
            "Acceptance E[A]: mean accepted draft tokens per window, by method.",
            per_method(&|t| ratio(t.accepted_draft_tokens as f64, t.windows as f64).to_string()),
        );
        family(
            "mirror_sd_reuse_total",
            "counter",
            "Mirror's next windows from the hypothesis tree: hit (whole), partial, or miss (rolled out afresh).",
            totals
                .methods
                .iter()
                .flat_map(|(m, t)| {
                    [
                        ("hit", t.reuse_hits),
                        ("partial", t.reuse_partials),
                        ("miss", t.reuse_misses),
                    ]
                    .into_iter()
                    .map(move |(kind, n)| {
                        (format!("method=\"{m}\",kind=\"{kind}\""), n.to_string())
                    })
                })
                .collect(),
        );
        family(
            "mirror_sd_reuse_rate",
            "gauge",
            "Share of Mirror's next windows served from the hypothesis tree, by method.",
            per_method(&|t| {
                let served = (t.reuse_hits + t.reuse_partials) as f64;
                ratio(served, served + t.reuse_misses as f64).to_string()
            }),
        );
        family(
            "mirror_sd_draft_busy_seconds_total",
            "counter",
            "Time the draft computed, by method.",
            per_method(&|t| t.draft_busy_seconds.to_string()),
        );
        family(
            "mirror_sd_draft_hidden_seconds_total",
            "counter",
            "Part of the draft's time hidden behind the target, by method.",
            per_method(&|t| t.draft_hidden_seconds.to_string()),
        );
        family(
            "mirror_sd_draft_hidden_fraction",
            "gauge",
            "Share of the draft's compute hidden behind the target, by method.",
            per_method(&|t| ratio(t.draft_hidden_seconds, t.draft_busy_seconds).to_string()),
        );
        totals.time_to_first_token.render(
            &mut out,
            "mirror_sd_time_to_first_token_seconds",
            "From a request's arrival to its first generated text.",
        );
        totals.queue_wait.render(
            &mut out,
            "mirror_sd_queue_wait_seconds",
            "Time requests waited for the engine.",
        );
        totals.request_latency.render(
            &mut out,
            "mirror_sd_request_latency_seconds",
            "Requests that reached the engine, from arrival to their last token.",
        );
        out
    }
}

/// Accepted draft tokens of a generation, from its accepted-length histogram.
fn accepted_draft_tokens(stats: &Stats) -> u64 {
    stats
        .accepted_histogram
        .iter()
        .enumerate()
        .map(|(accepted, windows)| (accepted * windows) as u64)
        .sum()
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

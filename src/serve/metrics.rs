//! Server counters at `/metrics`, in the Prometheus text format, recorded with the `metrics`
//! crate into a recorder of `metrics-exporter-prometheus`.
//!
//! Every server has its own recorder (never the process-wide one), so that several servers in
//! one process (the tests) keep their figures apart: [`Metrics`] records through it with
//! [`metrics::with_local_recorder`] and renders with its handle. The gauges that describe the
//! engines' state now (queue, batch, KV pool) are set from [`QueueGauges`] just before rendering;
//! the ratios (tokens per second, E[A], reuse rate, hidden draft fraction) from per-method totals
//! kept here. The `metrics` crate's counters hold integers, so the totals in seconds
//! (`mirror_sd_generation_seconds_total`, `mirror_sd_draft_*_seconds_total`) are gauges that only
//! grow.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use ::metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
    with_local_recorder,
};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use mirror_scheduler::{EngineLoad, MonitorReport, MonitorSummary, Stats};

use super::backend::Method;
use super::error::ServeError;

/// The histogram of monitored generations' peak instability.
const PEAK_INSTABILITY: &str = "mirror_sd_monitor_peak_instability";

/// Upper bounds (seconds) of the latency histograms' buckets.
const BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Upper bounds of the peak instability histogram's buckets (JSD in [0, 1] plus an entropy in
/// [0, log2 20 = 4.32] bits with the default parameters).
const INSTABILITY_BUCKETS: [f64; 12] =
    [0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.5];

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
    /// A monitor's early stop ended it (`mirror_sd.monitor_options.early_stop`).
    Monitor,
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
            Outcome::Monitor => "monitor",
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

/// A method's sums behind its ratio gauges.
#[derive(Debug, Clone, Default)]
struct MethodTotals {
    generations: u64,
    generated_tokens: u64,
    generation_seconds: f64,
    windows: u64,
    accepted_draft_tokens: u64,
    reuse_served: u64,
    reuse_misses: u64,
    draft_busy_seconds: f64,
    draft_hidden_seconds: f64,
}

/// The server's counters; cheap to update from any thread.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    methods: Mutex<BTreeMap<Method, MethodTotals>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
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

/// Every family's name, kind and help text.
fn describe() {
    describe_counter!(
        "mirror_sd_requests_total",
        "HTTP requests answered, by route and status."
    );
    describe_gauge!(
        "mirror_sd_queue_depth",
        "Requests waiting for an engine (Mirror's queue and the batch's admission)."
    );
    describe_gauge!(
        "mirror_sd_queue_capacity",
        "Most requests that may wait; beyond it requests get 429 (Mirror) or 503 (the batch)."
    );
    describe_gauge!("mirror_sd_engine_busy", "1 while an engine generates.");
    describe_gauge!("mirror_sd_draining", "1 while the server shuts down.");
    describe_gauge!(
        "mirror_sd_batch_running",
        "Sequences in the batched engine's batch."
    );
    describe_gauge!(
        "mirror_sd_batch_waiting",
        "Sequences waiting for admission into the batch (room in the batch or the KV pool)."
    );
    describe_gauge!(
        "mirror_sd_kv_pool_used_bytes",
        "KV pool bytes in use (running sequences and the prefix cache)."
    );
    describe_gauge!("mirror_sd_kv_pool_free_bytes", "KV pool bytes free.");
    describe_gauge!(
        "mirror_sd_prefix_cache_bytes",
        "KV pool bytes held by the prefix cache (given back first when the pool fills)."
    );
    describe_counter!(
        "mirror_sd_batch_steps_total",
        "Forwards the batched engine ran."
    );
    describe_counter!(
        "mirror_sd_batch_rows_total",
        "Rows of those forwards (decode rows, verification windows, prompt chunks)."
    );
    describe_gauge!(
        "mirror_sd_batch_rows_per_step",
        "Mean rows per batched forward."
    );
    describe_gauge!(
        "mirror_sd_batch_sequences_per_step",
        "Mean sequences per batched forward (how batched the engine really ran)."
    );
    describe_counter!(
        "mirror_sd_skipped_in_queue_total",
        "Queued requests that never reached the engine, by reason."
    );
    describe_counter!(
        "mirror_sd_generations_total",
        "Generations the engine ran, by method and outcome."
    );
    describe_counter!(
        "mirror_sd_generated_tokens_total",
        "Tokens generated, by method."
    );
    describe_gauge!(
        "mirror_sd_generation_seconds_total",
        "Wall time of generations (prefill included), by method."
    );
    describe_gauge!(
        "mirror_sd_tokens_per_second",
        "Generated tokens per second of generation time, over all generations, by method."
    );
    describe_counter!(
        "mirror_sd_windows_total",
        "Verification windows, by method."
    );
    describe_counter!(
        "mirror_sd_accepted_draft_tokens_total",
        "Draft tokens accepted, by method."
    );
    describe_gauge!(
        "mirror_sd_mean_accepted_tokens",
        "Acceptance E[A]: mean accepted draft tokens per window, by method."
    );
    describe_counter!(
        "mirror_sd_reuse_total",
        "Mirror's next windows from the hypothesis tree: hit (whole), partial, or miss (rolled out afresh)."
    );
    describe_gauge!(
        "mirror_sd_reuse_rate",
        "Share of Mirror's next windows served from the hypothesis tree, by method."
    );
    describe_gauge!(
        "mirror_sd_draft_busy_seconds_total",
        "Time the draft computed, by method."
    );
    describe_gauge!(
        "mirror_sd_draft_hidden_seconds_total",
        "Part of the draft's time hidden behind the target, by method."
    );
    describe_gauge!(
        "mirror_sd_draft_hidden_fraction",
        "Share of the draft's compute hidden behind the target, by method."
    );
    describe_histogram!(
        "mirror_sd_time_to_first_token_seconds",
        "From a request's arrival to its first generated text."
    );
    describe_histogram!(
        "mirror_sd_queue_wait_seconds",
        "Time requests waited for the engine."
    );
    describe_histogram!(
        PEAK_INSTABILITY,
        "Peak instability strength (the instability monitor's max of JSD + entropy) of monitored generations."
    );
    describe_histogram!(
        "mirror_sd_request_latency_seconds",
        "Requests that reached the engine, from arrival to their last token."
    );
}

impl Metrics {
    /// A server's own recorder, every family described and the unlabelled ones registered (so
    /// that `/metrics` lists them before the first request).
    pub fn new() -> Result<Self, ServeError> {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full(PEAK_INSTABILITY.into()),
                    &INSTABILITY_BUCKETS,
                )
            })
            .map_err(|e| ServeError::Metrics(Box::new(e)))?
            .build_recorder();
        let handle = recorder.handle();
        let metrics = Self {
            recorder,
            handle,
            methods: Mutex::new(BTreeMap::new()),
        };
        metrics.with(|| {
            describe();
            for name in [
                "mirror_sd_time_to_first_token_seconds",
                "mirror_sd_queue_wait_seconds",
                "mirror_sd_request_latency_seconds",
                PEAK_INSTABILITY,
            ] {
                let _ = histogram!(name);
            }
        });
        metrics.set_gauges(&QueueGauges {
            depth: 0,
            capacity: 0,
            engine_busy: false,
            draining: false,
            batch: None,
        });
        Ok(metrics)
    }

    /// Runs `f` with this server's recorder as the one the `metrics` macros record into.
    fn with<T>(&self, f: impl FnOnce() -> T) -> T {
        with_local_recorder(&self.recorder, f)
    }

    fn methods(&self) -> std::sync::MutexGuard<'_, BTreeMap<Method, MethodTotals>> {
        // A panic while holding the lock leaves totals that are still valid numbers.
        self.methods.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a response of `status` to a request for `path`.
    pub fn record_request(&self, path: &str, status: u16) {
        let route = ROUTES
            .iter()
            .copied()
            .find(|&r| r == path || (r == "/v1/models" && path.starts_with("/v1/models/")))
            .unwrap_or("other");
        self.with(|| {
            counter!("mirror_sd_requests_total", "route" => route, "status" => status.to_string())
                .increment(1);
        });
    }

    /// Counts a queued request that never reached the engine.
    pub fn record_skipped(&self, why: Skipped) {
        self.with(|| {
            counter!("mirror_sd_skipped_in_queue_total", "reason" => why.label()).increment(1);
        });
    }

    /// Records a monitored generation's readings (the peak instability, when it ran).
    pub fn record_monitors(&self, report: &MonitorReport) {
        for summary in &report.summaries {
            if let MonitorSummary::Instability(s) = summary {
                if let Some(peak) = s.peak {
                    self.with(|| histogram!(PEAK_INSTABILITY).record(peak));
                }
            }
        }
    }

    /// Records the time a request waited before the engine took it.
    pub fn record_queue_wait(&self, wait: Duration) {
        self.with(|| histogram!("mirror_sd_queue_wait_seconds").record(wait.as_secs_f64()));
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
        let none = Stats::default();
        let stats = stats.unwrap_or(&none);
        let accepted = accepted_draft_tokens(stats);
        let totals = {
            let mut methods = self.methods();
            let t = methods.entry(method).or_default();
            t.generations += 1;
            t.generated_tokens += stats.generated_tokens as u64;
            t.generation_seconds += stats.time.total.as_secs_f64();
            t.windows += stats.windows as u64;
            t.accepted_draft_tokens += accepted;
            t.reuse_served += (stats.reuse_hits + stats.reuse_partials) as u64;
            t.reuse_misses += stats.reuse_misses as u64;
            t.draft_busy_seconds += stats.time.draft_busy.as_secs_f64();
            t.draft_hidden_seconds += stats.time.draft_hidden.as_secs_f64();
            t.clone()
        };
        let m = method.as_str();
        self.with(|| {
            histogram!("mirror_sd_request_latency_seconds").record(latency.as_secs_f64());
            if let Some(ttft) = time_to_first_token {
                histogram!("mirror_sd_time_to_first_token_seconds").record(ttft.as_secs_f64());
            }
            counter!("mirror_sd_generations_total", "method" => m, "outcome" => outcome.label())
                .increment(1);
            let count = |name: &'static str, value: u64| {
                counter!(name, "method" => m).increment(value);
            };
            count(
                "mirror_sd_generated_tokens_total",
                stats.generated_tokens as u64,
            );
            count("mirror_sd_windows_total", stats.windows as u64);
            count("mirror_sd_accepted_draft_tokens_total", accepted);
            for (kind, n) in [
                ("hit", stats.reuse_hits),
                ("partial", stats.reuse_partials),
                ("miss", stats.reuse_misses),
            ] {
                counter!("mirror_sd_reuse_total", "method" => m, "kind" => kind)
                    .increment(n as u64);
            }
            let add = |name: &'static str, seconds: Duration| {
                gauge!(name, "method" => m).increment(seconds.as_secs_f64());
            };
            add("mirror_sd_generation_seconds_total", stats.time.total);
            add("mirror_sd_draft_busy_seconds_total", stats.time.draft_busy);
            add(
                "mirror_sd_draft_hidden_seconds_total",
                stats.time.draft_hidden,
            );
            let set = |name: &'static str, value: f64| gauge!(name, "method" => m).set(value);
            set(
                "mirror_sd_tokens_per_second",
                ratio(totals.generated_tokens as f64, totals.generation_seconds),
            );
            set(
                "mirror_sd_mean_accepted_tokens",
                ratio(totals.accepted_draft_tokens as f64, totals.windows as f64),
            );
            let served = totals.reuse_served as f64;
            set(
                "mirror_sd_reuse_rate",
                ratio(served, served + totals.reuse_misses as f64),
            );
            set(
                "mirror_sd_draft_hidden_fraction",
                ratio(totals.draft_hidden_seconds, totals.draft_busy_seconds),
            );
        });
        // Fold the histograms' new samples into their buckets, so that memory stays bounded
        // however long nobody scrapes.
        self.handle.run_upkeep();
    }

    /// Mean generation time per finished generation, in seconds (0 before the first).
    pub fn mean_generation_seconds(&self) -> f64 {
        let methods = self.methods();
        let (seconds, count) = methods.values().fold((0.0, 0u64), |(s, n), m| {
            (s + m.generation_seconds, n + m.generations)
        });
        ratio(seconds, count as f64)
    }

    /// Sets the gauges of the engines' state now.
    fn set_gauges(&self, gauges: &QueueGauges) {
        let load = gauges.batch.unwrap_or_default();
        self.with(|| {
            let set = |name: &'static str, value: f64| gauge!(name).set(value);
            set("mirror_sd_queue_depth", gauges.depth as f64);
            set("mirror_sd_queue_capacity", gauges.capacity as f64);
            set(
                "mirror_sd_engine_busy",
                f64::from(u8::from(gauges.engine_busy)),
            );
            set("mirror_sd_draining", f64::from(u8::from(gauges.draining)));
            set("mirror_sd_batch_running", load.running as f64);
            set("mirror_sd_batch_waiting", load.waiting as f64);
            set("mirror_sd_kv_pool_used_bytes", load.pool_used as f64);
            set("mirror_sd_kv_pool_free_bytes", load.pool_free as f64);
            set("mirror_sd_prefix_cache_bytes", load.prefix_bytes as f64);
            counter!("mirror_sd_batch_steps_total").absolute(load.steps);
            counter!("mirror_sd_batch_rows_total").absolute(load.rows);
            set(
                "mirror_sd_batch_rows_per_step",
                ratio(load.rows as f64, load.steps as f64),
            );
            set(
                "mirror_sd_batch_sequences_per_step",
                ratio(load.stepped_sequences as f64, load.steps as f64),
            );
        });
    }

    /// The Prometheus text exposition, the engines' gauges set from `gauges` first.
    pub fn render(&self, gauges: QueueGauges) -> String {
        self.set_gauges(&gauges);
        self.handle.render()
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

//! `load --soak`: a long mixed load that looks for leaks and for wrong or failed answers.
//!
//! The requests are planned first from `--seed`: each takes a prompt of the suite and a length
//! drawn from `1..=--soak-max-tokens` (end-of-sequence ignored, so it generates that many
//! tokens), whole or streamed at random. About 10% are cancelled mid-stream (the client drops
//! the connection after one to three events) and about 5% are malformed (invalid JSON, an
//! unknown field, a field of the wrong type, a value out of range), each of which must get a
//! 4xx. Before the soak, every distinct (prompt, length) is generated once with
//! `--reference-method`, one request at a time; every completed answer must equal its reference
//! token for token and in text, and a cancelled stream's text must be a prefix of it.
//!
//! The server's resident memory (`VmRSS` of `/proc/<pid>/status`) is read at the start, after
//! the references, after the first 100 soak requests (the warm-up), every 100 requests after
//! that, and at the end.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mirror_sd::mirror_core::ChatMessage;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::http::{self, Connection};
use super::{join_all, reference, request_body, send_one, Args, Outcome, ServerKind};

/// Requests after which the server counts as warmed up.
const WARM_UP: usize = 100;
const MAX_SOAK_REQUESTS: usize = 100_000;

/// What a planned request does.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// Completes, whole or streamed; its answer is checked.
    Complete { stream: bool },
    /// Streams, and the client goes away after `events` events.
    Cancel { events: usize },
    /// A malformed body of the given sort; must get a 4xx.
    Malformed(usize),
}

#[derive(Debug, Clone, Copy)]
struct Planned {
    prompt: usize,
    max_tokens: usize,
    kind: Kind,
}

/// The malformed bodies' sorts, each with what is wrong.
const MALFORMED: [&str; 4] = [
    "invalid JSON",
    "unknown field",
    "wrong type",
    "out of range",
];

fn plan(args: &Args, prompts: usize) -> Vec<Planned> {
    let mut rng = StdRng::seed_from_u64(args.seed);
    (0..args.soak_requests)
        .map(|_| {
            let prompt = rng.random_range(0..prompts);
            let max_tokens = rng.random_range(1..=args.soak_max_tokens);
            let roll: f64 = rng.random();
            let kind = if roll < 0.05 {
                Kind::Malformed(rng.random_range(0..MALFORMED.len()))
            } else if roll < 0.15 {
                Kind::Cancel {
                    events: rng.random_range(1..=3),
                }
            } else {
                Kind::Complete {
                    stream: rng.random_bool(0.5),
                }
            };
            Planned {
                prompt,
                max_tokens,
                kind,
            }
        })
        .collect()
}

fn malformed_body(sort: usize, good: &Value) -> Vec<u8> {
    let mut body = good.clone();
    match sort {
        0 => {
            let text = good.to_string();
            return text.as_bytes()[..text.len() / 2].to_vec();
        }
        1 => body["frobnicate"] = json!(true),
        2 => body["max_tokens"] = json!("ten"),
        _ => body["temperature"] = json!(-1),
    }
    body.to_string().into_bytes()
}

/// Resident memory of `pid` in KiB.
fn rss_kib(pid: u32) -> Result<u64, String> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("{path}: no VmRSS"))
}

/// The process listening on TCP `port` (Linux: the socket's inode in /proc/net/tcp*, then the
/// process holding it).
fn pid_listening_on(port: u16) -> Result<u32, String> {
    let mut inodes = BTreeSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue;
            };
            let local_port = local
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if *state == "0A" && local_port == Some(port) {
                inodes.insert(format!("socket:[{inode}]"));
            }
        }
    }
    let processes = std::fs::read_dir("/proc").map_err(|e| format!("/proc: {e}"))?;
    for entry in processes.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(link) = std::fs::read_link(fd.path()) {
                if inodes.contains(link.to_string_lossy().as_ref()) {
                    return Ok(pid);
                }
            }
        }
    }
    Err(format!(
        "no process found listening on port {port}; pass --server-pid"
    ))
}

/// How one soak request ended.
#[derive(Debug)]
enum Ended {
    Correct,
    Incorrect(String),
    Cancelled,
    Rejected(u16),
    Unexpected(String),
}

/// A cancelled stream: `events` events read, then the connection dropped. Its text so far must
/// start its reference's.
fn cancel(
    addr: SocketAddr,
    body: &Value,
    events: usize,
    reference: &Outcome,
    timeout: Duration,
) -> Ended {
    let mut connection = match Connection::open(
        addr,
        "POST",
        "/v1/chat/completions",
        body.to_string().as_bytes(),
        timeout,
    ) {
        Ok(c) => c,
        Err(e) => return Ended::Unexpected(format!("cancelled request: {e}")),
    };
    if connection.status != 200 {
        return Ended::Unexpected(format!("cancelled request: status {}", connection.status));
    }
    let mut text = String::new();
    for _ in 0..events {
        match connection.next_event_data() {
            Ok(Some(data)) if data == "[DONE]" => break,
            Ok(Some(data)) => {
                let chunk: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
                if chunk.get("error").is_some() {
                    return Ended::Unexpected(format!("cancelled request: {data}"));
                }
                text += chunk["choices"][0]["delta"]["content"]
                    .as_str()
                    .unwrap_or("");
            }
            Ok(None) => break,
            Err(e) => return Ended::Unexpected(format!("cancelled request: {e}")),
        }
    }
    connection.disconnect();
    if reference.text.starts_with(&text) {
        Ended::Cancelled
    } else {
        Ended::Incorrect(format!(
            "cancelled stream's {text:?} does not start {:?}",
            reference.text
        ))
    }
}

fn send(
    addr: SocketAddr,
    args: &Args,
    model: &str,
    prompts: &[Vec<ChatMessage>],
    planned: Planned,
    reference: Option<&Outcome>,
    timeout: Duration,
) -> Ended {
    let method = args.method.as_deref();
    let messages = &prompts[planned.prompt];
    let body = |stream| {
        request_body(
            ServerKind::MirrorSd,
            model,
            messages,
            planned.max_tokens,
            method,
            stream,
        )
    };
    let missing = || Ended::Unexpected("no reference was generated".into());
    match planned.kind {
        Kind::Complete { stream } => {
            let Some(reference) = reference else {
                return missing();
            };
            let outcome = send_one(addr, &body(stream), stream, planned.prompt, timeout);
            if let Some(error) = outcome.error {
                return Ended::Unexpected(format!("status {}: {error}", outcome.status));
            }
            if outcome.token_ids == reference.token_ids && outcome.text == reference.text {
                Ended::Correct
            } else {
                Ended::Incorrect(format!(
                    "prompt {} max_tokens {}: {:?} against {:?}",
                    planned.prompt, planned.max_tokens, outcome.text, reference.text
                ))
            }
        }
        Kind::Cancel { events } => match reference {
            Some(reference) => cancel(addr, &body(true), events, reference, timeout),
            None => missing(),
        },
        Kind::Malformed(sort) => {
            let bytes = malformed_body(sort, &body(false));
            match http::send(addr, "POST", "/v1/chat/completions", &bytes, timeout) {
                Ok(r) if (400..500).contains(&r.status) && r.json().is_ok() => {
                    Ended::Rejected(r.status)
                }
                Ok(r) => Ended::Unexpected(format!(
                    "malformed ({}) answered {}: {}",
                    MALFORMED[sort],
                    r.status,
                    r.text()
                )),
                Err(e) => Ended::Unexpected(format!("malformed ({}): {e}", MALFORMED[sort])),
            }
        }
    }
}

pub fn run(
    args: &Args,
    addr: SocketAddr,
    model: &str,
    prompts: &[Vec<ChatMessage>],
    timeout: Duration,
) -> Result<(), String> {
    if args.server != ServerKind::MirrorSd {
        return Err("--soak drives our server only".into());
    }
    if args.soak_requests == 0 || args.soak_requests > MAX_SOAK_REQUESTS {
        return Err(format!(
            "--soak-requests must be in 1..={MAX_SOAK_REQUESTS}"
        ));
    }
    if args.soak_clients == 0 || args.soak_clients > super::MAX_CLIENTS {
        return Err(format!(
            "--soak-clients must be in 1..={}",
            super::MAX_CLIENTS
        ));
    }
    if args.soak_max_tokens == 0 || args.soak_max_tokens > super::MAX_TOKENS {
        return Err(format!(
            "--soak-max-tokens must be in 1..={}",
            super::MAX_TOKENS
        ));
    }
    let pid = match args.server_pid {
        Some(pid) => pid,
        None => pid_listening_on(addr.port())?,
    };
    let rss_start = rss_kib(pid)?;
    let planned = plan(args, prompts.len());
    let pairs: BTreeSet<(usize, usize)> = planned
        .iter()
        .filter(|p| !matches!(p.kind, Kind::Malformed(_)))
        .map(|p| (p.prompt, p.max_tokens))
        .collect();
    eprintln!(
        "soak: server pid {pid}, {} requests at {} clients; {} references with method {}",
        planned.len(),
        args.soak_clients,
        pairs.len(),
        args.reference_method
    );
    let started = Instant::now();
    let mut references: BTreeMap<(usize, usize), Outcome> = BTreeMap::new();
    for &(prompt, max_tokens) in &pairs {
        let outcome = reference(
            args,
            addr,
            model,
            (prompt, &prompts[prompt]),
            max_tokens,
            timeout,
        )?;
        references.insert((prompt, max_tokens), outcome);
    }
    let references_s = started.elapsed().as_secs_f64();
    let rss_references = rss_kib(pid)?;
    eprintln!("soak: references done in {references_s:.1} s");
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let samples: Mutex<Vec<Sample>> = Mutex::new(Vec::new());
    let started = Instant::now();
    let ended: Vec<(Planned, Ended)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..args.soak_clients)
            .map(|_| {
                scope.spawn(|| {
                    let mut ended = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&p) = planned.get(i) else { break };
                        let reference = references.get(&(p.prompt, p.max_tokens));
                        let end = send(addr, args, model, prompts, p, reference, timeout);
                        ended.push((p, end));
                        let count = done.fetch_add(1, Ordering::Relaxed) + 1;
                        if count.is_multiple_of(WARM_UP) {
                            if let Ok(kib) = rss_kib(pid) {
                                let prefix = prefix_cache_bytes(addr, timeout);
                                samples
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .push((count, kib, prefix));
                                eprintln!(
                                    "soak: {count} requests, RSS {:.1} MiB, prefix cache {:.1} MiB",
                                    kib as f64 / 1024.0,
                                    prefix / (1 << 20) as f64
                                );
                            }
                        }
                    }
                    ended
                })
            })
            .collect();
        join_all(handles)
    });
    let wall = started.elapsed().as_secs_f64();
    // Let the last cancellations reach the engine before the last reading.
    std::thread::sleep(Duration::from_secs(2));
    let rss_end = rss_kib(pid)?;
    let mut samples = samples.into_inner().unwrap_or_else(|e| e.into_inner());
    samples.sort_unstable_by_key(|s| s.0);
    let rss_warm = samples
        .iter()
        .find(|(n, _, _)| *n >= WARM_UP)
        .map_or(rss_references, |&(_, kib, _)| kib);
    let rss_peak = samples
        .iter()
        .map(|&(_, kib, _)| kib)
        .max()
        .unwrap_or(rss_end)
        .max(rss_end);
    samples.push((ended.len(), rss_end, prefix_cache_bytes(addr, timeout)));
    report(
        args,
        pid,
        &ended,
        &references,
        wall,
        references_s,
        [rss_start, rss_references, rss_warm, rss_peak, rss_end],
        &samples,
        addr,
        timeout,
    )
}

/// Requests done, the server's RSS (KiB) and its prefix cache's bytes then.
type Sample = (usize, u64, f64);

/// The prefix cache's bytes (`mirror_sd_prefix_cache_bytes`; 0 when it cannot be read): kept
/// KV the pool's budget bounds, which grows until the budget needs it back, so it is not a
/// leak and is reported beside the RSS.
fn prefix_cache_bytes(addr: SocketAddr, timeout: Duration) -> f64 {
    let metrics = http::get(addr, "/metrics", timeout)
        .map(|r| r.text())
        .unwrap_or_default();
    gauge(&metrics, "mirror_sd_prefix_cache_bytes").unwrap_or(0.0)
}

/// The value of an unlabelled sample `name` in Prometheus text.
fn gauge(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
}

#[allow(clippy::too_many_arguments)]
fn report(
    args: &Args,
    pid: u32,
    ended: &[(Planned, Ended)],
    references: &BTreeMap<(usize, usize), Outcome>,
    wall: f64,
    references_s: f64,
    rss: [u64; 5],
    samples: &[Sample],
    addr: SocketAddr,
    timeout: Duration,
) -> Result<(), String> {
    let mut classes: BTreeMap<String, usize> = BTreeMap::new();
    let mut problems = Vec::new();
    let mut tokens = 0;
    for (p, end) in ended {
        let class = match end {
            Ended::Correct => {
                tokens += p.max_tokens;
                "completed, correct".to_string()
            }
            Ended::Cancelled => "cancelled mid-stream (injected)".to_string(),
            Ended::Rejected(status) => match p.kind {
                Kind::Malformed(sort) => {
                    format!("malformed, {} -> {status} (injected)", MALFORMED[sort])
                }
                _ => format!("rejected {status}"),
            },
            Ended::Incorrect(what) => {
                problems.push(what.clone());
                "INCORRECT output".to_string()
            }
            Ended::Unexpected(what) => {
                problems.push(what.clone());
                "UNEXPECTED error".to_string()
            }
        };
        *classes.entry(class).or_default() += 1;
    }
    let metrics = http::get(addr, "/metrics", timeout)
        .map(|r| r.text())
        .unwrap_or_default();
    let gauge = |name: &str| gauge(&metrics, name);
    let [start, after_references, warm, peak, end] = rss;
    let mib = |kib: u64| kib as f64 / 1024.0;
    let growth = (end as f64 - warm as f64) / warm as f64;
    println!("soak: {} requests, {} clients, seed {}, lengths 1..={}, {} references in {references_s:.1} s",
        ended.len(), args.soak_clients, args.seed, args.soak_max_tokens, references.len());
    println!(
        "wall {wall:.1} s, {tokens} checked tokens, {:.1} tok/s of checked output",
        tokens as f64 / wall
    );
    println!("\n| server RSS (pid {pid}) | MiB |\n|---|---|");
    println!(
        "| start | {:.1} |\n| after the references | {:.1} |",
        mib(start),
        mib(after_references)
    );
    println!(
        "| after warm-up ({WARM_UP} requests) | {:.1} |\n| peak sample | {:.1} |",
        mib(warm),
        mib(peak)
    );
    println!(
        "| end | {:.1} |\n| end against warm-up | {:+.1}% |",
        mib(end),
        growth * 100.0
    );
    println!("\n| requests | RSS (MiB) | prefix cache (MiB) | RSS less prefix cache (MiB) |");
    println!("|---|---|---|---|");
    for &(requests, kib, prefix) in samples {
        let prefix = prefix / (1 << 20) as f64;
        println!(
            "| {requests} | {:.1} | {prefix:.1} | {:.1} |",
            mib(kib),
            mib(kib) - prefix
        );
    }
    let less_prefix = |requests: usize| {
        let &(_, kib, prefix) = samples.iter().find(|s| s.0 >= requests)?;
        Some(mib(kib) - prefix / (1 << 20) as f64)
    };
    if let (Some(warm), Some(end)) = (less_prefix(WARM_UP), less_prefix(ended.len())) {
        println!(
            "RSS less prefix cache, end against warm-up: {:+.1}%",
            (end - warm) / warm * 100.0
        );
    }
    println!("\n| outcome | requests |\n|---|---|");
    for (class, n) in &classes {
        println!("| {class} | {n} |");
    }
    println!(
        "\nafter the soak: batch running {:?}, waiting {:?}, KV pool used {:?} bytes (prefix cache {:?})",
        gauge("mirror_sd_batch_running"),
        gauge("mirror_sd_batch_waiting"),
        gauge("mirror_sd_kv_pool_used_bytes"),
        gauge("mirror_sd_prefix_cache_bytes"),
    );
    for problem in problems.iter().take(5) {
        eprintln!("problem: {problem}");
    }
    let mut failed = Vec::new();
    if !problems.is_empty() {
        failed.push(format!(
            "{} unexpected errors or wrong outputs",
            problems.len()
        ));
    }
    if growth > 0.10 {
        failed.push(format!("RSS grew {:.1}% after warm-up", growth * 100.0));
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("; "))
    }
}

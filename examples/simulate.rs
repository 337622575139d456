//! The latency model of `mirror_scheduler::latency`, two ways.
//!
//! 1. `--calibrate RESULTS_JSON`: measures forward costs of the target and draft on this machine
//!    (median of repeated forwards after a 128-token context), takes E[A] and the reuse rate of a
//!    `compare` run, and prints the predicted decode tokens/s beside the measured ones.
//! 2. Default: projections from hardware profiles for a heterogeneous deployment like the paper's
//!    (target tensor-parallel over 8 GPUs, a 0.5B draft on an NPU), for 14B, 32B and 66B targets,
//!    sweeping kappa, with Mirror beside vanilla SD.
//!
//! ```text
//! cargo run --release --example simulate
//! cargo run --release --example compare -- --per-category 1 --out-dir target/compare-qwen
//! cargo run --release --example simulate -- --calibrate target/compare-qwen/results.json
//! ```

#[path = "common/mod.rs"]
mod common;

use std::time::Instant;

use clap::Parser;
use mirror_sd::mirror_core::{Device, Model};
use mirror_sd::mirror_scheduler::latency::{
    DeviceProfile, ForwardCost, ModelShape, Scenario, TreeSchedule,
};

#[derive(Parser, Debug)]
struct Args {
    /// A `compare` results.json to validate the model against (loads the models it names).
    #[arg(long)]
    calibrate: Option<String>,
    #[command(flatten)]
    pair: common::PairArgs,
}

fn main() {
    let args = Args::parse();
    let result = match &args.calibrate {
        Some(path) => calibrate(&args, path),
        None => {
            project();
            Ok(())
        }
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// Median seconds of `runs` forwards of `tokens` tokens after a `CONTEXT`-token context.
fn measure(model: &Model, tokens: usize, runs: usize) -> Result<f64, String> {
    let context: Vec<u32> = (0..CONTEXT as u32).map(|i| 100 + (i * 37) % 4000).collect();
    let mut cache = model
        .new_cache(1, CONTEXT + tokens + 1)
        .map_err(|e| e.to_string())?;
    model
        .forward_causal(&context, &mut cache)
        .map_err(|e| e.to_string())?;
    let window: Vec<u32> = (0..tokens as u32).map(|i| 500 + i).collect();
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        model
            .forward_causal(&window, &mut cache)
            .map_err(|e| e.to_string())?;
        times.push(start.elapsed().as_secs_f64());
        cache.truncate(CONTEXT);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Context of the calibration forwards: about where the suite's generations sit (chat prompts
/// of 30 to 200 tokens plus up to 64 generated).
const CONTEXT: usize = 128;

fn calibrate(args: &Args, path: &str) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let run: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("{path}: {e}"))?;
    let gamma = run["gamma"].as_u64().unwrap_or(4) as usize;
    let kappa = run["kappa"].as_u64().unwrap_or(4) as usize;
    let exit_fraction = run["exit_fraction"].as_f64().unwrap_or(0.5);
    let device = Device::Cpu;
    let (target_options, draft_options) = args.pair.options(&device)?;
    let target = common::load_with_spinner(
        "target",
        &common::resolve_source(&args.pair.target)?,
        &target_options,
    )?
    .model;
    let draft = common::load_with_spinner(
        "draft",
        &common::resolve_source(&args.pair.draft)?,
        &draft_options,
    )?
    .model;
    let t1 = measure(&target, 1, 5)?;
    let tw = measure(&target, gamma + 1, 5)?;
    let d1 = measure(&draft, 1, 7)?;
    let d4 = measure(&draft, 4, 7)?;
    let target_cost = ForwardCost::fit((1, t1), (gamma + 1, tw));
    let draft_cost = ForwardCost::fit((1, d1), (4, d4));
    println!("measured forward costs: target t(1) {:.0} ms, t({}) {:.0} ms; draft t(1) {:.0} ms, t(4) {:.0} ms", t1 * 1e3, gamma + 1, tw * 1e3, d1 * 1e3, d4 * 1e3);
    let results = &run["results"];
    let overall = |m: &str, key: &str| results[m]["overall"][key].as_f64();
    // Decode speed: prefill is the same work for every strategy and not part of the law.
    let measured = |m: &str| {
        Some(overall(m, "tokens")? / (overall(m, "seconds")? - overall(m, "prefill_seconds")?))
    };
    let mean_accepted = |m: &str| Some(overall(m, "accepted")? / overall(m, "windows")?.max(1.0));
    println!("| method | measured decode tok/s | predicted tok/s | error |\n|---|---|---|---|");
    let row = |name: &str, measured: Option<f64>, predicted: f64| match measured {
        Some(m) => println!(
            "| {name} | {m:.2} | {predicted:.2} | {:+.0}% |",
            100.0 * (predicted - m) / m
        ),
        None => println!("| {name} | - | {predicted:.2} | |"),
    };
    let base = Scenario {
        target: target_cost,
        draft: draft_cost,
        gamma,
        kappa,
        eta: 1.0,
        mean_accepted: mean_accepted("sd").unwrap_or(0.0),
        exit_fraction,
        rendezvous: 0.0,
        fallback_frequency: 1.0,
        schedule: TreeSchedule::Anytime { rows_per_pass: 1 },
        shared_device: true,
    };
    // Tokens per draft step, as measured (1 for a plain draft).
    let eta = |m: &str| {
        let steps = overall(m, "draft_steps").unwrap_or(0.0);
        let tokens = overall(m, "draft_tokens").unwrap_or(0.0);
        if steps > 0.0 {
            tokens / steps
        } else {
            1.0
        }
    };
    let p = base.predict();
    row("ar", measured("ar"), p.autoregressive);
    row("sd", measured("sd"), p.speculative);
    if results.get("sd+ss").is_some() {
        let s = Scenario {
            eta: eta("sd+ss"),
            mean_accepted: mean_accepted("sd+ss").unwrap_or(0.0),
            ..base
        };
        row(
            &format!("sd+ss (eta {:.2})", s.eta),
            measured("sd+ss"),
            s.predict().speculative,
        );
    }
    for (m, schedule) in [
        ("mirror", TreeSchedule::Anytime { rows_per_pass: 2 }),
        ("mirror-full", TreeSchedule::FullGrid),
        ("mirror+ss", TreeSchedule::Anytime { rows_per_pass: 2 }),
        ("mirror-full+ss", TreeSchedule::FullGrid),
    ] {
        if results.get(m).is_none() {
            continue;
        }
        let reuse =
            overall(m, "reuse").unwrap_or(0.0) / overall(m, "resolved").unwrap_or(1.0).max(1.0);
        let s = Scenario {
            schedule,
            fallback_frequency: 1.0 - reuse,
            mean_accepted: mean_accepted(m).unwrap_or(0.0),
            eta: eta(m),
            ..base
        };
        row(
            &format!("{m} (shared cores)"),
            measured(m),
            s.predict().mirror,
        );
        let separate = Scenario {
            shared_device: false,
            ..s
        };
        row(
            &format!("{m} (draft on its own device, projected)"),
            None,
            separate.predict().mirror,
        );
    }
    Ok(())
}

fn project() {
    // The paper's hardware: M2 Ultra GPUs for the target (8-way tensor parallel, two all-reduces
    // per block) and Neural Engines for the draft. Figures are public peak specs derated to
    // typical achieved rates; they set the scale, not exact speeds.
    let gpus = DeviceProfile {
        bandwidth: 8.0 * 800e9 * 0.6,
        flops: 8.0 * 27e12 * 0.4,
        sync_latency: 25e-6,
        syncs_per_layer: 2.0,
    };
    let npu = DeviceProfile {
        bandwidth: 8.0 * 800e9 * 0.3,
        flops: 8.0 * 15e12 * 0.4,
        sync_latency: 25e-6,
        syncs_per_layer: 2.0 / 16.0,
    };
    let draft = ModelShape {
        params: 0.6e9,
        layers: 16,
        bytes_per_param: 2.0,
    };
    let targets = [
        (
            "Qwen3-14B",
            ModelShape {
                params: 14e9,
                layers: 40,
                bytes_per_param: 2.0,
            },
        ),
        (
            "Qwen3-32B",
            ModelShape {
                params: 32e9,
                layers: 64,
                bytes_per_param: 2.0,
            },
        ),
        (
            "OPT-66B",
            ModelShape {
                params: 66e9,
                layers: 64,
                bytes_per_param: 2.0,
            },
        ),
    ];
    println!("Projected speedup over the target alone (batch 1, gamma 7, exit N/2, SS draft eta 2, E[A] 4.5).");
    println!("FF is taken as 1 - Omega with Omega = 0.9, 0.8, 0.7, 0.6 for kappa = 8, 4, 2, 1.");
    println!("\n| target | kappa | vanilla SD | Mirror (anytime) | Mirror (full grid) | draft hidden (full grid) |\n|---|---|---|---|---|---|");
    for (name, shape) in targets {
        for (kappa, omega) in [(1usize, 0.6), (2, 0.7), (4, 0.8), (8, 0.9)] {
            let base = Scenario {
                target: shape.forward_cost(&gpus),
                draft: draft.forward_cost(&npu),
                gamma: 7,
                kappa,
                eta: 2.0,
                mean_accepted: 4.5,
                exit_fraction: 0.5,
                rendezvous: 100e-6,
                fallback_frequency: 1.0 - omega,
                schedule: TreeSchedule::Anytime { rows_per_pass: 8 },
                shared_device: false,
            };
            let anytime = base.predict();
            let full = Scenario {
                schedule: TreeSchedule::FullGrid,
                ..base
            }
            .predict();
            let (critical, exposed, hidden) = full.mirror_window;
            println!(
                "| {name} | {kappa} | {:.2}x | {:.2}x | {:.2}x | {:.0}% of the window |",
                anytime.speculative / anytime.autoregressive,
                anytime.mirror / anytime.autoregressive,
                full.mirror / full.autoregressive,
                100.0 * hidden / (critical + exposed),
            );
        }
    }
    println!("\nBatching: the paper cuts kappa 8 -> 4 -> 2 -> 1 as batch grows 8 -> 64; the rows above show the");
    println!(
        "same direction: Mirror's margin over vanilla SD narrows as kappa and FF change together."
    );
}

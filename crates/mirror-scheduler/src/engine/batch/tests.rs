//! The batched core's unit tests.
use std::sync::mpsc;

use mirror_core::{load_model_dir, DirFiles, LoadOptions};

use super::*;
use crate::generation::{Generation, GenerationConfig, StreamControl, TokenLogprob};
use crate::run::capacity_for;
use crate::strategy::autoregressive::Autoregressive;
use crate::strategy::Decoder;

/// The repository's tiny Qwen2 fixture (random weights, 6 layers).
fn fixture() -> Arc<Model> {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/hf/qwen2");
    let files = DirFiles::local(&dir).expect("fixture files");
    Arc::new(load_model_dir(&files, &LoadOptions::default()).expect("fixture model"))
}

/// A sink that records what it is told, and panics on its `panic_at`-th batch of tokens.
struct TestSink {
    panic_at: Option<usize>,
    batches: usize,
    done: mpsc::Sender<Result<Generation>>,
}

impl Sink for TestSink {
    fn tokens(&mut self, _tokens: &[u32], _logprobs: &[TokenLogprob]) -> StreamControl {
        self.batches += 1;
        if self.panic_at == Some(self.batches) {
            panic!("a consumer's callback panicked");
        }
        StreamControl::Continue
    }

    fn cancelled(&self) -> bool {
        false
    }

    fn finish(self: Box<Self>, result: Result<Generation>) {
        let _ = self.done.send(result);
    }
}

/// Queues `request` on `core` with a [`TestSink`]; its result arrives on the receiver.
fn submit(
    core: &mut BatchCore,
    request: SequenceRequest,
    panic_at: Option<usize>,
) -> mpsc::Receiver<Result<Generation>> {
    let (done, received) = mpsc::channel();
    core.submit(Waiting {
        request,
        sink: Box::new(TestSink {
            panic_at,
            batches: 0,
            done,
        }),
        submitted: Instant::now(),
        forks: Vec::new(),
        constraint: None,
        boundaries: None,
    });
    received
}

#[test]
fn a_panicking_consumer_fails_its_sequence_alone() {
    let target = fixture();
    let mut core = BatchCore::new(Arc::clone(&target), None, BatchSettings::default()).unwrap();
    let prompt = vec![3u32, 14, 15, 92, 6];
    let config = GenerationConfig {
        stop_at_eos: false,
        ..GenerationConfig::greedy(12)
    };
    let mut receivers = Vec::new();
    for panic_at in [Some(3), None, None] {
        let request = SequenceRequest::new(prompt.clone(), config.clone());
        receivers.push(submit(&mut core, request, panic_at));
    }
    let mut steps = 0;
    while !core.is_idle() && steps < 100 {
        core.step();
        steps += 1;
    }
    assert!(core.is_idle(), "the batch did not drain in {steps} steps");
    let expected = Autoregressive::new(Arc::clone(&target))
        .generate(&prompt, &config)
        .unwrap()
        .tokens;
    let results: Vec<Result<Generation>> = receivers.iter().map(|r| r.recv().unwrap()).collect();
    assert!(
        matches!(&results[0], Err(Error::GenerationPanicked(message)) if message.contains("callback panicked")),
        "{:?}",
        results[0].as_ref().map(|g| &g.tokens)
    );
    for result in &results[1..] {
        assert_eq!(result.as_ref().unwrap().tokens, expected);
    }
    // Every cache is back in the pool or kept by the prefix cache, none leaked.
    let load = core.load();
    assert_eq!(load.pool_used, load.prefix_bytes);
}

/// Runs `request` alone on `core` to the end; returns its generation.
fn run_to_end(core: &mut BatchCore, request: SequenceRequest) -> Generation {
    let received = submit(core, request, None);
    for _ in 0..200 {
        if core.is_idle() {
            break;
        }
        core.step();
    }
    received.recv().unwrap().unwrap()
}

#[test]
fn two_prompts_sharing_a_long_prefix_store_it_once() {
    let target = fixture();
    let mut core = BatchCore::new(Arc::clone(&target), None, BatchSettings::default()).unwrap();
    let shared: Vec<u32> = (0..48).map(|i| (i * 7 + 3) % 50).collect();
    let config = GenerationConfig {
        stop_at_eos: false,
        ..GenerationConfig::greedy(4)
    };
    let mut rows = Vec::new();
    for (i, tail) in [[61u32, 62], [71, 72]].iter().enumerate() {
        let prompt = [shared.as_slice(), tail].concat();
        let request = SequenceRequest::new(prompt.clone(), config.clone());
        let generation = run_to_end(&mut core, request);
        let alone = Autoregressive::new(Arc::clone(&target))
            .generate(&prompt, &config)
            .unwrap();
        assert_eq!(generation.tokens, alone.tokens, "prompt {i}");
        // The second prompt finds the shared prefix (and no more: its tail differs).
        assert_eq!(generation.stats.prefix_cached_tokens, [0, 48][i]);
        // The finished cache holds the prompt and the output but its last token (never fed).
        rows.push(prompt.len() + generation.tokens.len() - 1);
    }
    let load = core.load();
    let row_bytes = cache_bytes(&target, 1);
    // The shared 48 rows once, and each sequence's own rows after them: one node each, under
    // the shared node split off the first sequence's edge.
    let distinct = rows[0] + rows[1] - shared.len();
    assert_eq!(load.prefix_bytes, distinct as u64 * row_bytes);
    assert!(load.prefix_bytes < cache_bytes(&target, rows[0]) + cache_bytes(&target, rows[1]));
    assert_eq!(load.prefix_entries, 3);
    assert_eq!(load.pool_used, load.prefix_bytes);
}

#[test]
fn leaves_evicted_while_the_batch_runs_change_no_output() {
    let target = fixture();
    let config = GenerationConfig {
        stop_at_eos: false,
        ..GenerationConfig::greedy(6)
    };
    // One stem, each prompt its first 20, 8 or 14 tokens and a tail of its own: the tree
    // shares the stem and splits inside it, and later prompts copy both halves of a split edge.
    let prompts: Vec<Vec<u32>> = (0..12u32)
        .map(|i| {
            let stem = (0..[20, 8, 14][i as usize % 3]).map(|t| (t * 13 + 7) % 300);
            stem.chain([200 + i, 250 + i]).collect()
        })
        .collect();
    let capacity = prompts
        .iter()
        .map(|p| capacity_for(&target, p, &config, 0).unwrap())
        .max()
        .unwrap_or(0);
    // Two running at once, in room for three caches: each admission takes kept rows back, the
    // coldest leaves first, while the other sequence runs.
    let settings = BatchSettings {
        max_batch: 2,
        kv_budget_bytes: 3 * cache_bytes(&target, capacity),
        prefill_chunk: 5,
        ..BatchSettings::default()
    };
    let mut core = BatchCore::new(Arc::clone(&target), None, settings).unwrap();
    let mut receivers = Vec::new();
    for prompt in &prompts {
        let request = SequenceRequest::new(prompt.clone(), config.clone());
        receivers.push(submit(&mut core, request, None));
    }
    let (mut evicted_mid_batch, mut reused) = (0, 0);
    for _ in 0..500 {
        if core.is_idle() {
            break;
        }
        let nodes = core.prefix.len();
        core.step();
        if core.prefix.len() < nodes && !core.running.is_empty() {
            evicted_mid_batch += 1;
        }
        reused += core
            .running
            .iter()
            .map(|s| s.stats.prefix_cached_tokens)
            .sum::<usize>();
    }
    assert!(core.is_idle());
    assert!(
        evicted_mid_batch > 0,
        "no leaf was evicted while sequences ran"
    );
    assert!(reused > 0, "no prompt took rows from the cache");
    for (prompt, received) in prompts.iter().zip(&receivers) {
        let alone = Autoregressive::new(Arc::clone(&target))
            .generate(prompt, &config)
            .unwrap();
        assert_eq!(
            received.recv().unwrap().unwrap().tokens,
            alone.tokens,
            "{prompt:?}"
        );
    }
    let load = core.load();
    assert_eq!(load.pool_used, load.prefix_bytes);
}

/// With draft forwards so dear against the target's steps that no acceptance could make
/// drafting pay, SD sequences put off their prompts' draft prefill: they decode holding no draft
/// rows, and greedy output stays the target's own. Unmeasured costs (the planner cannot price
/// yet) prefill the draft as before, so the check can fail. When drafting resumes (the dear
/// line forgotten mid-run), the drafts catch up in 3-token chunks and output stays the same.
#[test]
fn where_drafting_cannot_pay_the_drafts_prefill_waits_and_outputs_stay_the_targets() {
    let target = fixture();
    let config = GenerationConfig {
        stop_at_eos: false,
        ..GenerationConfig::greedy(10)
    };
    let prompts = [
        vec![3u32, 14, 15, 92, 6, 5, 35],
        vec![2u32, 7, 18, 28],
        vec![9u32, 9, 8, 7, 6, 5, 4, 3],
    ];
    for (dear, resumes) in [(true, false), (false, false), (true, true)] {
        let draft = Some(Arc::clone(&target));
        let settings = BatchSettings {
            prefill_chunk: 3,
            ..BatchSettings::default()
        };
        let mut core = BatchCore::new(Arc::clone(&target), draft, settings).unwrap();
        if dear {
            for rows in [1usize, 4, 8, 16] {
                let target_step = std::time::Duration::from_micros(1000 + rows as u64);
                core.step_cost.record(rows, target_step);
                core.draft_cost
                    .record(rows, std::time::Duration::from_secs(1));
            }
        }
        let receivers: Vec<_> = prompts
            .iter()
            .map(|prompt| {
                let request = SequenceRequest {
                    speculation: Speculation::Draft {
                        gamma: 4,
                        greedy_draft: false,
                    },
                    ..SequenceRequest::new(prompt.clone(), config.clone())
                };
                submit(&mut core, request, None)
            })
            .collect();
        let mut draft_rows_while_decoding = Vec::new();
        for step in 0..200 {
            if core.is_idle() {
                break;
            }
            if resumes && step == 8 {
                core.draft_cost = StepCost::default();
                draft_rows_while_decoding.clear();
            }
            core.step();
            for sequence in core.running.iter().filter(|s| s.is_decoding()) {
                let rows = sequence.draft.as_ref().map_or(0, |d| d.tokens.len());
                draft_rows_while_decoding.push(rows);
            }
        }
        assert!(core.is_idle());
        for (prompt, received) in prompts.iter().zip(&receivers) {
            let expected = Autoregressive::new(Arc::clone(&target))
                .generate(prompt, &config)
                .unwrap()
                .tokens;
            assert_eq!(
                received.recv().unwrap().unwrap().tokens,
                expected,
                "dear {dear}"
            );
        }
        assert!(!draft_rows_while_decoding.is_empty());
        if dear && !resumes {
            assert!(draft_rows_while_decoding.iter().all(|&rows| rows == 0));
        } else {
            assert!(draft_rows_while_decoding.iter().any(|&rows| rows > 0));
        }
    }
}

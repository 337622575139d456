//! The batched engine against the one-sequence strategies, on SmolLM2: every sequence of a
//! batch (1 to 16 mixed prompts, joining and leaving mid-batch, plain, lookup and draft-model
//! speculation, the draft being SmolLM2's own first 26 layers) must equal, bit for bit, what the
//! same sequence gives alone through `Autoregressive`, `SpeculativeDecoding::prompt_lookup` or
//! `SpeculativeDecoding` (fixed windows), greedy and seeded-sampled; cancelled and
//! expired sequences leave without disturbing the others; a KV budget too small for a sequence is
//! a clear error, one that holds a single sequence makes admission wait.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use mirror_core::sampling::SamplingParams;
use mirror_core::{load, LoadOptions, Model, ModelSource, Tokenizer};
use mirror_sd::mirror_scheduler::{
    Autoregressive, BatchSettings, Decoder, DraftSchedule, EngineHandle, Error, Event,
    FinishReason, GenerationConfig, LookupConfig, SequenceRequest, Speculation,
    SpeculativeDecoding, WindowPolicy,
};

const PROMPTS: [&str; 8] = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village,",
    "List the planets of the solar system: Mercury, Venus,",
    "Translate to French: I like apples. I like apples very much.",
    "1, 2, 3, 4, 5, 6, 7,",
    "Summarize: The quick brown fox jumps over the lazy dog. The quick brown fox",
    "Q: What is 12 times 12?\nA:",
];

fn smollm2() -> Option<(Arc<Model>, Tokenizer)> {
    let path = common::smollm2_path()?;
    let loaded = load(&ModelSource::Gguf(path), &LoadOptions::default()).expect("load SmolLM2");
    Some((Arc::new(loaded.model), loaded.tokenizer))
}

fn lookup() -> Speculation {
    Speculation::Lookup {
        lookup: LookupConfig::default(),
        gamma: 4,
    }
}

/// Windows drafted by the engine's draft model.
fn drafted() -> Speculation {
    Speculation::Draft {
        gamma: 4,
        greedy_draft: false,
    }
}

/// The self-speculative draft: the target's first 26 of 30 layers (the same weights every
/// call), which the target agrees with often enough that whole windows are accepted too.
fn draft_of(target: &Model) -> Arc<Model> {
    Arc::new(target.truncated(26).expect("self-draft"))
}

/// Mirror windows, drafted by each sequence's worker over the engine's draft model.
fn mirrored() -> Speculation {
    Speculation::Mirror { gamma: 4 }
}

/// An engine with the self-speculative draft.
fn engine_with_draft(target: &Arc<Model>, settings: BatchSettings) -> EngineHandle {
    EngineHandle::spawn_with_draft(Arc::clone(target), draft_of(target), None, settings).unwrap()
}

fn sampled(seed: u64) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens: 20,
        sampling: SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
        },
        seed,
        ..GenerationConfig::default()
    }
}

/// The independent reference: the same sequence alone, through the one-sequence strategies.
fn alone(target: &Arc<Model>, request: &SequenceRequest) -> Vec<u32> {
    let mut decoder: Box<dyn Decoder> = match request.speculation {
        Speculation::None => Box::new(Autoregressive::new(Arc::clone(target))),
        Speculation::Lookup { lookup, gamma } => Box::new(
            SpeculativeDecoding::prompt_lookup(Arc::clone(target))
                .prompt_lookup(lookup)
                .gamma(gamma)
                .window(WindowPolicy::Fixed)
                .build()
                .unwrap(),
        ),
        Speculation::Draft {
            gamma,
            greedy_draft,
        } => Box::new(
            SpeculativeDecoding::builder(Arc::clone(target), draft_of(target))
                .gamma(gamma)
                .greedy_draft(greedy_draft)
                .window(WindowPolicy::Fixed)
                .build()
                .unwrap(),
        ),
        // Greedy Mirror output is the target's alone (its sampled output is checked for its
        // distribution in `tests/sampling.rs`).
        Speculation::Mirror { .. } => Box::new(Autoregressive::new(Arc::clone(target))),
    };
    decoder
        .generate(&request.prompt, &request.config)
        .unwrap()
        .tokens
}

/// Submits every request at once and checks each output against `expected` (itself alone).
fn assert_all_alone(
    engine: &EngineHandle,
    requests: &[SequenceRequest],
    expected: &[Vec<u32>],
    what: &str,
) {
    let streams: Vec<_> = requests
        .iter()
        .map(|r| engine.submit(r.clone()).unwrap())
        .collect();
    for (i, stream) in streams.into_iter().enumerate() {
        assert_eq!(
            stream.wait().unwrap().tokens,
            expected[i],
            "{what}, sequence {i}"
        );
    }
}

/// Sixteen requests: every prompt twice, plain, lookup and drafted, greedy and sampled, of
/// several lengths.
fn requests(tokenizer: &Tokenizer) -> Vec<SequenceRequest> {
    (0..16)
        .map(|i| {
            let prompt = tokenizer.encode(PROMPTS[i % 8], true).unwrap();
            let config = if i % 3 == 0 {
                sampled(1000 + i as u64)
            } else {
                GenerationConfig::greedy(12 + i)
            };
            SequenceRequest {
                speculation: match i % 4 {
                    0 => Speculation::None,
                    2 => drafted(),
                    _ => lookup(),
                },
                ..SequenceRequest::new(prompt, config)
            }
        })
        .collect()
}

#[test]
fn mirror_sequences_in_a_batch_equal_the_target_alone() {
    // Five Mirror sequences of different prompt lengths beside plain, lookup and drafted ones,
    // greedy: each equals its autoregressive output alone, at batch 1, 3 (joining and leaving
    // mid-batch, anytime drafting) and 8 (full-grid drafting), with kappa lowered as the batch
    // grows.
    let Some((target, tokenizer)) = smollm2() else {
        return;
    };
    let requests: Vec<SequenceRequest> = (0..8)
        .map(|i| SequenceRequest {
            speculation: match i {
                1 => Speculation::None,
                4 => lookup(),
                6 => drafted(),
                _ => mirrored(),
            },
            ..SequenceRequest::new(
                tokenizer.encode(PROMPTS[i], true).unwrap(),
                GenerationConfig::greedy(10 + 2 * i),
            )
        })
        .collect();
    let expected: Vec<Vec<u32>> = requests.iter().map(|r| alone(&target, r)).collect();
    for batch in [1, 3, 8] {
        let mut settings = BatchSettings {
            max_batch: batch,
            ..BatchSettings::default()
        };
        settings.mirror.batch_candidates = 16;
        // The full grid makes reuse certain; anytime drafting (batch 3) stops at the target's
        // pace, which the machine decides.
        let full = batch != 3;
        if full {
            settings.mirror.schedule = DraftSchedule::FullGrid;
        }
        let engine = engine_with_draft(&target, settings);
        let streams: Vec<_> = (requests.iter())
            .map(|r| engine.submit(r.clone()).unwrap())
            .collect();
        let mut hits = 0;
        for (i, stream) in streams.into_iter().enumerate() {
            let out = stream.wait().unwrap();
            assert_eq!(out.tokens, expected[i], "batch {batch}, sequence {i}");
            if requests[i].speculation == mirrored() {
                assert!(
                    out.stats.branches_planned > 0,
                    "sequence {i} planned no tree"
                );
                hits += out.stats.reuse_hits + out.stats.reuse_partials;
            }
        }
        assert!(
            !full || hits > 0,
            "batch {batch}: no window came from a tree"
        );
    }
}

#[test]
fn every_sequence_of_a_batch_equals_itself_alone() {
    let Some((target, tokenizer)) = smollm2() else {
        return;
    };
    let requests = requests(&tokenizer);
    let expected: Vec<Vec<u32>> = requests.iter().map(|r| alone(&target, r)).collect();
    for batch in [1, 4, 16] {
        let settings = BatchSettings {
            // Sampled lookup sequences reproduce themselves alone under fixed windows.
            window: WindowPolicy::Fixed,
            max_batch: batch,
            // Small chunks and budgets: prompts are prefilled over several steps, beside others'
            // decode rows and windows.
            prefill_chunk: 5,
            step_tokens: 24,
            ..BatchSettings::default()
        };
        let engine = engine_with_draft(&target, settings);
        // Half join at once, the rest while the first ones run.
        let mut streams: Vec<_> = requests[..8]
            .iter()
            .map(|r| engine.submit(r.clone()).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        streams.extend(
            requests[8..]
                .iter()
                .map(|r| engine.submit(r.clone()).unwrap()),
        );
        for (i, stream) in streams.into_iter().enumerate() {
            let got = stream.wait().unwrap();
            assert_eq!(
                got.tokens, expected[i],
                "batch {batch}, sequence {i} ({:?}) differs from itself alone",
                requests[i].speculation
            );
        }
    }
}

/// With keys and values cached as f16 (half the pool's bytes a row), every sequence of a batch
/// still equals itself alone on that model, bit for bit; and the rounding is small enough that
/// greedy decoding mostly keeps the f32 cache's tokens (a wrong conversion would keep none).
#[test]
fn an_f16_kv_cache_keeps_every_sequence_equal_to_itself_alone() {
    let Some((target32, tokenizer)) = smollm2() else {
        return;
    };
    let Some(path) = common::smollm2_path() else {
        return;
    };
    let options = LoadOptions {
        kv_dtype: Some(mirror_core::DType::F16),
        ..LoadOptions::default()
    };
    let target = Arc::new(load(&ModelSource::Gguf(path), &options).unwrap().model);
    assert_eq!(2 * row_bytes(&target), row_bytes(&target32));
    let requests: Vec<SequenceRequest> = requests(&tokenizer).into_iter().take(8).collect();
    let expected: Vec<Vec<u32>> = requests.iter().map(|r| alone(&target, r)).collect();
    let settings = BatchSettings {
        window: WindowPolicy::Fixed,
        max_batch: 8,
        prefill_chunk: 5,
        step_tokens: 24,
        ..BatchSettings::default()
    };
    let engine = engine_with_draft(&target, settings);
    assert_all_alone(&engine, &requests, &expected, "f16 cache");
    // The pool charges f16 rows: what the prefix cache keeps fits in every sequence's prompt,
    // output and one window at f16 row bytes, which rows charged as f32 (twice as many bytes
    // for the same rows) would not.
    let both_rows = row_bytes(&target) + row_bytes(&draft_of(&target));
    let whole: u64 = requests
        .iter()
        .zip(&expected)
        .map(|(r, tokens)| (r.prompt.len() + tokens.len() + 4) as u64 * both_rows)
        .sum();
    let load = settled_load(&engine);
    assert!(
        load.prefix_bytes > 0 && load.prefix_bytes <= whole,
        "{} bytes kept, at most {whole} at f16",
        load.prefix_bytes
    );
    let mut same = 0;
    for prompt in PROMPTS {
        let prompt = tokenizer.encode(prompt, true).unwrap();
        let config = GenerationConfig::greedy(12);
        let run = |model: &Arc<Model>| {
            Autoregressive::new(Arc::clone(model))
                .generate(&prompt, &config)
                .unwrap()
                .tokens
        };
        same += usize::from(run(&target) == run(&target32));
    }
    assert!(
        same >= 5,
        "only {same} of 8 greedy outputs kept the f32 cache's tokens"
    );
}

#[test]
fn greedy_sequences_equal_themselves_alone_under_adaptive_windows() {
    let Some((target, tokenizer)) = smollm2() else {
        return;
    };
    let requests: Vec<SequenceRequest> = requests(&tokenizer)
        .into_iter()
        .map(|mut r| {
            r.config.sampling = SamplingParams::greedy();
            r
        })
        .collect();
    let expected: Vec<Vec<u32>> = requests
        .iter()
        .map(|r| {
            alone(
                &target,
                &SequenceRequest::new(r.prompt.clone(), r.config.clone()),
            )
        })
        .collect();
    let engine = engine_with_draft(&target, BatchSettings::default());
    for round in 0..2 {
        // The second round runs with step costs and acceptance rates measured: windows are cut.
        assert_all_alone(&engine, &requests, &expected, &format!("round {round}"));
    }
}

#[test]
fn streamed_events_carry_the_tokens_and_text_of_the_generation() {
    let Some((target, tokenizer)) = smollm2() else {
        return;
    };
    let engine = EngineHandle::spawn(
        Arc::clone(&target),
        Some(tokenizer.clone()),
        BatchSettings::default(),
    )
    .unwrap();
    let prompt = tokenizer.encode(PROMPTS[0], true).unwrap();
    let stream = engine
        .submit(SequenceRequest::new(
            prompt.clone(),
            GenerationConfig::greedy(10),
        ))
        .unwrap();
    let (mut tokens, mut text, mut finished) = (Vec::new(), String::new(), None);
    for event in stream {
        match event {
            Event::Text {
                tokens: t, text: s, ..
            } => {
                tokens.extend(t);
                text.push_str(&s);
            }
            Event::Finished(result) => finished = Some(result.unwrap()),
        }
    }
    let generation = finished.expect("a Finished event");
    assert_eq!(tokens, generation.tokens);
    let whole = tokenizer.decode(&generation.tokens, true).unwrap();
    assert_eq!(generation.text.as_deref(), Some(whole.as_str()));
    assert!(
        whole.starts_with(&text),
        "{text:?} is not a prefix of {whole:?}"
    );
    let request = SequenceRequest::new(prompt, GenerationConfig::greedy(10));
    assert_eq!(generation.tokens, alone(&target, &request));
}

#[test]
fn cancelled_and_expired_sequences_leave_and_the_others_are_unaffected() {
    let Some((target, tokenizer)) = smollm2() else {
        return;
    };
    let engine = EngineHandle::spawn(Arc::clone(&target), None, BatchSettings::default()).unwrap();
    let prompt = |i: usize| tokenizer.encode(PROMPTS[i], true).unwrap();
    let keep = SequenceRequest::new(prompt(1), GenerationConfig::greedy(24));
    let expected = alone(&target, &keep);
    let kept = engine.submit(keep).unwrap();
    // Dropped after its first tokens: cancelled at the next step.
    let mut cancelled = engine
        .submit(SequenceRequest::new(
            prompt(2),
            GenerationConfig::greedy(200),
        ))
        .unwrap();
    assert!(matches!(cancelled.next(), Some(Event::Text { .. })));
    drop(cancelled);
    // A deadline already near: it ends with what it has.
    let expiring = engine
        .submit(SequenceRequest {
            deadline: Some(Instant::now() + Duration::from_millis(1)),
            ..SequenceRequest::new(prompt(3), GenerationConfig::greedy(200))
        })
        .unwrap();
    let expired = expiring.wait().unwrap();
    assert_eq!(expired.finish_reason, FinishReason::Deadline);
    assert!(expired.tokens.len() < 200);
    assert_eq!(kept.wait().unwrap().tokens, expected);
    // The engine drained: nothing is left running.
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine.load().running > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(engine.load().running, 0);
}

#[test]
fn a_tiny_kv_budget_is_a_clear_error_and_a_small_one_makes_admission_wait() {
    let Some((target, tokenizer)) = smollm2() else {
        return;
    };
    let prompt = tokenizer.encode(PROMPTS[0], true).unwrap();
    let request = SequenceRequest::new(prompt.clone(), GenerationConfig::greedy(8));
    let capacity = prompt.len() + 8 + 2;
    let config = target.config();
    // Keys and values of every layer, f32.
    let one_cache =
        (target.num_layers() * 2 * config.num_kv_heads() * config.head_dim() * 4 * capacity) as u64;
    let tiny = BatchSettings {
        kv_budget_bytes: one_cache - 1,
        ..BatchSettings::default()
    };
    let engine = EngineHandle::spawn(Arc::clone(&target), None, tiny).unwrap();
    match engine.generate(request.clone()) {
        Err(Error::MemoryBudget { needed, budget }) => {
            assert_eq!(needed, one_cache);
            assert_eq!(budget, one_cache - 1);
        }
        other => panic!("expected MemoryBudget, got {:?}", other.map(|g| g.tokens)),
    }
    // Room for one cache at a time: four sequences run one after another, all complete.
    let one = BatchSettings {
        kv_budget_bytes: one_cache + one_cache / 2,
        ..BatchSettings::default()
    };
    let engine = EngineHandle::spawn(Arc::clone(&target), None, one).unwrap();
    let expected = alone(&target, &request);
    let streams: Vec<_> = (0..4)
        .map(|_| engine.submit(request.clone()).unwrap())
        .collect();
    let mut most_running = 0;
    for stream in streams {
        most_running = most_running.max(engine.load().running);
        assert_eq!(stream.wait().unwrap().tokens, expected);
    }
    assert!(most_running <= 1, "{most_running} sequences ran at once");
}

#[test]
fn bad_requests_fail_alone() {
    let Some((target, tokenizer)) = smollm2() else {
        return;
    };
    let engine = EngineHandle::spawn(Arc::clone(&target), None, BatchSettings::default()).unwrap();
    let good = SequenceRequest::new(
        tokenizer.encode(PROMPTS[0], true).unwrap(),
        GenerationConfig::greedy(6),
    );
    let empty = engine
        .submit(SequenceRequest::new(
            Vec::new(),
            GenerationConfig::greedy(6),
        ))
        .unwrap();
    let out_of_range = engine
        .submit(SequenceRequest::new(
            vec![u32::MAX],
            GenerationConfig::greedy(6),
        ))
        .unwrap();
    // Draft-model speculation on an engine without a draft model.
    let no_draft = engine
        .submit(SequenceRequest {
            speculation: drafted(),
            ..good.clone()
        })
        .unwrap();
    let kept = engine.submit(good.clone()).unwrap();
    assert!(matches!(no_draft.wait(), Err(Error::InvalidConfig(_))));
    assert!(matches!(empty.wait(), Err(Error::InvalidPrompt(_))));
    assert!(matches!(out_of_range.wait(), Err(Error::Core(_))));
    assert_eq!(kept.wait().unwrap().tokens, alone(&target, &good));
    assert!(EngineHandle::spawn(
        Arc::clone(&target),
        None,
        BatchSettings {
            max_batch: 0,
            ..BatchSettings::default()
        }
    )
    .is_err());
}

#[test]
fn forked_sequences_each_equal_an_unforked_run_with_their_seed() {
    let Some((target, tokenizer)) = smollm2() else {
        return;
    };
    let engine = engine_with_draft(
        &target,
        BatchSettings {
            prefill_chunk: 4,
            window: WindowPolicy::Fixed,
            ..BatchSettings::default()
        },
    );
    let prompt = tokenizer.encode(PROMPTS[2], true).unwrap();
    for speculation in [Speculation::None, lookup(), drafted()] {
        let request = SequenceRequest {
            speculation,
            ..SequenceRequest::new(prompt.clone(), sampled(77))
        };
        let streams = engine.submit_forked(request.clone(), 3).unwrap();
        let outputs: Vec<Vec<u32>> = streams
            .into_iter()
            .map(|s| s.wait().unwrap().tokens)
            .collect();
        for (i, got) in outputs.iter().enumerate() {
            let mut alone_request = request.clone();
            alone_request.config.seed = 77 + i as u64;
            assert_eq!(
                *got,
                alone(&target, &alone_request),
                "fork {i} ({speculation:?}) differs from an unforked run with seed {}",
                77 + i
            );
        }
        assert!(
            outputs[0] != outputs[1] || outputs[1] != outputs[2],
            "three seeds gave one output: the forks did not get their own seeds"
        );
    }
    // The first sequence cancelled during the shared prefill: the fork carries it on.
    let long_prompt = tokenizer.encode(&PROMPTS.concat(), true).unwrap();
    let request = SequenceRequest::new(long_prompt, sampled(9));
    let mut streams = engine.submit_forked(request.clone(), 2).unwrap();
    let fork = streams.pop().unwrap();
    drop(streams);
    let mut alone_request = request;
    alone_request.config.seed = 10;
    assert_eq!(fork.wait().unwrap().tokens, alone(&target, &alone_request));
}

/// Runs `requests` one after another on `engine`; returns each generation.
fn in_turn(
    engine: &EngineHandle,
    requests: &[SequenceRequest],
) -> Vec<mirror_sd::mirror_scheduler::Generation> {
    requests
        .iter()
        .map(|r| engine.generate(r.clone()).unwrap())
        .collect()
}

#[test]
fn the_prefix_cache_reuses_earlier_prompts_and_changes_no_bit() {
    let Some((target, tokenizer)) = smollm2() else {
        return;
    };
    let first = tokenizer.encode(PROMPTS[6], true).unwrap();
    let first_request = SequenceRequest::new(first.clone(), GenerationConfig::greedy(10));
    let first_output = alone(&target, &first_request);
    // The next turn: the first prompt, its answer, then more text.
    let mut follow_up = first.clone();
    follow_up.extend_from_slice(&first_output);
    follow_up.extend(tokenizer.encode(" And then?", false).unwrap());
    // A prompt that diverges inside the first one.
    let mut diverging = first[..first.len() / 2].to_vec();
    diverging.extend(
        tokenizer
            .encode(" a completely different ending", false)
            .unwrap(),
    );
    let requests = [
        first_request,
        SequenceRequest::new(follow_up.clone(), GenerationConfig::greedy(10)),
        SequenceRequest {
            speculation: lookup(),
            ..SequenceRequest::new(diverging.clone(), sampled(5))
        },
        // The same prompt again: all of it but its last token is cached.
        SequenceRequest::new(follow_up.clone(), GenerationConfig::greedy(10)),
        // Drafted, sampled: the draft's cache is kept and reused too.
        SequenceRequest {
            speculation: drafted(),
            ..SequenceRequest::new(follow_up.clone(), sampled(6))
        },
        SequenceRequest {
            speculation: drafted(),
            ..SequenceRequest::new(follow_up.clone(), sampled(6))
        },
    ];
    let expected: Vec<Vec<u32>> = requests.iter().map(|r| alone(&target, r)).collect();
    let fixed = BatchSettings {
        window: WindowPolicy::Fixed,
        ..BatchSettings::default()
    };
    let on = engine_with_draft(&target, fixed);
    let off = engine_with_draft(
        &target,
        BatchSettings {
            prefix_cache: false,
            ..fixed
        },
    );
    let with_cache = in_turn(&on, &requests);
    let without = in_turn(&off, &requests);
    for (i, want) in expected.iter().enumerate() {
        assert_eq!(&with_cache[i].tokens, want, "request {i}, cache on");
        assert_eq!(&without[i].tokens, want, "request {i}, cache off");
        assert_eq!(without[i].stats.prefix_cached_tokens, 0);
    }
    let reused: Vec<usize> = with_cache
        .iter()
        .map(|g| g.stats.prefix_cached_tokens)
        .collect();
    // The follow-up finds the first turn's prompt and answer (but the answer's last token, which
    // the first sequence never fed); the diverging prompt its common half; the repeat all but
    // its last token.
    assert_eq!(reused[0], 0);
    assert_eq!(
        reused[1],
        first.len() + first_output.len() - 1,
        "{reused:?}"
    );
    assert_eq!(reused[2], first.len() / 2, "{reused:?}");
    assert_eq!(reused[3], follow_up.len() - 1, "{reused:?}");
    assert_eq!(reused[5], follow_up.len() - 1, "{reused:?}");
    assert_eq!(with_cache[5].tokens, with_cache[4].tokens);
}

#[test]
fn prefix_entries_evicted_while_a_batch_runs_change_no_output() {
    let Some((target, tokenizer)) = smollm2() else {
        return;
    };
    let requests: Vec<SequenceRequest> = (0..12)
        .map(|i| {
            let mut prompt = tokenizer.encode(PROMPTS[i % 4], true).unwrap();
            // Shared prefixes of several lengths, and a tail of the sequence's own.
            prompt.extend(tokenizer.encode(&format!(" item {i}"), false).unwrap());
            SequenceRequest::new(prompt, GenerationConfig::greedy(8 + i % 3))
        })
        .collect();
    let expected: Vec<Vec<u32>> = requests.iter().map(|r| alone(&target, r)).collect();
    let config = target.config();
    let per_row = (target.num_layers() * 2 * config.num_kv_heads() * config.head_dim() * 4) as u64;
    let longest = requests
        .iter()
        .map(|r| r.prompt.len() + r.config.max_new_tokens + 2)
        .max()
        .unwrap() as u64;
    // Room for about three caches: kept prefixes must keep giving their bytes back.
    let engine = EngineHandle::spawn(
        Arc::clone(&target),
        None,
        BatchSettings {
            kv_budget_bytes: 3 * longest * per_row,
            prefill_chunk: 3,
            ..BatchSettings::default()
        },
    )
    .unwrap();
    for round in 0..2 {
        assert_all_alone(&engine, &requests, &expected, &format!("round {round}"));
    }
    assert!(engine.load().prefix_entries > 0);
}

/// The engine's load once the sequences that finished have left (the engine thread publishes
/// it after each step, so just after a stream ends it may still count them running).
fn settled_load(engine: &EngineHandle) -> mirror_sd::mirror_scheduler::EngineLoad {
    let started = Instant::now();
    loop {
        let load = engine.load();
        if (load.running == 0 && load.waiting == 0) || started.elapsed() > Duration::from_secs(10) {
            return load;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn two_conversations_sharing_a_system_prompt_store_it_once() {
    let Some((target, tokenizer)) = smollm2() else {
        return;
    };
    // A long shared start, as a system prompt is, then each conversation's own question.
    let system = "You are a careful assistant. Answer in one short sentence, in plain English, \
                  without lists, code or any formatting, and say so when you do not know.";
    let requests: Vec<SequenceRequest> = [PROMPTS[0], PROMPTS[7]]
        .iter()
        .map(|question| {
            let prompt = tokenizer
                .encode(&format!("{system}\n{question}"), true)
                .unwrap();
            SequenceRequest {
                speculation: drafted(),
                ..SequenceRequest::new(prompt, GenerationConfig::greedy(8))
            }
        })
        .collect();
    let shared = requests[0]
        .prompt
        .iter()
        .zip(&requests[1].prompt)
        .take_while(|(a, b)| a == b)
        .count();
    assert!(shared > 30, "the prompts share {shared} tokens");
    let expected: Vec<Vec<u32>> = requests.iter().map(|r| alone(&target, r)).collect();
    let fixed = BatchSettings {
        window: WindowPolicy::Fixed,
        ..BatchSettings::default()
    };
    let engine = engine_with_draft(&target, fixed);
    let generations = in_turn(&engine, &requests);
    for (i, want) in expected.iter().enumerate() {
        assert_eq!(&generations[i].tokens, want, "conversation {i}");
    }
    assert_eq!(generations[1].stats.prefix_cached_tokens, shared);
    let load = settled_load(&engine);
    let draft = draft_of(&target);
    let both_rows = row_bytes(&target) + row_bytes(&draft);
    // The most two whole finished caches could take, the target's and the draft's: the prompt,
    // the output and at most one window of drafted rows each (what a store of whole caches
    // keeps, neither prompt being a prefix of the other).
    let whole: u64 = requests
        .iter()
        .zip(&generations)
        .map(|(r, g)| (r.prompt.len() + g.tokens.len() + 4) as u64 * both_rows)
        .sum();
    let shared_bytes = both_rows * shared as u64;
    assert!(load.prefix_bytes > 0);
    // The shared rows are kept once: the two caches' bytes less one copy of them, at most.
    assert!(
        load.prefix_bytes <= whole - shared_bytes,
        "{} bytes kept, at most {whole} for two whole caches, {shared_bytes} shared",
        load.prefix_bytes
    );
    assert_eq!(load.pool_used, load.prefix_bytes);
}

/// Pool bytes of one cached position of `model` (keys and values, every layer).
fn row_bytes(model: &Model) -> u64 {
    let config = model.config();
    let element = model.kv_dtype().size_in_bytes();
    (model.num_layers() * 2 * config.num_kv_heads() * config.head_dim() * element) as u64
}

/// From async code: the stream is awaited on a runtime's thread, and two sequences' events
/// interleave without either blocking the runtime.
#[cfg(feature = "server")]
#[test]
fn streams_are_awaited_from_async_code() {
    let Some((target, tokenizer)) = smollm2() else {
        return;
    };
    let engine = EngineHandle::spawn(Arc::clone(&target), None, BatchSettings::default()).unwrap();
    let requests: Vec<SequenceRequest> = [0, 1]
        .iter()
        .map(|&i| {
            SequenceRequest::new(
                tokenizer.encode(PROMPTS[i], true).unwrap(),
                GenerationConfig::greedy(8),
            )
        })
        .collect();
    let expected: Vec<Vec<u32>> = requests.iter().map(|r| alone(&target, r)).collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let got: Vec<Vec<u32>> = runtime.block_on(async {
        let tasks: Vec<_> = requests
            .iter()
            .map(|r| {
                let mut stream = engine.submit(r.clone()).unwrap();
                tokio::spawn(async move {
                    while let Some(event) = stream.next_event().await {
                        if let Event::Finished(result) = event {
                            return (*result).unwrap().tokens;
                        }
                    }
                    Vec::new()
                })
            })
            .collect();
        let mut out = Vec::new();
        for task in tasks {
            out.push(task.await.unwrap());
        }
        out
    });
    assert_eq!(got, expected);
}

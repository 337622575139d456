//! Constrained output on SmolLM2 through the batched engine, under plain decoding, prompt lookup
//! and draft-model speculation, and with Mirror (the draft: SmolLM2's first 26 layers):
//!
//! - sampled JSON under a nested schema always parses and validates, checked by an independent
//!   validator (the `jsonschema` crate);
//! - greedy constrained output is the same under every method;
//! - sampled output follows the target's distribution masked by the grammar and renormalized,
//!   computed exactly by enumerating every token path of a small regular language (chi-square);
//! - bad constraints are clear errors, and a constraint that cannot finish within its length
//!   ends with `Length`.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use common::chi_square::chi_square;
use mirror_core::sampling::{self, SamplingParams};
use mirror_core::{load, LoadOptions, Model, ModelSource, Tokenizer};
use mirror_sd::mirror_scheduler::window::{DraftChoice, DraftWindow};
use mirror_sd::mirror_scheduler::{
    Autoregressive, BatchSettings, Constraint, ConstraintCompiler, ConstraintState, Decoder,
    EngineHandle, Error, FinishReason, Generation, GenerationConfig, Mirror, SequenceRequest,
    Speculation,
};
use serde_json::{json, Value};

struct Smollm2 {
    target: Arc<Model>,
    draft: Arc<Model>,
    tokenizer: Tokenizer,
}

fn smollm2() -> Option<Smollm2> {
    let path = common::smollm2_path()?;
    let loaded = load(&ModelSource::Gguf(path), &LoadOptions::default()).expect("load SmolLM2");
    let target = Arc::new(loaded.model);
    let draft = Arc::new(target.truncated(26).expect("self-draft"));
    Some(Smollm2 {
        target,
        draft,
        tokenizer: loaded.tokenizer,
    })
}

fn engine(m: &Smollm2) -> EngineHandle {
    EngineHandle::spawn_with_draft(
        Arc::clone(&m.target),
        Arc::clone(&m.draft),
        Some(m.tokenizer.clone()),
        BatchSettings::default(),
    )
    .unwrap()
}

/// How a test generation runs: in the batch under a speculation, or alone with Mirror.
#[derive(Debug, Clone, Copy)]
enum Method {
    Batched(Speculation),
    Mirror,
}

/// Plain decoding, prompt lookup and the draft model in the batch, then Mirror.
fn methods() -> Vec<Method> {
    let batched = common::batched_speculations().map(Method::Batched);
    batched.into_iter().chain([Method::Mirror]).collect()
}

fn mirror(m: &Smollm2) -> Mirror {
    Mirror::builder(Arc::clone(&m.target), Arc::clone(&m.draft))
        .tokenizer(m.tokenizer.clone())
        .build()
        .unwrap()
}

/// One generation after `prompt` per config, with `method` (the batch takes them all at once).
fn generate_all(
    m: &Smollm2,
    engine: &EngineHandle,
    method: Method,
    prompt: &[u32],
    configs: Vec<GenerationConfig>,
) -> Vec<Generation> {
    match method {
        Method::Batched(speculation) => {
            let streams: Vec<_> = configs
                .into_iter()
                .map(|config| {
                    let request = SequenceRequest {
                        speculation,
                        ..SequenceRequest::new(prompt.to_vec(), config)
                    };
                    engine.submit(request).unwrap()
                })
                .collect();
            streams.into_iter().map(|s| s.wait().unwrap()).collect()
        }
        Method::Mirror => {
            let mut mirror = mirror(m);
            let generate = |config: GenerationConfig| mirror.generate(prompt, &config).unwrap();
            configs.into_iter().map(generate).collect()
        }
    }
}

/// Objects, arrays, enums, integers, numbers and required keys, nested; every string and
/// array bounded, so that a valid value fits in the generation's length.
fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "role": {"enum": ["admin", "user", "guest"]},
            "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                       "maxItems": 3},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 10},
                    "zip": {"type": "integer", "minimum": 10000, "maximum": 99999}
                },
                "required": ["city", "zip"],
                "additionalProperties": false
            },
            "active": {"type": "boolean"}
        },
        "required": ["name", "age", "role", "address"],
        "additionalProperties": false
    })
}

fn prompt(m: &Smollm2, text: &str) -> Vec<u32> {
    m.tokenizer.encode(text, true).unwrap()
}

fn constrained(
    constraint: Constraint,
    max_new_tokens: usize,
    sampling: SamplingParams,
) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens,
        sampling,
        constraint: Some(constraint),
        ..GenerationConfig::default()
    }
}

/// The generated text without the end-of-sequence token the grammar ends with.
fn text_of(m: &Smollm2, generation: &Generation) -> String {
    m.tokenizer.decode(&generation.tokens, true).unwrap()
}

#[test]
fn sampled_json_under_a_nested_schema_always_parses_and_validates() {
    let Some(m) = smollm2() else {
        return;
    };
    let engine = engine(&m);
    let schema = person_schema();
    let validator = jsonschema::validator_for(&schema).expect("the schema itself is valid");
    let prompt = prompt(&m, "A user record as JSON: ");
    let hot = SamplingParams {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
    };
    for method in methods() {
        let configs = (0..100u64)
            .map(|seed| GenerationConfig {
                seed,
                ..constrained(Constraint::JsonSchema(schema.clone()), 160, hot)
            })
            .collect();
        let generations = generate_all(&m, &engine, method, &prompt, configs);
        for (seed, generation) in generations.iter().enumerate() {
            let text = text_of(&m, generation);
            assert_eq!(
                generation.finish_reason,
                FinishReason::Stop,
                "{method:?}, seed {seed}: unfinished {text:?}"
            );
            let value: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{method:?}, seed {seed}: {e} in {text:?}"));
            let errors: Vec<String> = validator
                .iter_errors(&value)
                .map(|e| e.to_string())
                .collect();
            assert!(
                errors.is_empty(),
                "{method:?}, seed {seed}: {text} violates the schema: {errors:?}"
            );
        }
    }
}

#[test]
fn greedy_constrained_output_is_the_same_under_every_method() {
    let Some(m) = smollm2() else {
        return;
    };
    let engine = engine(&m);
    let cases = [
        (
            "A user record as JSON: ",
            Constraint::JsonSchema(person_schema()),
        ),
        ("Some JSON: ", Constraint::JsonObject),
        (
            "Answer yes or no, then a color: ",
            Constraint::Regex("(yes|no), (red|green|blue)".into()),
        ),
        (
            "A greeting: ",
            Constraint::Lark(
                r#"start: greeting " " name "!"
greeting: "Hello" | "Hi"
name: /[A-Z][a-z]{1,8}/"#
                    .into(),
            ),
        ),
    ];
    for (text, constraint) in cases {
        let prompt = prompt(&m, text);
        let config = constrained(constraint.clone(), 120, SamplingParams::greedy());
        let outputs: Vec<Generation> = methods()
            .into_iter()
            .flat_map(|method| generate_all(&m, &engine, method, &prompt, vec![config.clone()]))
            .collect();
        for (generation, method) in outputs.iter().zip(methods()) {
            assert_eq!(
                generation.tokens, outputs[0].tokens,
                "{constraint:?}: {method:?} differs from plain decoding"
            );
        }
        assert_eq!(
            outputs[0].finish_reason,
            FinishReason::Stop,
            "{constraint:?}"
        );
        // Forced tokens rode as windows, in the batch and in Mirror: fewer target passes than
        // tokens even without a draft.
        if matches!(constraint, Constraint::JsonSchema(_)) {
            for forced in [&outputs[0], &outputs[outputs.len() - 1]] {
                assert!(forced.stats.forced_tokens > 0, "{:?}", forced.stats);
                assert!(
                    forced.stats.target_passes < forced.tokens.len(),
                    "{:?}",
                    forced.stats
                );
            }
        }
    }
}

/// Every token path of `state`'s language after `prompt`, with its exact probability under the
/// target's logits masked by the grammar and warped by `params` (a plain forward per path
/// prefix): the independent reference of the distribution test.
fn enumerate(
    target: &Model,
    params: &SamplingParams,
    prompt: &[u32],
    prefix: &mut Vec<u32>,
    state: &mut ConstraintState,
    weight: f64,
    out: &mut HashMap<Vec<u32>, f64>,
) {
    if state.is_stopped() {
        *out.entry(prefix.clone()).or_insert(0.0) += weight;
        return;
    }
    let mut context = prompt.to_vec();
    context.extend_from_slice(prefix);
    let mut cache = target.new_cache(1, context.len() + 1).unwrap();
    let mut rows = vec![target.next_token_logits(&context, &mut cache).unwrap()];
    state.mask_window(&[], &mut rows).unwrap();
    let probs = sampling::warp_probs(&rows[0], params);
    let allowed: Vec<(u32, f32)> = probs.nonzero().filter(|&(_, p)| p > 0.0).collect();
    for (token, p) in allowed {
        let mut next = state.fork();
        next.settle(&[token]).unwrap();
        prefix.push(token);
        enumerate(
            target,
            params,
            prompt,
            prefix,
            &mut next,
            weight * p as f64,
            out,
        );
        prefix.pop();
    }
}

#[test]
fn constrained_sampling_follows_the_masked_target_distribution() {
    let Some(m) = smollm2() else {
        return;
    };
    let engine = engine(&m);
    let constraint = Constraint::Regex("(yes|no), (red|blue)".into());
    let params = SamplingParams {
        temperature: 1.5,
        top_k: 0,
        top_p: 1.0,
    };
    let prompt = prompt(&m, "Answer yes or no, then a color: ");
    let started = std::time::Instant::now();
    let compiler = ConstraintCompiler::new(&m.tokenizer, m.target.vocab_size()).unwrap();
    let mut exact = HashMap::new();
    let mut state = compiler.compile(&constraint).unwrap();
    enumerate(
        &m.target,
        &params,
        &prompt,
        &mut Vec::new(),
        &mut state,
        1.0,
        &mut exact,
    );
    let total: f64 = exact.values().sum();
    assert!(
        (total - 1.0).abs() < 1e-4,
        "the paths' probabilities sum to {total}"
    );
    let paths: Vec<Vec<u32>> = exact.keys().cloned().collect();
    let expected: Vec<f64> = paths.iter().map(|p| exact[p]).collect();
    eprintln!("reference enumerated in {:.1?}", started.elapsed());
    for method in methods() {
        // Mirror decodes one sequence at a time (about 0.2 s a draw here), the batch 800 at
        // once; 300 draws still reject a bias like plain truncation's (0.39 against 0.3).
        let draws: u64 = if matches!(method, Method::Mirror) {
            300
        } else {
            800
        };
        let started = std::time::Instant::now();
        let configs = (0..draws)
            .map(|seed| GenerationConfig {
                seed: 7000 + seed,
                ..constrained(constraint.clone(), 24, params)
            })
            .collect();
        let mut counts = vec![0usize; paths.len()];
        for generation in generate_all(&m, &engine, method, &prompt, configs) {
            let tokens = generation.tokens;
            let index = paths
                .iter()
                .position(|p| *p == tokens)
                .unwrap_or_else(|| panic!("{method:?}: {tokens:?} is no path of the language"));
            counts[index] += 1;
        }
        let test = chi_square(&counts, &expected);
        eprintln!(
            "{method:?}: chi2 {:.1} < {:.1} over {} bins? ({:.1?})",
            test.stat,
            test.critical,
            test.bins,
            started.elapsed()
        );
        assert!(!test.rejects(), "{method:?}: {test:?}");
    }
}

/// A draft that runs on past the token completing the grammar (its end token, then more) is
/// cut right after that token; masking the window and settling what the target committed then
/// go on without error. (The 1.5B drafted `]}` and `<|im_end|>` after a complete object under
/// Mirror, and consuming the end token after the completed grammar failed the generation.)
#[test]
fn a_window_past_the_grammars_end_is_cut_after_the_completing_token() {
    let Some(m) = smollm2() else {
        return;
    };
    let compiler = ConstraintCompiler::new(&m.tokenizer, m.target.vocab_size()).unwrap();
    let mut state = compiler.compile(&Constraint::Regex("yes".into())).unwrap();
    let yes = m.tokenizer.encode("yes", false).unwrap();
    let eos = m.tokenizer.eos_ids()[0];
    let mut tokens = yes.clone();
    tokens.push(eos);
    tokens.extend_from_slice(&yes);
    let mut window = DraftWindow {
        choices: vec![DraftChoice::PointMass; tokens.len()],
        tokens,
        refused: None,
    };
    let forced = state.constrain_window(&mut window, 8, false).unwrap();
    assert!(!forced);
    assert_eq!(window.tokens, yes, "cut right after the completing token");
    let masks = state.window_masks(&window.tokens).unwrap();
    assert_eq!(masks.len(), yes.len() + 1);
    // The row after the completing token allows the end token only.
    let mut row = vec![0.0f32; m.target.vocab_size()];
    masks[yes.len()].apply(&mut row);
    let allowed: Vec<usize> = (0..row.len()).filter(|&t| row[t].is_finite()).collect();
    assert_eq!(allowed, vec![eos as usize]);
    // The target's correction after the window (the end token) is dropped: the output ends
    // with the token that completed the grammar.
    let mut committed = yes.clone();
    committed.push(eos);
    assert_eq!(state.settle(&committed).unwrap(), yes.len());
    assert!(state.is_stopped());
}

#[test]
fn bad_constraints_are_clear_errors_and_unfinished_ones_end_at_their_length() {
    let Some(m) = smollm2() else {
        return;
    };
    let engine = engine(&m);
    let prompt = prompt(&m, "JSON: ");
    let submit = |constraint: Constraint| {
        engine.submit(SequenceRequest::new(
            prompt.clone(),
            constrained(constraint, 16, SamplingParams::greedy()),
        ))
    };
    for (constraint, what) in [
        (
            Constraint::JsonSchema(json!({"type": "wat"})),
            "an unknown type",
        ),
        (
            Constraint::JsonSchema(json!({"type": "string", "format": "no-such-format"})),
            "an unknown format",
        ),
        (Constraint::Regex("(unclosed".into()), "a broken regex"),
        (
            Constraint::Lark("start: missing_rule".into()),
            "an undefined rule",
        ),
        (
            Constraint::Regex("[^\\s\\S]".into()),
            "a language with no string",
        ),
    ] {
        match submit(constraint) {
            Err(Error::InvalidConstraint { source }) => {
                assert!(!source.to_string().is_empty(), "{what}")
            }
            other => panic!("{what}: {:?}", other.map(|_| "a stream")),
        }
    }
    // Valid, but longer than 16 tokens can hold.
    let long = Constraint::Regex("a{200}".into());
    let generation = submit(long).unwrap().wait().unwrap();
    assert_eq!(generation.finish_reason, FinishReason::Length);
    assert_eq!(generation.tokens.len(), 16);
    // Forks share the constraint: each equals the unforked greedy run.
    let request = SequenceRequest::new(
        prompt.clone(),
        constrained(
            Constraint::JsonSchema(person_schema()),
            120,
            SamplingParams::greedy(),
        ),
    );
    let alone = engine.generate(request.clone()).unwrap().tokens;
    for stream in engine.submit_forked(request.clone(), 3).unwrap() {
        assert_eq!(stream.wait().unwrap().tokens, alone);
    }
    // Without a tokenizer the engine cannot compile constraints; the one-sequence decoders
    // refuse them rather than ignore them.
    let bare = EngineHandle::spawn(Arc::clone(&m.target), None, BatchSettings::default()).unwrap();
    assert!(matches!(
        bare.submit(request.clone()),
        Err(Error::InvalidConfig(_))
    ));
    let refused =
        Autoregressive::new(Arc::clone(&m.target)).generate(&request.prompt, &request.config);
    assert!(matches!(refused, Err(Error::InvalidConfig(_))));
    // Mirror compiles with the tokenizer it was given, and needs one.
    let broken = constrained(
        Constraint::Regex("(unclosed".into()),
        8,
        SamplingParams::greedy(),
    );
    assert!(matches!(
        mirror(&m).generate(&prompt, &broken),
        Err(Error::InvalidConstraint { .. })
    ));
    let mut untokenized = Mirror::builder(Arc::clone(&m.target), Arc::clone(&m.draft))
        .build()
        .unwrap();
    assert!(matches!(
        untokenized.generate(&request.prompt, &request.config),
        Err(Error::InvalidConfig(_))
    ));
    let long = constrained(
        Constraint::Regex("a{200}".into()),
        16,
        SamplingParams::greedy(),
    );
    let generation = mirror(&m).generate(&prompt, &long).unwrap();
    assert_eq!(generation.finish_reason, FinishReason::Length);
    assert_eq!(generation.tokens.len(), 16);
}

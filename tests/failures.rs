//! Failure handling: a draft worker that errors or panics mid-generation surfaces as an error
//! (never a hang) and the decoder serves the next generation; mismatched vocabularies are
//! refused; cancellation stops cleanly. Every generation runs under a watchdog.

mod common;

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use mirror_core::{load_dir, DirFiles, LoadOptions, Model};
use mirror_sd::mirror_scheduler::{
    Autoregressive, Decoder, DraftSchedule, Engine, Error, FinishReason, GenerationConfig, Mirror,
    SpeculativeDecoding, StreamControl, WorkerFault,
};

const PROMPT: [u32; 4] = [3, 14, 15, 92];

fn config() -> GenerationConfig {
    GenerationConfig {
        stop_at_eos: false,
        ..GenerationConfig::greedy(30)
    }
}

/// Runs `f` on another thread and fails the test if it takes longer than a minute.
fn within_a_minute<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("hung: no result within a minute")
}

fn target() -> Arc<Model> {
    Arc::new(common::load_fixture("qwen2"))
}

#[test]
fn a_failing_draft_is_an_error_and_the_decoder_recovers() {
    // Faults at every point of the protocol: prefill, first rollout, tree passes, resolutions;
    // with the full grid (deterministic forward counts) and anytime drafting.
    within_a_minute(|| {
        let target = target();
        let draft = Arc::new(target.truncated(1).unwrap());
        let expected = Autoregressive::new(Arc::clone(&target))
            .generate(&PROMPT, &config())
            .unwrap()
            .tokens;
        for schedule in [
            DraftSchedule::FullGrid,
            DraftSchedule::Anytime {
                branches_per_pass: 2,
            },
        ] {
            for after in 0..10 {
                for panic in [false, true] {
                    let mut mirror = Mirror::builder(Arc::clone(&target), Arc::clone(&draft))
                        .gamma(3)
                        .schedule(schedule)
                        .inject_draft_fault(after, panic)
                        .build()
                        .unwrap();
                    let what = format!("{schedule:?} fault after {after} forwards, panic={panic}");
                    match mirror.generate(&PROMPT, &config()) {
                        // The worker's failure arrives typed: a caller can tell an injected
                        // error from a panic without reading the message.
                        Err(Error::WorkerFailed {
                            source: WorkerFault::Injected { forwards },
                        }) if !panic => assert_eq!(forwards, after, "{what}"),
                        Err(Error::WorkerFailed {
                            source: WorkerFault::Panicked(msg),
                        }) if panic => {
                            assert!(msg.contains("injected draft panic"), "{what}: {msg}")
                        }
                        other => panic!(
                            "{what}: expected WorkerFailed, got {:?}",
                            other.map(|g| g.tokens)
                        ),
                    }
                    // The fault fires once: the same decoder then generates correctly, twice.
                    for _ in 0..2 {
                        let got = mirror
                            .generate(&PROMPT, &config())
                            .unwrap_or_else(|e| panic!("{what}: {e}"));
                        assert_eq!(got.tokens, expected, "{what}");
                    }
                }
            }
        }
    });
}

#[test]
fn mismatched_vocabularies_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let target = target();
    let draft = Arc::new(common::random_model(tmp.path(), "llama", 256, 1, 5));
    let err = SpeculativeDecoding::builder(Arc::clone(&target), Arc::clone(&draft))
        .build()
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            Error::VocabularyMismatch {
                draft: 256,
                target: 320,
                ..
            }
        ),
        "{err}"
    );
    let err = Mirror::builder(target, draft).build().err().unwrap();
    assert!(matches!(err, Error::VocabularyMismatch { .. }), "{err}");
}

#[test]
fn bad_settings_are_refused() {
    let target = target();
    let draft = Arc::new(target.truncated(1).unwrap());
    let bad = [
        Mirror::builder(Arc::clone(&target), Arc::clone(&draft))
            .gamma(0)
            .build()
            .err(),
        Mirror::builder(Arc::clone(&target), Arc::clone(&draft))
            .kappa(0)
            .build()
            .err(),
        Mirror::builder(Arc::clone(&target), Arc::clone(&draft))
            .early_exit(mirror_sd::mirror_scheduler::EarlyExit::Layer(3))
            .build()
            .err(),
        Mirror::builder(Arc::clone(&target), Arc::clone(&draft))
            .early_exit(mirror_sd::mirror_scheduler::EarlyExit::Fraction(1.5))
            .build()
            .err(),
    ];
    for err in bad {
        assert!(matches!(err, Some(Error::InvalidConfig(_))), "{err:?}");
    }
    let mut mirror = Mirror::builder(target, draft).build().unwrap();
    assert!(matches!(
        mirror.generate(&[], &config()),
        Err(Error::InvalidPrompt(_))
    ));
    assert!(matches!(
        mirror.generate(&[999], &config()),
        Err(Error::Core(_))
    ));
}

#[test]
fn cancelling_a_stream_stops_and_leaves_the_decoder_usable() {
    within_a_minute(|| {
        let target = target();
        let draft = Arc::new(target.truncated(1).unwrap());
        let expected = Autoregressive::new(Arc::clone(&target))
            .generate(&PROMPT, &config())
            .unwrap()
            .tokens;
        let mut mirror = Mirror::builder(Arc::clone(&target), Arc::clone(&draft))
            .gamma(3)
            .build()
            .unwrap();
        let mut sd = SpeculativeDecoding::builder(Arc::clone(&target), draft)
            .gamma(3)
            .build()
            .unwrap();
        for decoder in [&mut mirror as &mut dyn Decoder, &mut sd] {
            let mut seen = Vec::new();
            let out = decoder
                .generate_with(&PROMPT, &config(), &mut |new| {
                    seen.extend_from_slice(new);
                    if seen.len() >= 5 {
                        StreamControl::Stop
                    } else {
                        StreamControl::Continue
                    }
                })
                .unwrap();
            assert_eq!(out.finish_reason, FinishReason::Cancelled);
            assert_eq!(out.tokens, seen, "streamed tokens are exactly the output");
            assert!(out.tokens.len() >= 5 && out.tokens.len() < 30);
            assert_eq!(out.tokens[..], expected[..out.tokens.len()]);
            assert_eq!(
                decoder.generate(&PROMPT, &config()).unwrap().tokens,
                expected
            );
        }
        // Dropping the decoder stops and joins its worker.
        drop(mirror);
    });
}

#[test]
fn engine_streams_text_with_the_tokenizer() {
    within_a_minute(|| {
        let loaded = load_dir(
            &DirFiles::local(&common::fixture_dir("qwen2")).unwrap(),
            &LoadOptions::default(),
        )
        .unwrap();
        let target = Arc::new(loaded.model);
        let draft = Arc::new(target.truncated(2).unwrap());
        let mut reference = Engine::new(
            Box::new(Autoregressive::new(Arc::clone(&target))),
            loaded.tokenizer.clone(),
        );
        let want = reference.generate("hello world", &config()).unwrap();
        let mut engine = Engine::new(
            Box::new(
                Mirror::builder(Arc::clone(&target), draft)
                    .gamma(3)
                    .build()
                    .unwrap(),
            ),
            loaded.tokenizer,
        );
        let mut streamed = String::new();
        let out = engine
            .generate_with("hello world", &config(), |piece| {
                streamed.push_str(piece);
                StreamControl::Continue
            })
            .unwrap();
        assert_eq!(out.tokens, want.tokens);
        assert_eq!(out.text, want.text);
        assert_eq!(Some(streamed), out.text, "the stream adds up to the text");
        let chat = engine
            .generate(
                &[mirror_core::ChatMessage::new("user", "hello")][..],
                &config(),
            )
            .unwrap();
        assert!(!chat.tokens.is_empty());
    });
}

#[test]
fn tokenizers_that_differ_in_content_are_refused() {
    use mirror_sd::mirror_scheduler::check_tokenizers;
    let dir = common::fixture_dir("qwen2");
    let target = mirror_core::Tokenizer::from_files(&dir.join("tokenizer.json"), None).unwrap();
    assert!(check_tokenizers(&target, &target.clone()).is_ok());
    // Same size, two entries swapped: what a size check cannot see.
    let tmp = tempfile::tempdir().unwrap();
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap())
            .unwrap();
    let vocab = json["model"]["vocab"].as_object_mut().unwrap();
    let (a, b) = (vocab["a"].clone(), vocab["b"].clone());
    vocab.insert("a".into(), b);
    vocab.insert("b".into(), a);
    std::fs::write(tmp.path().join("tokenizer.json"), json.to_string()).unwrap();
    let draft =
        mirror_core::Tokenizer::from_files(&tmp.path().join("tokenizer.json"), None).unwrap();
    assert_eq!(draft.vocab_size(), target.vocab_size());
    let err = check_tokenizers(&target, &draft).unwrap_err();
    assert!(matches!(err, Error::VocabularyMismatch { .. }), "{err}");
    assert!(err.to_string().contains("first difference"), "{err}");
}

#[test]
fn dropping_a_text_stream_midway_cancels_and_returns_the_decoder() {
    within_a_minute(|| {
        let loaded = load_dir(
            &DirFiles::local(&common::fixture_dir("qwen2")).unwrap(),
            &LoadOptions::default(),
        )
        .unwrap();
        let target = Arc::new(loaded.model);
        let draft = Arc::new(target.truncated(2).unwrap());
        let mut reference = Engine::new(
            Box::new(Autoregressive::new(Arc::clone(&target))),
            loaded.tokenizer.clone(),
        );
        let prompt = loaded.tokenizer.encode("hello world", true).unwrap();
        let long = GenerationConfig {
            stop_at_eos: false,
            ..GenerationConfig::greedy(200)
        };
        let want = reference.generate(&prompt, &long).unwrap();
        let mut engine = Engine::new(
            Box::new(
                Mirror::builder(Arc::clone(&target), draft)
                    .gamma(3)
                    .build()
                    .unwrap(),
            ),
            loaded.tokenizer,
        );
        // Read to the end: the pieces add up to the text.
        let mut stream = engine.stream(&prompt, &long).unwrap();
        let pieces: String = stream.by_ref().collect();
        let whole = stream.finish().unwrap();
        assert_eq!(whole.tokens, want.tokens);
        assert_eq!(Some(pieces), whole.text);
        // Drop after two pieces: the generation stops and the engine gets its decoder back.
        let mut stream = engine.stream(&prompt, &long).unwrap();
        assert!(stream.next().is_some() && stream.next().is_some());
        drop(stream);
        assert!(engine.decoder().is_some());
        let again = engine.generate(&prompt, &long).unwrap();
        assert_eq!(again.tokens, want.tokens);
    });
}

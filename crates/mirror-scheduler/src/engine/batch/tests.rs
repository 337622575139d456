//! The batched core's unit tests.
use std::sync::mpsc;

use mirror_core::{load_model_dir, DirFiles, LoadOptions};

use super::*;
use crate::generation::{Generation, GenerationConfig, StreamControl, TokenLogprob};
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
        let (done, received) = mpsc::channel();
        receivers.push(received);
        core.submit(Waiting {
            request: SequenceRequest::new(prompt.clone(), config.clone()),
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

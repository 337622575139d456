//! [`EngineHandle`]: the batched engine on a thread of its own, behind a `Clone + Send + Sync`
//! handle. `submit` returns a [`SequenceStream`] of [`Event`]s: text pieces with their token
//! ids, then the final [`Generation`]. Dropping the stream cancels the sequence at the next
//! step. The stream is read with `.await` from async code ([`SequenceStream::next_event`]),
//! without blocking the runtime, or blocking from a plain thread (it is an `Iterator`).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crossbeam_channel::{unbounded, Receiver, Sender};
use mirror_core::{Model, Tokenizer};
use tokio::sync::mpsc;

use super::batch::{BatchCore, BatchSettings, EngineLoad, Fork, SequenceRequest, Sink, Waiting};
use super::text::IncrementalText;
use crate::constraint::{ConstraintState, LazyCompiler};
use crate::error::{Error, Result};
use crate::generation::{Generation, GenerationConfig, StreamControl, TokenLogprob};
use crate::monitor::BoundaryTokens;

/// What a batched sequence tells its stream.
#[derive(Debug)]
pub enum Event {
    /// Newly committed tokens, and the text they complete (empty without a tokenizer, or while
    /// a character's bytes are incomplete).
    Text {
        /// The token ids.
        tokens: Vec<u32>,
        /// Their text.
        text: String,
        /// Their log-probabilities, when the sequence asked for them
        /// ([`GenerationConfig::logprobs`]; else empty).
        logprobs: Vec<TokenLogprob>,
    },
    /// The end: the whole generation with its statistics, or why it failed.
    Finished(Box<Result<Generation>>),
}

/// What every clone of a handle shares. When the last clone is gone the commands' channel
/// closes, and the engine's thread ends once the sequences it holds have ended.
struct Shared {
    commands: Sender<Waiting>,
    /// Shared with every stream (a clone per request held tens of MB until its stream was
    /// read).
    tokenizer: Option<Arc<Tokenizer>>,
    target: Arc<Model>,
    load: Arc<Mutex<EngineLoad>>,
    /// Built at the first constrained request (the token trie takes a while).
    constraints: LazyCompiler,
    /// The monitors' boundary tokens, built at the first monitored request (`None` without a
    /// tokenizer: every token is one).
    boundaries: OnceLock<Option<BoundaryTokens>>,
}

/// The batched engine (see the [module](self) docs). Cheap to clone; every clone submits to the
/// same engine.
#[derive(Clone)]
pub struct EngineHandle {
    shared: Arc<Shared>,
}

impl EngineHandle {
    /// Starts the engine over `target`, with `tokenizer` for text pieces (optional).
    pub fn spawn(
        target: Arc<Model>,
        tokenizer: Option<Tokenizer>,
        settings: BatchSettings,
    ) -> Result<Self> {
        Self::start(target, None, tokenizer, settings)
    }

    /// Starts the engine over `target` with `draft` for the sequences that draft with a model
    /// ([`crate::Speculation::Draft`]); the pair is checked as [`crate::SpeculativeDecoding`]
    /// checks it (same vocabulary).
    pub fn spawn_with_draft(
        target: Arc<Model>,
        draft: Arc<Model>,
        tokenizer: Option<Tokenizer>,
        settings: BatchSettings,
    ) -> Result<Self> {
        Self::start(target, Some(draft), tokenizer, settings)
    }

    fn start(
        target: Arc<Model>,
        draft: Option<Arc<Model>>,
        tokenizer: Option<Tokenizer>,
        settings: BatchSettings,
    ) -> Result<Self> {
        let core = BatchCore::new(Arc::clone(&target), draft, settings)?;
        let (commands, command_rx) = unbounded();
        let load = Arc::new(Mutex::new(EngineLoad::default()));
        let thread_load = Arc::clone(&load);
        std::thread::Builder::new()
            .name("mirror-batch-engine".into())
            .spawn(move || run(core, command_rx, &thread_load))
            .map_err(Error::SpawnFailed)?;
        Ok(Self {
            shared: Arc::new(Shared {
                commands,
                constraints: LazyCompiler::new(tokenizer.clone(), target.vocab_size()),
                tokenizer: tokenizer.map(Arc::new),
                target,
                load,
                boundaries: OnceLock::new(),
            }),
        })
    }

    /// The target every sequence runs on.
    pub fn target(&self) -> &Arc<Model> {
        &self.shared.target
    }

    /// The engine's load after its last step.
    pub fn load(&self) -> EngineLoad {
        self.shared.load.lock().map(|l| *l).unwrap_or_default()
    }

    /// Queues `request`; its events arrive on the returned stream.
    pub fn submit(&self, request: SequenceRequest) -> Result<SequenceStream> {
        let mut streams = self.submit_forked(request, 1)?;
        streams.pop().ok_or(Error::EngineStopped)
    }

    /// Queues `n` sequences that share `request`'s prompt, which is prefilled once: sequence
    /// `i` runs with seed `request.config.seed + i` (wrapping) and otherwise the same settings,
    /// and equals that request run on its own. `n` is at least 1.
    ///
    /// A request with a [`crate::Constraint`] has it compiled here, on the caller's thread (a
    /// large schema may take milliseconds, none of them the batch's): an invalid one is
    /// [`Error::InvalidConstraint`] at once. The engine needs a tokenizer for that.
    pub fn submit_forked(&self, request: SequenceRequest, n: usize) -> Result<Vec<SequenceStream>> {
        let constraint = match &request.config.constraint {
            Some(constraint) => Some(self.shared.constraints.compile(constraint)?),
            None => None,
        };
        let (sink, stream) = self.channel();
        let mut streams = vec![stream];
        let mut forks = Vec::with_capacity(n.saturating_sub(1));
        for i in 1..n {
            let (sink, stream) = self.channel();
            streams.push(stream);
            forks.push(Fork {
                config: GenerationConfig {
                    seed: request.config.seed.wrapping_add(i as u64),
                    ..request.config.clone()
                },
                sink,
                constraint: constraint.as_ref().map(ConstraintState::fork),
            });
        }
        let boundaries = self.boundaries(&request.config);
        let waiting = Waiting {
            request,
            sink,
            submitted: std::time::Instant::now(),
            forks,
            constraint,
            boundaries,
        };
        self.shared
            .commands
            .send(waiting)
            .map_err(|_| Error::EngineStopped)?;
        Ok(streams)
    }

    /// The boundary tokens of `config`'s monitors (decoded once per engine, when first asked).
    fn boundaries(&self, config: &GenerationConfig) -> Option<BoundaryTokens> {
        config.monitors.as_ref()?;
        let tokenizer = self.shared.tokenizer.as_ref()?;
        let vocab = self.shared.target.vocab_size();
        (self.shared.boundaries)
            .get_or_init(|| Some(BoundaryTokens::of_tokenizer(tokenizer, vocab)))
            .clone()
    }

    fn channel(&self) -> (Box<dyn Sink>, SequenceStream) {
        let (events, event_rx) = mpsc::unbounded_channel();
        let stop = Arc::new(AtomicBool::new(false));
        let sink = StreamSink {
            events,
            text: self.shared.tokenizer.clone().map(IncrementalText::new),
            tokenizer: self.shared.tokenizer.clone(),
            stop: Arc::clone(&stop),
        };
        let stream = SequenceStream {
            events: event_rx,
            stop,
        };
        (Box::new(sink), stream)
    }

    /// Generates `request` and waits for its end (blocking; not for async code).
    pub fn generate(&self, request: SequenceRequest) -> Result<Generation> {
        self.submit(request)?.wait()
    }
}

/// The engine thread: takes submissions, steps while there is work, sleeps when idle.
fn run(mut core: BatchCore, commands: Receiver<Waiting>, load: &Mutex<EngineLoad>) {
    let mut open = true;
    let (mut steps, mut rows, mut stepped_sequences) = (0u64, 0u64, 0u64);
    loop {
        if core.is_idle() {
            if !open {
                return;
            }
            match commands.recv() {
                Ok(waiting) => core.submit(waiting),
                Err(_) => return,
            }
        }
        loop {
            match commands.try_recv() {
                Ok(waiting) => core.submit(waiting),
                Err(crossbeam_channel::TryRecvError::Empty) => break,
                Err(crossbeam_channel::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        match catch_unwind(AssertUnwindSafe(|| core.step())) {
            Ok(report) if report.rows > 0 => {
                steps += 1;
                rows += report.rows as u64;
                stepped_sequences += report.sequences as u64;
            }
            Ok(_) => {}
            // A bug in the engine, not in one sequence: none of them can be trusted to go on.
            Err(_) => core
                .abandon(|| Error::GenerationPanicked("the batched engine's step panicked".into())),
        }
        if let Ok(mut l) = load.lock() {
            *l = EngineLoad {
                steps,
                rows,
                stepped_sequences,
                ..core.load()
            };
        }
    }
}

/// Sends a sequence's events to its stream.
struct StreamSink {
    events: mpsc::UnboundedSender<Event>,
    text: Option<IncrementalText>,
    tokenizer: Option<Arc<Tokenizer>>,
    /// Set by [`SequenceStream::stop`].
    stop: Arc<AtomicBool>,
}

impl Sink for StreamSink {
    fn tokens(&mut self, tokens: &[u32], logprobs: &[TokenLogprob]) -> StreamControl {
        let text = self
            .text
            .as_mut()
            .and_then(|t| t.push(tokens))
            .unwrap_or_default();
        let event = Event::Text {
            tokens: tokens.to_vec(),
            text,
            logprobs: logprobs.to_vec(),
        };
        match self.events.send(event) {
            Ok(()) if !self.stop.load(Ordering::Acquire) => StreamControl::Continue,
            // Stopped by the consumer, or the stream was dropped: the sequence is cancelled.
            _ => StreamControl::Stop,
        }
    }

    fn cancelled(&self) -> bool {
        self.events.is_closed() || self.stop.load(Ordering::Acquire)
    }

    fn finish(self: Box<Self>, result: Result<Generation>) {
        let result = result.and_then(|mut generation| {
            if let Some(tokenizer) = &self.tokenizer {
                generation.text = Some(tokenizer.decode(&generation.tokens, true)?);
            }
            Ok(generation)
        });
        let _ = self.events.send(Event::Finished(Box::new(result)));
    }
}

/// One sequence's events; dropping it cancels the sequence.
pub struct SequenceStream {
    events: mpsc::UnboundedReceiver<Event>,
    stop: Arc<AtomicBool>,
}

impl SequenceStream {
    /// Ends the sequence at the engine's next step, keeping the tokens it has committed, and
    /// still delivers its [`Event::Finished`] (finish reason `Cancelled`, with its statistics,
    /// log-probabilities and monitor report), where dropping the stream delivers nothing. For a
    /// consumer that found its own reason to stop, such as a stop string.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    /// The next event, awaited (for async code; does not block the runtime). `None` after
    /// [`Event::Finished`].
    pub async fn next_event(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// Waits for the end and returns the generation (blocking).
    pub fn wait(self) -> Result<Generation> {
        for event in self {
            if let Event::Finished(result) = event {
                return *result;
            }
        }
        Err(Error::EngineStopped)
    }
}

impl Iterator for SequenceStream {
    type Item = Event;

    /// The next event, blocking the calling thread (not for async code).
    fn next(&mut self) -> Option<Event> {
        self.events.blocking_recv()
    }
}

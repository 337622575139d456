//! An OpenAI-compatible HTTP server around the engine (feature `server`, on by default).
//!
//! Endpoints: `POST /v1/chat/completions` and `POST /v1/completions` (whole responses, or
//! server-sent events ending with `data: [DONE]` when `"stream": true`), `GET /v1/models`,
//! `GET /health`, and `GET /metrics` in the Prometheus text format.
//!
//! Requests take OpenAI's `model`, `messages` or `prompt`, `max_tokens`, `temperature`, `top_p`,
//! `seed`, `stop`, `n`, `response_format` (`text`, `json_object`, `json_schema`), `stream` and
//! `stream_options`, plus `top_k` and the extension object `"mirror_sd": {"method": "ar" | "sd"
//! | "lookup" | "mirror", "ignore_eos": bool, "timeout_s": number, "grammar": lark, "regex":
//! string}`. Responses carry `usage` and a `mirror_sd` object with the generated token ids and
//! the speculation statistics (E[A], reuse rate, hidden draft time, time to first token).
//!
//! `ar`, `sd` and `lookup` run on the batched engine ([`mirror_scheduler::EngineHandle`]): every
//! running request is a sequence of one batch, up to [`ServerConfig::batch`]'s `max_batch`,
//! with KV caches from a pool of `kv_budget_bytes`; `n` choices share one prefill. When the batch
//! is full and `queue_capacity` sequences already wait for admission, requests get 503 with
//! `Retry-After`. Mirror runs one sequence at a time behind a bounded queue (429 when full).
//! Every request has a deadline (504), a client that disconnects cancels its generation at the
//! next step (its KV goes back to the pool), and shutdown stops accepting, lets accepted
//! requests finish within a grace period, then cancels what is left.
//!
//! ```no_run
//! use std::sync::Arc;
//! use mirror_sd::mirror_core::{load, LoadOptions, ModelSource};
//! use mirror_sd::mirror_scheduler::MirrorSettings;
//! use mirror_sd::serve::{Backend, Method, Server, ServerConfig};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let loaded = load(&ModelSource::parse("models/SmolLM2-135M-Instruct.Q4_1.gguf")?, &LoadOptions::default())?;
//! let target = Arc::new(loaded.model);
//! let draft = Arc::new(target.truncated(10)?); // self-speculation
//! let backend = Backend::new(target, Some(draft), loaded.tokenizer, &Method::ALL, Method::Mirror,
//!                            &MirrorSettings::default())?;
//! let server = Server::start("127.0.0.1:0".parse()?, backend, ServerConfig::default())?;
//! println!("listening on http://{}", server.local_addr());
//! server.wait()?; // until shutdown() or, with `handle_signals`, SIGINT/SIGTERM
//! # Ok(()) }
//! ```

pub mod api;
pub mod backend;
mod batched;
mod delivery;
pub mod error;
mod fields;
mod messages;
pub mod metrics;
pub mod queue;
mod response;
mod routes;
pub mod stop;
mod tool_output;

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

pub use backend::{Backend, Batched, Method, PromptEncoder};
pub use error::{ApiError, ServeError};
pub use mirror_scheduler::BatchSettings;

use self::metrics::Metrics;
use batched::BatchedQueue;
use queue::RequestQueue;
use routes::App;

/// Settings of the HTTP side.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The model id clients must name (listed by `/v1/models`).
    pub model_name: String,
    /// Most requests that may wait: for Mirror's engine (more get 429), and for admission into
    /// the batch (more get 503).
    pub queue_capacity: usize,
    /// Largest request body; larger ones get 413.
    pub max_body_bytes: usize,
    /// Deadline of every request (a request may ask for a shorter one with
    /// `mirror_sd.timeout_s`); past it the request gets 504.
    pub request_timeout: Duration,
    /// `max_tokens` when a request gives none (capped by the room left in the context).
    pub default_max_tokens: usize,
    /// On shutdown, how long accepted requests may take to finish before they are cancelled.
    pub shutdown_grace: Duration,
    /// Shut down on SIGINT or SIGTERM (a second signal cancels what is left at once).
    pub handle_signals: bool,
    /// The batched engine: most running sequences (`max_batch`; 1 serves one request at a
    /// time), the KV pool's bytes, the step's token budget, the prefix cache.
    pub batch: BatchSettings,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            model_name: "mirror-sd".into(),
            queue_capacity: 32,
            max_body_bytes: 2 << 20,
            request_timeout: Duration::from_secs(600),
            default_max_tokens: 256,
            shutdown_grace: Duration::from_secs(30),
            handle_signals: false,
            batch: BatchSettings::default(),
        }
    }
}

impl ServerConfig {
    fn check(&self) -> Result<(), ServeError> {
        let problem = if self.model_name.is_empty() {
            Some("the model name is empty")
        } else if self.max_body_bytes == 0 {
            Some("the body limit is 0 bytes")
        } else if self.request_timeout.is_zero() {
            Some("the request timeout is 0")
        } else if self.default_max_tokens == 0 {
            Some("the default max_tokens is 0")
        } else {
            None
        };
        match problem {
            Some(p) => Err(ServeError::Config(p.into())),
            None => Ok(()),
        }
    }
}

/// Starts servers.
pub struct Server;

impl Server {
    /// Binds `addr` (port 0 picks a free port), starts the batched engine, Mirror's worker thread
    /// and the HTTP runtime on threads of their own, and returns once the server accepts
    /// connections.
    pub fn start(
        addr: SocketAddr,
        backend: Backend,
        config: ServerConfig,
    ) -> Result<RunningServer, ServeError> {
        config.check()?;
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let local_addr = listener.local_addr()?;
        let metrics = Arc::new(Metrics::new()?);
        let encoder = backend.encoder();
        let methods = backend.methods();
        let default_method = backend.default_method();
        let context_limit = backend.context_limit();
        let vocab_size = backend.vocab_size();
        let constraints = backend.constraints();
        let mirror_layout = backend.mirror_layout();
        let batched = backend.spawn_batched(config.batch)?.map(|b| {
            BatchedQueue::new(
                b,
                config.queue_capacity,
                Arc::clone(&metrics),
                encoder.clone(),
            )
        });
        let (queue, worker) =
            RequestQueue::start(backend, config.queue_capacity, Arc::clone(&metrics))?;
        let app = Arc::new(App {
            queue,
            batched,
            metrics,
            encoder,
            model_name: config.model_name.clone(),
            created: api::unix_seconds(),
            methods,
            default_method,
            context_limit,
            vocab_size,
            constraints,
            mirror_layout,
            max_body_bytes: config.max_body_bytes,
            request_timeout: config.request_timeout,
            default_max_tokens: config.default_max_tokens,
            next_id: AtomicU64::new(0),
        });
        let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("mirror-sd-http")
            .enable_all()
            .build()?;
        let thread = std::thread::Builder::new()
            .name("mirror-sd-server".into())
            .spawn(move || {
                let served = runtime.block_on(serve(
                    listener,
                    Arc::clone(&app),
                    shutdown_rx,
                    config.shutdown_grace,
                    config.handle_signals,
                ));
                // Every connection is closed: let the worker finish what is queued and exit.
                app.queue.close();
                drop(app);
                let joined = worker
                    .join()
                    .map_err(|_| ServeError::ThreadPanicked("engine worker"));
                served.and(joined)
            })?;
        Ok(RunningServer {
            local_addr,
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
        })
    }
}

async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    shutdown: tokio::sync::oneshot::Receiver<()>,
    grace: Duration,
    handle_signals: bool,
) -> Result<(), ServeError> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let drain_app = Arc::clone(&app);
    let signal = async move {
        tokio::select! {
            _ = shutdown => {}
            _ = termination_signal(handle_signals) => {}
        }
        drain_app.queue.begin_drain();
        // After the grace period, or at a second signal, cancel whatever is left.
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(grace) => {}
                _ = termination_signal(handle_signals) => {}
            }
            drain_app.queue.abort();
        });
    };
    axum::serve(listener, routes::router(app))
        .with_graceful_shutdown(signal)
        .await?;
    Ok(())
}

/// SIGINT or SIGTERM when `enabled`; never otherwise (nor if the handlers cannot be set up).
async fn termination_signal(enabled: bool) {
    if !enabled {
        return std::future::pending().await;
    }
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            (Ok(mut interrupt), Ok(mut terminate)) => {
                tokio::select! {
                    _ = interrupt.recv() => {}
                    _ = terminate.recv() => {}
                }
            }
            _ => std::future::pending().await,
        }
    }
    #[cfg(not(unix))]
    {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// A server running on its own threads.
pub struct RunningServer {
    local_addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), ServeError>>>,
}

impl RunningServer {
    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Begins a graceful shutdown: stop accepting, finish accepted requests within the grace
    /// period, cancel the rest. Returns at once; [`RunningServer::wait`] waits for the end.
    pub fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Waits until the server has stopped (after [`RunningServer::shutdown`] or a signal).
    pub fn wait(mut self) -> Result<(), ServeError> {
        self.join()
    }

    fn join(&mut self) -> Result<(), ServeError> {
        match self.thread.take() {
            Some(thread) => thread
                .join()
                .map_err(|_| ServeError::ThreadPanicked("server"))?,
            None => Ok(()),
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.shutdown();
        let _ = self.join();
    }
}

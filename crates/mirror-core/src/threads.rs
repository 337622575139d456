//! CPU threads: one policy for every pool a model's work can run on.
//!
//! - **Each model runs on its own rayon pool** ([`ThreadPlacement::threads`], given to
//!   [`Model::with_placement`](crate::Model::with_placement) or in
//!   [`LoadOptions::placement`](crate::LoadOptions)). mirror-core's matmul and attention
//!   kernels, and candle's rayon-parallel ops (RMSNorm, RoPE, f32 matmul), run in the pool of
//!   the model whose forward calls them. A pool can be pinned to a set of cores
//!   ([`ThreadPlacement::cores`]), so that two models that run at the same time (Mirror's target
//!   and draft) never share a core.
//!   A model without a pool of its own runs in the caller's: from a plain thread, its forward
//!   crosses into rayon's global pool once.
//! - **A decode step keeps its pool awake.** During a forward of at most 16 rows the pool's
//!   other threads poll for work instead of sleeping between its short parallel calls
//!   ([`POLL_ENV`] turns it off).
//! - **The draft worker** of Mirror runs the draft on the draft model's pool; the scheduler
//!   builds no pool of its own.
//! - **candle's element-wise pool** is process-wide (`CANDLE_NUM_THREADS` threads; candle uses
//!   it for element-wise ops on tensors of 64K elements or more). The decode path stays off it
//!   (the SwiGLU gate and attention are mirror-core kernels; the remaining element-wise ops of
//!   a window are smaller), so it only serves prompt prefill. [`limit_candle_threads`] sizes
//!   it before first use; the examples set it to one thread, so that prefill ops of two
//!   models never wait on each other there.
//!
//! On a 2-core machine this gives: autoregressive and vanilla SD, one model at a time, all
//! cores each; Mirror, target and draft side by side, one core each (measured in
//! BENCHMARKS.md with `--target-threads`/`--draft-threads`).

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::kernels::switched_off;

/// The environment variable candle sizes its element-wise pool by.
pub const CANDLE_THREADS_ENV: &str = "CANDLE_NUM_THREADS";

/// Sizes candle's process-wide element-wise pool to `threads` unless the user already chose
/// (`CANDLE_NUM_THREADS` is set). Call it before loading any model, from `main`, while the
/// process has one thread: candle reads the variable once, at first use.
pub fn limit_candle_threads(threads: usize) {
    if std::env::var_os(CANDLE_THREADS_ENV).is_none() {
        // Single-threaded at this point by the documented contract (before any model or pool
        // exists), which is what `set_var` requires.
        std::env::set_var(CANDLE_THREADS_ENV, threads.max(1).to_string());
    }
}

/// Cores this process may run on (Linux: its affinity mask; elsewhere `0..available`).
pub fn available_cores() -> Vec<usize> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity fills it.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0 {
                let cores: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
                    .filter(|&c| libc::CPU_ISSET(c, &set))
                    .collect();
                if !cores.is_empty() {
                    return cores;
                }
            }
        }
    }
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    (0..n).collect()
}

#[cfg(target_os = "linux")]
fn pin_current_thread(cores: &[usize]) -> std::io::Result<()> {
    // SAFETY: the set is built from valid core indices (checked against CPU_SETSIZE) and
    // passed with its own size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &core in cores {
            libc::CPU_SET(core, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A rayon pool of `threads` threads named `name-i`, each pinned to `cores` when given (Linux;
/// elsewhere the cores are only checked). Cores this process may not use are an error.
pub fn build_pool(
    name: &str,
    threads: usize,
    cores: Option<&[usize]>,
) -> Result<Arc<rayon::ThreadPool>> {
    let cores: Option<Vec<usize>> = match cores {
        Some(cores) => {
            let available = available_cores();
            if cores.is_empty() || cores.iter().any(|c| !available.contains(c)) {
                return Err(Error::ThreadPool(format!(
                    "cores {cores:?} are not all available to this process (available: {available:?})"
                )));
            }
            Some(cores.to_vec())
        }
        None => None,
    };
    let name = name.to_string();
    let builder = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .thread_name(move |i| format!("{name}-{i}"));
    let builder = match cores {
        #[cfg(target_os = "linux")]
        Some(cores) => builder.start_handler(move |_| {
            // A pool that cannot pin still computes correctly; say so instead of failing.
            if let Err(e) = pin_current_thread(&cores) {
                log::warn!("cannot pin a pool thread to cores {cores:?}: {e}");
            }
        }),
        _ => builder,
    };
    builder
        .build()
        .map(Arc::new)
        .map_err(|e| Error::ThreadPool(e.to_string()))
}

/// Where a model's CPU work runs: in the caller's rayon pool (the default), or in a pool of its
/// own of `threads` threads, pinned to `cores` when given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ThreadPlacement {
    /// Give the model its own rayon pool of this many threads.
    pub threads: Option<usize>,
    /// Pin the model's pool to these cores (one thread each unless `threads` says otherwise).
    pub cores: Option<Vec<usize>>,
}

impl ThreadPlacement {
    /// The pool this placement asks for, its threads named `name-i`; `None` for the caller's.
    pub fn build_pool(&self, name: &str) -> Result<Option<Arc<rayon::ThreadPool>>> {
        match (&self.cores, self.threads) {
            (Some(cores), threads) => {
                build_pool(name, threads.unwrap_or(cores.len()), Some(cores)).map(Some)
            }
            (None, Some(threads)) => build_pool(name, threads, None).map(Some),
            (None, None) => Ok(None),
        }
    }
}

/// Environment variable that stops the pool threads polling for work during a forward of at
/// most 16 rows (a decode step), where they would otherwise spin between its parallel calls
/// rather than sleep: `off`, `0` or `false`. For comparisons, or on a machine shared with other
/// work, where a spinning thread takes time from someone else.
pub const POLL_ENV: &str = "MIRROR_SD_POLL";

/// Most activation rows of work for which [`with_pool_awake`] keeps the pool polling: decode
/// steps, verification windows and small batches.
const POLL_MAX_ROWS: usize = 16;

/// Longest a poller of [`with_pool_awake`] goes without work before it leaves, back to rayon's
/// own idling (a few dozen yields, then sleep).
const POLL_IDLE_LIMIT: Duration = Duration::from_millis(1);

thread_local! {
    /// Whether this thread runs inside [`with_pool_awake`], as the caller or as a poller.
    static AWAKE: Cell<bool> = const { Cell::new(false) };
}

/// Whether forwards keep their pool's threads polling: unless [`POLL_ENV`] says `off`. Read
/// once per process.
fn polling_wanted() -> bool {
    static WANTED: OnceLock<bool> = OnceLock::new();
    *WANTED.get_or_init(|| !switched_off(POLL_ENV))
}

/// Runs `f` on this thread while the other threads of its rayon pool poll for work instead of
/// sleeping, so that each of the many short parallel calls of a forward (a one-token step of
/// the 1.5B makes 113 matmul calls of 50 us to 6 ms) starts on every thread at once.
///
/// Why: a rayon worker with nothing to do yields a few dozen times, then sleeps, and waking it
/// takes 10-15 us on our VMs. In a one-row forward the other thread waits between calls (norms,
/// RoPE, attention, the SwiGLU gate, and the end of the previous call) for longer than that, so
/// it joined each call late: 7-16 us into calls of 54-300 us on a Zen 4 EPYC (per-item timers,
/// BENCHMARKS.md); polling, 3-8 us. llama.cpp's threads spin between the ops of a graph for the
/// same reason.
///
/// The pollers run any pending job of the pool (candle's and attention's parallel work too)
/// and leave when `f` returns, or after [`POLL_IDLE_LIMIT`] without work, so a long stretch of
/// single-threaded work costs at most that much spinning. Work on more than [`POLL_MAX_ROWS`]
/// rows (a prompt's chunk) runs long calls, where a late start matters little, and its larger
/// element-wise ops run on candle's own pool, whose threads a poller would compete with: it
/// runs without pollers, as it does off a rayon worker, in a pool of one thread, nested, or
/// with [`POLL_ENV`] off.
pub(crate) fn with_pool_awake<T>(rows: usize, f: impl FnOnce() -> T) -> T {
    let Some(owner) = rayon::current_thread_index() else {
        return f();
    };
    let threads = rayon::current_num_threads();
    if rows > POLL_MAX_ROWS || threads < 2 || AWAKE.with(Cell::get) || !polling_wanted() {
        return f();
    }
    let done = AtomicBool::new(false);
    rayon::in_place_scope(|scope| {
        for _ in 1..threads {
            scope.spawn(|_| poll_for_work(&done, owner));
        }
        // Ends the polling when `f` returns or unwinds.
        let _awake = Awake::enter(&done);
        f()
    })
}

/// Runs `f` on a thread of the caller's rayon pool: here when this thread is one of its
/// workers, otherwise on a worker of the global pool while this thread waits. A forward called
/// from a plain thread (the batched engine's, a user's `main`) then crosses into the pool once,
/// not once per parallel call, and its pool threads can poll ([`with_pool_awake`]).
pub(crate) fn in_current_pool<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::scope(|_| f())
    }
}

/// Marks this thread awake until dropped, then (for the caller) tells the pollers to leave.
struct Awake<'a> {
    done: Option<&'a AtomicBool>,
}

impl<'a> Awake<'a> {
    fn enter(done: &'a AtomicBool) -> Self {
        AWAKE.with(|a| a.set(true));
        Self { done: Some(done) }
    }

    fn poller() -> Self {
        AWAKE.with(|a| a.set(true));
        Self { done: None }
    }
}

impl Drop for Awake<'_> {
    fn drop(&mut self) {
        AWAKE.with(|a| a.set(false));
        if let Some(done) = self.done {
            done.store(true, Ordering::Release);
        }
    }
}

/// A poller of [`with_pool_awake`]: runs pending jobs of the pool until `done`.
fn poll_for_work(done: &AtomicBool, owner: usize) {
    // The caller may pick up a poller it spawned (while it waits inside a join), and a poller
    // may pick up another: either returns at once rather than hold its thread.
    if rayon::current_thread_index() == Some(owner) || AWAKE.with(Cell::get) {
        return;
    }
    let _awake = Awake::poller();
    let mut idle_since = Instant::now();
    while !done.load(Ordering::Acquire) {
        match rayon::yield_now() {
            Some(rayon::Yield::Executed) => idle_since = Instant::now(),
            _ if idle_since.elapsed() > POLL_IDLE_LIMIT => break,
            _ => {
                for _ in 0..16 {
                    std::hint::spin_loop();
                }
            }
        }
    }
}

/// How to split `cores` between a target and a draft that run at the same time (Mirror):
/// disjoint sets, the draft taking a third (at least one core) and the target the rest. With
/// one core both get it. Returns `(target cores, draft cores)`.
pub fn split_cores(cores: &[usize]) -> (Vec<usize>, Vec<usize>) {
    match cores.len() {
        0 => (Vec::new(), Vec::new()),
        1 => (cores.to_vec(), cores.to_vec()),
        n => {
            let draft = (n / 3).max(1);
            (cores[..n - draft].to_vec(), cores[n - draft..].to_vec())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_are_disjoint_and_cover_the_cores() {
        assert_eq!(split_cores(&[0, 1]), (vec![0], vec![1]));
        assert_eq!(split_cores(&[3]), (vec![3], vec![3]));
        let cores: Vec<usize> = (0..16).collect();
        let (target, draft) = split_cores(&cores);
        assert_eq!((target.len(), draft.len()), (11, 5));
        assert!(target.iter().all(|c| !draft.contains(c)));
    }

    #[test]
    fn a_forward_with_its_pool_awake_computes_as_without_and_the_pollers_leave() {
        use rayon::prelude::*;
        let pool = build_pool("test-awake", 2, None).unwrap();
        let values: Vec<u64> = (0..100_000).map(|i| i * 7 % 1001).collect();
        let serial: u64 = values.iter().sum();
        for _ in 0..20 {
            let (sum, nested) = pool.install(|| {
                with_pool_awake(1, || {
                    let sum: u64 = values.par_iter().sum();
                    // Nested: runs at once, no second set of pollers.
                    let nested = with_pool_awake(1, || {
                        values.par_chunks(1000).map(|c| c.len()).sum::<usize>()
                    });
                    (sum, nested)
                })
            });
            assert_eq!((sum, nested), (serial, values.len()));
        }
        // A panic inside ends the polling too, and leaves no thread marked awake.
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.install(|| with_pool_awake(1, || panic!("inside a forward")))
        }));
        assert!(panicked.is_err());
        assert_eq!(
            pool.broadcast(|_| AWAKE.with(Cell::get)),
            vec![false, false]
        );
        // From a plain thread, the work crosses into the global pool.
        assert!(rayon::current_thread_index().is_none());
        assert!(in_current_pool(|| rayon::current_thread_index().is_some()));
    }

    #[test]
    fn a_pinned_pool_runs_on_its_core_and_bad_cores_are_errors() {
        let cores = available_cores();
        let last = *cores.last().unwrap();
        let pool = build_pool("test-pin", 1, Some(&[last])).unwrap();
        #[cfg(target_os = "linux")]
        {
            // SAFETY: sched_getcpu has no preconditions.
            let cpu = pool.install(|| unsafe { libc::sched_getcpu() });
            assert_eq!(cpu as usize, last);
        }
        let _ = pool;
        assert!(build_pool("test-pin", 1, Some(&[usize::MAX / 2])).is_err());
        assert!(build_pool("test-pin", 1, Some(&[])).is_err());
    }
}

//! CPU threads: one policy for every pool a model's work can run on.
//!
//! - **Each model runs on its own rayon pool** ([`ThreadPlacement::threads`], given to
//!   [`Model::with_placement`](crate::Model::with_placement) or in
//!   [`LoadOptions::placement`](crate::LoadOptions)). mirror-core's matmul and attention
//!   kernels, and candle's rayon-parallel ops (RMSNorm, RoPE, f32 matmul), run in the pool of
//!   the model whose forward calls them. A pool can be pinned to a set of cores
//!   ([`ThreadPlacement::cores`]), so that two models that run at the same time (Mirror's target
//!   and draft) never share a core.
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

use std::sync::Arc;

use crate::error::{Error, Result};

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

//! How a build runs: on a thread of its own at a low priority, with its
//! progress readable while it runs (see [`crate::releases`]).

use ota_delta::generate::Progress;

use crate::releases::BuildProgress;

/// Runs `f` on a new thread named `ota-build` whose nice value is raised to
/// `nice` (Linux: a per-thread property, inherited by the threads it
/// creates, so the generator's worker pool runs at the same priority) and
/// returns its result. A thread of its own rather than tokio's blocking
/// pool, whose reused threads would keep the lowered priority.
///
/// A nice value that cannot be set (not Linux, or a seccomp filter) leaves
/// the build at normal priority, with a warning: slower check-ins during
/// builds, not a failed build.
///
/// # Cancel safety
/// Dropping the returned future does not stop the thread: it runs `f` to
/// its end and its result is dropped. Stop `f` itself (the generator's
/// [`Progress::cancel`]) to end it early.
pub async fn run_low_priority<T: Send + 'static>(
    nice: i32,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("ota-build".into())
        .spawn(move || {
            if let Err(e) = set_own_nice(nice) {
                tracing::warn!(nice, error = %e, "could not lower the build thread's priority; builds compete with check-ins");
            }
            let _ = tx.send(f());
        })
        .map_err(|e| format!("starting a build thread: {e}"))?;
    rx.await
        .map_err(|_| "the build thread panicked".to_string())
}

/// Sets the calling thread's nice value (Linux: `setpriority` on the thread
/// id affects that thread alone).
fn set_own_nice(nice: i32) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: plain system calls on the calling thread's own id.
        let r = unsafe {
            let tid = libc::gettid();
            libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice)
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = nice;
        Err(std::io::Error::other("per-thread priority is Linux-only"))
    }
}

/// The builder's side of a running build: the generator's counters and the
/// steps after it.
pub(crate) struct LiveBuild {
    pub(crate) gen_progress: Progress,
    /// 0 generating, 1 signing, 2 storing.
    pub(crate) step: std::sync::atomic::AtomicU8,
    pub(crate) started: std::time::Instant,
}

impl LiveBuild {
    pub(crate) fn view(&self) -> BuildProgress {
        let (phase, done, total) = self.gen_progress.snapshot();
        let phase = match self.step.load(std::sync::atomic::Ordering::Relaxed) {
            0 => phase.name(),
            1 => "signing",
            _ => "storing",
        };
        BuildProgress {
            phase: phase.into(),
            done_bytes: done,
            total_bytes: total,
            elapsed_secs: self.started.elapsed().as_secs_f64(),
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::run_low_priority;

    /// The nice value of the calling thread, as the kernel reports it
    /// (`/proc/thread-self/stat`, field 19).
    fn own_nice() -> i32 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        // Fields after the command name, which may contain spaces.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        rest.split_whitespace().nth(16).unwrap().parse().unwrap()
    }

    /// Regression (issue 18): builds ran on one thread of tokio's blocking
    /// pool at normal priority, and `app.rs` gave them half the cores so
    /// check-ins kept theirs: on 2 cores one build thread, the other core
    /// idle. A build now runs on a thread of its own at a low priority, and
    /// the generator's worker pool, which that thread creates, inherits it.
    #[tokio::test]
    async fn build_threads_run_at_low_priority_and_the_generator_pool_inherits_it() {
        let before = own_nice();
        let (build, workers, name) = run_low_priority(19, || {
            // As `ota_delta::generate` builds its pool: from the build thread.
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(3)
                .build()
                .unwrap();
            let workers = pool.broadcast(|_| own_nice());
            (
                own_nice(),
                workers,
                std::thread::current().name().map(String::from),
            )
        })
        .await
        .unwrap();
        assert_eq!(build, 19, "the build thread's nice value");
        assert_eq!(workers, vec![19; 3], "the generator workers' nice values");
        assert_eq!(name.as_deref(), Some("ota-build"));
        assert_eq!(own_nice(), before, "the caller's priority is unchanged");
    }
}

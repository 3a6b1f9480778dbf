//! Keeping the pool's threads awake through a call.
//!
//! A network runs dozens of parallel loops per image, many shorter than 0.1 ms. Rayon parks a
//! thread that finds no work within microseconds, and waking it takes tens of microseconds on
//! these machines: the loops after a short serial stretch would start on one thread and be
//! joined by the other late, by a varying amount. So a call starts one helper per other thread
//! of the pool, which spins taking the pool's pending work until the call returns.
//!
//! A helper must start on a thread that is not itself inside the call's work: rayon lets a
//! thread that waits for a stolen job run other jobs meanwhile, and a helper started there
//! would sit on top of that wait, spinning, while the call waited for the job underneath (an
//! earlier version started helpers whenever a thread picked them up and showed such stalls,
//! about 1.4 ms per call in some processes). So the call waits until its helpers have started,
//! on threads it has given no work yet, before it begins; a helper that starts later returns at
//! once. A helper that finds no work for [`IDLE`] stops too, which bounds what a helper started
//! inside another caller's work (concurrent calls on one pool) can hold up.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long a call waits for its helpers to start.
const START: Duration = Duration::from_micros(500);

/// How long a helper spins without finding work before it stops.
const IDLE: Duration = Duration::from_millis(1);

/// Set in [`Helpers::started`] once the call has begun: later helpers return at once.
const CLOSED: usize = 1 << (usize::BITS - 1);

/// The shared state of one call's helpers.
struct Helpers {
    /// Helpers that have started, and [`CLOSED`].
    started: AtomicUsize,
    /// Set when the call has returned (or unwound).
    done: AtomicBool,
}

impl Helpers {
    /// One helper: registers unless the call has begun, then spins taking pending work.
    fn help(&self) {
        let mut seen = self.started.load(Ordering::Acquire);
        loop {
            if seen & CLOSED != 0 {
                return;
            }
            match self.started.compare_exchange_weak(
                seen,
                seen + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(now) => seen = now,
            }
        }
        let mut last_work = Instant::now();
        let mut spins = 0u32;
        while !self.done.load(Ordering::Acquire) {
            if rayon::yield_now() == Some(rayon::Yield::Executed) {
                last_work = Instant::now();
                continue;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(64) && last_work.elapsed() > IDLE {
                return;
            }
            std::hint::spin_loop();
        }
    }
}

/// Ends the helpers' spinning when the call returns or unwinds.
struct Done<'a>(&'a AtomicBool);

impl Drop for Done<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Runs `f` on the current rayon pool with the pool's other threads kept awake while it runs
/// (see the module's documentation).
pub(super) fn with_threads_awake<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let threads = rayon::current_num_threads();
    if threads == 1 {
        return f();
    }
    let helpers = Helpers {
        started: AtomicUsize::new(0),
        done: AtomicBool::new(false),
    };
    rayon::scope(|s| {
        for _ in 1..threads {
            s.spawn(|_| helpers.help());
        }
        // The spawned helpers wait in this thread's queue, where idle threads steal them.
        let deadline = Instant::now() + START;
        while helpers.started.load(Ordering::Acquire) < threads - 1 && Instant::now() < deadline {
            std::hint::spin_loop();
        }
        helpers.started.fetch_or(CLOSED, Ordering::AcqRel);
        let _done = Done(&helpers.done);
        f()
    })
}

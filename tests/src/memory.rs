//! Memory checks that can fail: a figure (a process's resident set size, or the bytes this
//! process's heap holds) sampled over time by a thread of its own, and checks of its growth
//! against a bound the caller derives from its workload.
//!
//! Two RSS readings taken at two chosen moments say little: the allocator keeps freed memory
//! (so growth can hide in what an earlier test freed), other work in the process comes and
//! goes, and a missing `/proc` reads as zero. So a [`Sampler`] samples every `every` from its
//! start, a window's figure is its *highest* sample (a burst between two readings is not
//! missed), and a window without a sample, or a figure that cannot be read, fails the check
//! instead of passing it. Where the allocator's retention would hide growth, sample the live
//! heap instead: [`Heap`] is a global allocator that counts it ([`Sampler::heap`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cap::Cap;

use crate::ledger::rss_kib;

/// The system allocator, counting the bytes it holds: declare it as the binary's
/// `#[global_allocator]` (`static HEAP: Heap = memory::heap();`) to sample the live heap.
pub type Heap = Cap<std::alloc::System>;

/// A [`Heap`] without a limit.
pub const fn heap() -> Heap {
    Cap::new(std::alloc::System, usize::MAX)
}

/// Samples kept before the oldest are thinned out (every other one dropped): a bound on the
/// sampler's own memory, whatever the run's length.
const MAX_SAMPLES: usize = 4096;

/// Samples of a figure in KiB (RSS, live heap), taken by a background thread until dropped.
pub struct Sampler {
    samples: Arc<Mutex<Vec<(Instant, u64)>>>,
    read: Arc<dyn Fn() -> Option<u64> + Send + Sync>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler")
            .field("samples", &self.lock().len())
            .finish_non_exhaustive()
    }
}

/// The RSS figures of a stretch of time, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RssWindow {
    /// The first sample.
    pub first: u64,
    /// The last sample.
    pub last: u64,
    /// The highest sample.
    pub max: u64,
    /// How many samples.
    pub samples: usize,
}

impl RssWindow {
    /// The figures of `samples` (KiB, in time order), `None` when there are none.
    pub fn of(samples: &[u64]) -> Option<Self> {
        Some(Self {
            first: *samples.first()?,
            last: *samples.last()?,
            max: samples.iter().copied().max()?,
            samples: samples.len(),
        })
    }
}

impl Sampler {
    /// Samples the RSS of process `pid` (this one for `None`) every `every`. Fails when it
    /// cannot be read (no `/proc`): a memory check without figures must not pass.
    pub fn rss(pid: Option<u32>, every: Duration) -> Result<Self, String> {
        Self::start(move || rss_kib(pid), every)
            .ok_or_else(|| format!("cannot read the RSS of {pid:?}"))
    }

    /// Samples the bytes `heap` (this binary's global allocator) holds every `every`.
    pub fn heap(heap: &'static Heap, every: Duration) -> Self {
        // The figure of a counting allocator is always there.
        Self::start(move || Some((heap.allocated() / 1024) as u64), every)
            .unwrap_or_else(|| unreachable!("a heap figure is always read"))
    }

    /// Samples what `read` says (KiB) every `every`; `None` when it says nothing at first.
    pub fn start(
        read: impl Fn() -> Option<u64> + Send + Sync + 'static,
        every: Duration,
    ) -> Option<Self> {
        let read: Arc<dyn Fn() -> Option<u64> + Send + Sync> = Arc::new(read);
        let first = read()?;
        let samples = Arc::new(Mutex::new(vec![(Instant::now(), first)]));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (samples, stop, read) =
                (Arc::clone(&samples), Arc::clone(&stop), Arc::clone(&read));
            std::thread::spawn(move || {
                let mut every = every;
                while !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(every);
                    let Some(kib) = read() else { break };
                    let mut samples = samples.lock().unwrap_or_else(PoisonError::into_inner);
                    samples.push((Instant::now(), kib));
                    if samples.len() >= MAX_SAMPLES {
                        // Keep every other sample and sample half as often: bounded, and
                        // still spread over the whole run.
                        let mut i = 0;
                        samples.retain(|_| {
                            i += 1;
                            i % 2 == 1
                        });
                        every *= 2;
                    }
                }
            })
        };
        Some(Self {
            samples,
            read,
            stop,
            thread: Some(thread),
        })
    }

    /// Takes a sample now (so that a window ending now has its last figure).
    pub fn sample_now(&self) {
        if let Some(kib) = (self.read)() {
            self.lock().push((Instant::now(), kib));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Instant, u64)>> {
        self.samples.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The samples taken from `from` to `to`, in KiB.
    pub fn samples(&self, from: Instant, to: Instant) -> Vec<u64> {
        self.lock()
            .iter()
            .filter(|(at, _)| *at >= from && *at <= to)
            .map(|(_, kib)| *kib)
            .collect()
    }

    /// The figures of the samples from `from` to `to`.
    pub fn window(&self, from: Instant, to: Instant) -> Option<RssWindow> {
        RssWindow::of(&self.samples(from, to))
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Checks that the RSS of `later` rose at most `allowed_kib` above the highest of `baseline`
/// (both windows of one sampler). Returns the growth in KiB, or why the check fails: too much
/// growth, or a window without samples.
pub fn check_growth(
    baseline: Option<RssWindow>,
    later: Option<RssWindow>,
    allowed_kib: u64,
) -> Result<u64, String> {
    let baseline = baseline.ok_or("no RSS sample in the baseline window")?;
    let later = later.ok_or("no RSS sample in the window checked")?;
    let growth = later.max.saturating_sub(baseline.max);
    if growth > allowed_kib {
        return Err(format!(
            "grew by {growth} KiB (from a peak of {} KiB to {} KiB), more than the {allowed_kib} \
             KiB the workload explains",
            baseline.max, later.max
        ));
    }
    Ok(growth)
}

/// Checks that a long run's RSS is flat: the highest sample of its last quarter is at most
/// `allowed_kib` above the highest of its first quarter (a leak grows with the calls made, so
/// it shows between the two; a burst that comes and goes does not). Needs at least 8 samples.
/// Returns the growth in KiB.
pub fn check_flat(samples: &[u64], allowed_kib: u64) -> Result<u64, String> {
    if samples.len() < 8 {
        return Err(format!(
            "{} RSS samples are too few to tell a trend",
            samples.len()
        ));
    }
    let quarter = samples.len() / 4;
    check_growth(
        RssWindow::of(&samples[..quarter]),
        RssWindow::of(&samples[samples.len() - quarter..]),
        allowed_kib,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[global_allocator]
    static HEAP: Heap = heap();

    #[test]
    fn growth_within_the_bound_passes_and_beyond_it_fails() {
        let baseline = RssWindow::of(&[100, 140, 120]);
        assert_eq!(
            check_growth(baseline, RssWindow::of(&[130, 150]), 20),
            Ok(10)
        );
        let leak = check_growth(baseline, RssWindow::of(&[150, 170, 200]), 20);
        assert!(leak
            .expect_err("60 KiB over a 20 KiB bound")
            .contains("grew by 60"));
    }

    #[test]
    fn a_window_without_samples_fails() {
        assert!(check_growth(None, RssWindow::of(&[1]), 1 << 40).is_err());
        assert!(check_growth(RssWindow::of(&[1]), None, 1 << 40).is_err());
        assert!(check_flat(&[1, 1, 1], 1 << 40).is_err());
    }

    #[test]
    fn a_steady_climb_is_not_flat_and_noise_is() {
        // 1 MiB per sample: a leak proportional to the work done.
        let leak: Vec<u64> = (0..40).map(|i| 50_000 + i * 1024).collect();
        assert!(check_flat(&leak, 8 * 1024).is_err());
        // Bursts of 6 MiB that come and go, all through the run.
        let noise: Vec<u64> = (0..40)
            .map(|i| 50_000 + if i % 3 == 0 { 6 * 1024 } else { 0 })
            .collect();
        assert_eq!(check_flat(&noise, 8 * 1024), Ok(0));
    }

    /// The RSS sampler on this very process: memory allocated, touched and freed again before
    /// the check passes; 64 MiB still held (a deliberate leak) fails a 32 MiB bound.
    #[test]
    fn the_rss_sampler_sees_a_real_leak() {
        let sampler = Sampler::rss(None, Duration::from_millis(5)).expect("RSS readable");
        leak_or_not(&sampler, true);
    }

    /// The same through the heap counter, with memory never touched: the heap counts it, the
    /// RSS does not (so this test cannot leave memory the allocator keeps to the other).
    #[test]
    fn the_heap_sampler_sees_a_real_leak() {
        leak_or_not(&Sampler::heap(&HEAP, Duration::from_millis(5)), false);
    }

    /// One leak test at a time: each would see the other's leak.
    static ALONE: Mutex<()> = Mutex::new(());

    fn leak_or_not(sampler: &Sampler, touch: bool) {
        const MIB: usize = 1024 * 1024;
        let _alone = ALONE.lock().unwrap_or_else(PoisonError::into_inner);
        let touched = |mib: usize| {
            std::hint::black_box(if touch {
                vec![1u8; mib * MIB]
            } else {
                Vec::with_capacity(mib * MIB)
            })
        };
        // Baseline: bursts of 16 MiB that are freed.
        let start = Instant::now();
        for _ in 0..5 {
            drop(touched(16));
            std::thread::sleep(Duration::from_millis(20));
        }
        sampler.sample_now();
        let baseline_end = Instant::now();
        // Noise only: the same bursts again.
        for _ in 0..5 {
            drop(touched(16));
            std::thread::sleep(Duration::from_millis(20));
        }
        sampler.sample_now();
        let noise_end = Instant::now();
        let baseline = sampler.window(start, baseline_end);
        let noise = check_growth(baseline, sampler.window(baseline_end, noise_end), 32 * 1024);
        assert!(noise.is_ok(), "freed bursts are not a leak: {noise:?}");
        // The leak: kept until after the check.
        let leaked: Vec<Vec<u8>> = (0..4).map(|_| touched(16)).collect();
        std::thread::sleep(Duration::from_millis(50));
        sampler.sample_now();
        let leak = check_growth(
            baseline,
            sampler.window(noise_end, Instant::now()),
            32 * 1024,
        );
        assert!(leak.is_err(), "64 MiB held must fail: {leak:?}");
        drop(leaked);
    }
}

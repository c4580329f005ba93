//! What the bench measures while it runs: each call's latency in an HDR histogram, and each
//! call's end in a timeline of fixed slots (for calls/s over time). Each calling task keeps its
//! own and the bench adds them up at the end, so the calls share no lock or counter for them.

use std::time::Duration;

use hdrhistogram::Histogram;

/// The largest latency recorded as itself, in µs (an hour); longer ones count as this.
const HIGHEST_US: u64 = 3_600_000_000;
/// Significant decimal digits the histogram keeps: values within 0.1 %.
const SIGNIFICANT_DIGITS: u8 = 3;

/// Call latencies, in microseconds.
#[derive(Debug, Clone)]
pub struct Latencies {
    histogram: Histogram<u64>,
}

/// The figures the bench reports, in µs, each within 0.1 % of the exact value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Percentiles {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// The longest call.
    pub max: u64,
}

impl Latencies {
    /// None yet.
    pub fn new() -> Self {
        // 1 µs .. an hour at 3 digits is a valid configuration: `new_with_bounds` only fails
        // for low < 1, high < 2 * low or digits > 5.
        let histogram =
            Histogram::new_with_bounds(1, HIGHEST_US, SIGNIFICANT_DIGITS).expect("valid bounds");
        Self { histogram }
    }

    /// Records one call that took `took` (an hour or more counts as an hour).
    pub fn record(&mut self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.histogram.saturating_record(us.clamp(1, HIGHEST_US));
    }

    /// Adds `other`'s calls to these.
    pub fn merge(&mut self, other: &Latencies) {
        // Same bounds on both sides: `add` cannot fail for lack of range.
        let _ = self.histogram.add(&other.histogram);
    }

    /// Calls recorded.
    pub fn len(&self) -> u64 {
        self.histogram.len()
    }

    /// Whether no call was recorded.
    pub fn is_empty(&self) -> bool {
        self.histogram.is_empty()
    }

    /// The mean, in µs (0 when empty).
    pub fn mean(&self) -> f64 {
        self.histogram.mean()
    }

    /// p50, p90, p99, p99.9 and max (all 0 when empty).
    pub fn percentiles(&self) -> Percentiles {
        let at = |q: f64| self.histogram.value_at_quantile(q);
        Percentiles {
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            p999: at(0.999),
            max: self.histogram.max(),
        }
    }

    /// The calls in `bins` equal bins from 0 to `upper` µs, as (bin's start, bin's end, calls);
    /// calls above `upper` are left out.
    pub fn bins(&self, upper: u64, bins: u32) -> Vec<(u64, u64, u64)> {
        let bins = bins.max(1);
        let width = upper.div_ceil(u64::from(bins)).max(1);
        let mut out: Vec<(u64, u64, u64)> = (0..u64::from(bins))
            .map(|i| (i * width, (i + 1) * width, 0))
            .collect();
        for v in self.histogram.iter_recorded() {
            let value = self.histogram.highest_equivalent(v.value_iterated_to());
            if value > upper {
                continue;
            }
            // The bound itself falls just past the last bin when `upper` is a whole number of
            // bins: it belongs in the last.
            let i = usize::try_from(value / width)
                .unwrap_or(usize::MAX)
                .min(out.len() - 1);
            out[i].2 += v.count_at_value();
        }
        out
    }
}

impl Default for Latencies {
    fn default() -> Self {
        Self::new()
    }
}

/// Calls ended, counted by slot since the run started. Slots start at [`Timeline::FIRST_SLOT`]
/// and double in width whenever a run outgrows [`Timeline::MAX_SLOTS`] of them, so a timeline
/// stays small (32 KiB) however long the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeline {
    slot: Duration,
    counts: Vec<u64>,
}

impl Timeline {
    /// The width of a slot when the run starts.
    pub const FIRST_SLOT: Duration = Duration::from_millis(10);
    /// The most slots a timeline keeps.
    pub const MAX_SLOTS: usize = 4096;

    /// None yet.
    pub fn new() -> Self {
        Self {
            slot: Self::FIRST_SLOT,
            counts: Vec::new(),
        }
    }

    /// Counts a call that ended `at` after the start.
    pub fn record(&mut self, at: Duration) {
        let mut i = self.index(at);
        while i >= Self::MAX_SLOTS {
            self.coarsen();
            i = self.index(at);
        }
        if self.counts.len() <= i {
            self.counts.resize(i + 1, 0);
        }
        self.counts[i] += 1;
    }

    /// Adds `other`'s calls to these (in the wider of the two slots).
    pub fn merge(&mut self, other: &Timeline) {
        let mut other = other.clone();
        while self.slot < other.slot {
            self.coarsen();
        }
        while other.slot < self.slot {
            other.coarsen();
        }
        if self.counts.len() < other.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
    }

    /// Calls counted.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The width of a slot now.
    pub fn slot(&self) -> Duration {
        self.slot
    }

    /// Calls/s over a run that lasted `run`, as (seconds since the start at the window's end,
    /// calls/s in the window), in at most `points` windows of whole slots. The last window
    /// ends with the run, not with its last slot.
    pub fn rates(&self, points: usize, run: Duration) -> Vec<(f64, f64)> {
        let per_window = self.counts.len().div_ceil(points.max(1)).max(1);
        let slot = self.slot.as_secs_f64();
        let run = run.as_secs_f64();
        self.counts
            .chunks(per_window)
            .enumerate()
            .map(|(i, window)| {
                let start = (i * per_window) as f64 * slot;
                let end = (start + window.len() as f64 * slot).min(run.max(start + 0.001));
                let calls: u64 = window.iter().sum();
                (end, calls as f64 / (end - start))
            })
            .collect()
    }

    fn index(&self, at: Duration) -> usize {
        usize::try_from(at.as_nanos() / self.slot.as_nanos()).unwrap_or(usize::MAX)
    }

    /// Doubles the slots' width, adding up pairs.
    fn coarsen(&mut self) {
        self.counts = self
            .counts
            .chunks(2)
            .map(|pair| pair.iter().sum())
            .collect();
        self.slot *= 2;
    }
}

impl Default for Timeline {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn latencies(us: impl IntoIterator<Item = u64>) -> Latencies {
        let mut l = Latencies::new();
        for v in us {
            l.record(Duration::from_micros(v));
        }
        l
    }

    #[test]
    fn percentiles_of_one_to_ten_thousand() {
        let l = latencies(1..=10_000);
        assert_eq!(l.len(), 10_000);
        let p = l.percentiles();
        // Within the histogram's 0.1 %.
        let near = |got: u64, want: u64| got.abs_diff(want) * 1000 <= want;
        assert!(near(p.p50, 5_000), "{p:?}");
        assert!(near(p.p90, 9_000), "{p:?}");
        assert!(near(p.p99, 9_900), "{p:?}");
        assert!(near(p.p999, 9_990), "{p:?}");
        assert!(near(p.max, 10_000), "{p:?}");
        assert!((l.mean() - 5_000.5).abs() < 10.0, "{}", l.mean());
    }

    #[test]
    fn a_slow_tail_shows_only_in_the_high_percentiles() {
        // 995 calls of 1 ms, 5 of 1 s.
        let l = latencies(std::iter::repeat_n(1_000, 995).chain(std::iter::repeat_n(1_000_000, 5)));
        let p = l.percentiles();
        assert_eq!((p.p50, p.p90, p.p99), (1_000, 1_000, 1_000), "{p:?}");
        assert!(p.p999 >= 999_000, "{p:?}");
        assert!(p.max >= 999_000, "{p:?}");
    }

    #[test]
    fn merged_is_as_if_recorded_together() {
        let mut a = latencies(1..=500);
        a.merge(&latencies(501..=1_000));
        assert_eq!(a.percentiles(), latencies(1..=1_000).percentiles());
    }

    #[test]
    fn empty_and_out_of_range() {
        let empty = Latencies::new();
        assert!(empty.is_empty());
        assert_eq!(empty.percentiles().max, 0);
        // Zero counts as 1 µs, beyond an hour as an hour: recorded, never refused.
        let l = latencies([0, u64::MAX / 2]);
        assert_eq!(l.len(), 2);
        assert_eq!(l.percentiles().p50, 1);
        assert!(l.percentiles().max >= HIGHEST_US);
    }

    #[test]
    fn bins_count_every_call_up_to_the_bound() {
        let l = latencies((1..=100).chain([5_000]));
        let bins = l.bins(100, 10);
        assert_eq!(bins.len(), 10);
        assert_eq!(bins[0], (0, 10, 9)); // 1..=9
        assert_eq!(bins[9], (90, 100, 11)); // 90..=100, the bound in the last bin
        assert_eq!(bins.iter().map(|b| b.2).sum::<u64>(), 100); // 5 000 left out
    }

    #[test]
    fn timeline_rates() {
        let mut a = Timeline::new();
        let mut b = Timeline::new();
        for ms in 0..1_000 {
            // 1 000 calls/s for a second, split over two tasks.
            if ms % 2 == 0 { &mut a } else { &mut b }.record(Duration::from_millis(ms));
        }
        a.merge(&b);
        assert_eq!(a.total(), 1_000);
        let second = Duration::from_secs(1);
        let rates = a.rates(10, second);
        assert_eq!(rates.len(), 10);
        for (i, (t, r)) in rates.iter().enumerate() {
            assert!((t - (i + 1) as f64 * 0.1).abs() < 1e-9, "{rates:?}");
            assert!((r - 1_000.0).abs() < 1e-6, "{rates:?}");
        }
        // Windows of whole slots: 100 slots in 3 windows of 34, the last one shorter.
        let rates = a.rates(3, second);
        assert_eq!(rates.len(), 3);
        assert!((rates[0].1 - 1_000.0).abs() < 1e-6, "{rates:?}");
        assert!((rates[2].0 - 1.0).abs() < 1e-9, "{rates:?}");
        assert!((rates[2].1 - 1_000.0).abs() < 1e-6, "{rates:?}");
    }

    #[test]
    fn the_last_window_ends_with_the_run() {
        // 10 calls in the first 5 ms of a 10 ms slot: 2 000 calls/s, not 1 000.
        let mut t = Timeline::new();
        for us in 0..10 {
            t.record(Duration::from_micros(us * 500));
        }
        let rates = t.rates(10, Duration::from_millis(5));
        assert_eq!(rates.len(), 1);
        assert!((rates[0].1 - 2_000.0).abs() < 1e-6, "{rates:?}");
    }

    #[test]
    fn a_long_run_widens_the_slots_and_stays_bounded() {
        let mut long = Timeline::new();
        let mut short = Timeline::new();
        for s in 0..3_600 {
            long.record(Duration::from_secs(s));
        }
        short.record(Duration::ZERO);
        assert!(long.counts.len() <= Timeline::MAX_SLOTS);
        assert_eq!(long.slot(), Duration::from_millis(1_280));
        // Merged both ways: the wider slots win, nothing is lost.
        let mut a = short.clone();
        a.merge(&long);
        long.merge(&short);
        assert_eq!(a, long);
        assert_eq!(a.total(), 3_601);
    }
}

//! CPU time and memory of a process (Linux /proc), for the programs' per-request figures and
//! the test suite's memory checks.

use std::time::Duration;

/// CPU time (user + system) that process `pid` (`None`: this one) has used, from /proc (Linux);
/// zero elsewhere or when the process is gone.
///
/// The larger of two readings: `/proc/<pid>/stat`'s utime + stime, which counts threads that
/// have exited but only in 10 ms ticks (at 2,500 calls that is 4 µs per call), and the sum of
/// the live threads' run time in nanoseconds (`/proc/<pid>/task/*/schedstat`, first field).
/// Both fall short of the truth, each by what it misses, so the larger is the closer.
pub fn process_cpu_time(pid: Option<u32>) -> Duration {
    let dir = pid.map_or_else(|| "/proc/self".to_owned(), |p| format!("/proc/{p}"));
    ticks_cpu_time(&dir).max(threads_run_time(&dir))
}

/// utime + stime of `<dir>/stat`, in 10 ms ticks.
fn ticks_cpu_time(dir: &str) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("{dir}/stat")) else {
        return Duration::ZERO;
    };
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks: u64 = fields
        .get(11..13)
        .map_or(0, |f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum());
    // Linux reports them in USER_HZ, 100 on every architecture we build for.
    Duration::from_millis(ticks * 10)
}

/// The run time of the live threads of the process at `dir`, in ns (zero where the kernel
/// keeps no schedstat).
fn threads_run_time(dir: &str) -> Duration {
    let Ok(tasks) = std::fs::read_dir(format!("{dir}/task")) else {
        return Duration::ZERO;
    };
    let ns: u64 = tasks
        .filter_map(Result::ok)
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|line| line.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(ns)
}

/// A `kB` field (`VmRSS:`, `VmHWM:`, ...) of `/proc/<pid>/status` of process `pid` (`None`: this
/// one), in KiB; `None` elsewhere or when the process is gone.
pub fn proc_status_kib(pid: Option<u32>, field: &str) -> Option<u64> {
    let path = pid.map_or_else(
        || "/proc/self/status".to_owned(),
        |p| format!("/proc/{p}/status"),
    );
    let status = std::fs::read_to_string(path).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_grows_with_work_and_is_zero_for_no_process() {
        let before = process_cpu_time(None);
        // Burn a few ms of CPU.
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_millis(30) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let after = process_cpu_time(None);
        assert!(after > before, "{before:?} -> {after:?}");
        assert_eq!(process_cpu_time(Some(u32::MAX)), Duration::ZERO);
    }
}

//! CPU time and memory of a process (Linux /proc), for the programs' per-request figures and
//! the test suite's memory checks.

use std::time::Duration;

/// CPU time (user + system) that process `pid` (`None`: this one) has used, from /proc (Linux);
/// zero elsewhere or when the process is gone.
pub fn process_cpu_time(pid: Option<u32>) -> Duration {
    let path = pid.map_or_else(
        || "/proc/self/stat".to_owned(),
        |p| format!("/proc/{p}/stat"),
    );
    let Ok(stat) = std::fs::read_to_string(path) else {
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

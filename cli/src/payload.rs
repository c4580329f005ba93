//! What the bench sends and expects back, and the echo service that `--payload` needs: the
//! Fibonacci request by default, or `--payload BYTES` of body that a `server --echo` returns as
//! it came. Also the figures a payload or concurrency curve reports: bytes per second each way
//! and the client's resident memory (Linux `/proc/self/status`).

use amqp_rpc_driver::{HandlerError, Request};
use bytes::Bytes;

use crate::cpu::proc_status_kib;
use crate::fib::fib;

/// The request body of every call and the reply body that proves it was answered right.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// What each call sends.
    pub body: Bytes,
    /// What each reply must be; `None`: no right answer exists (fib(n) out of range), every
    /// call counts as an error.
    pub expected: Option<Bytes>,
}

impl Workload {
    /// `payload` bytes echoed back (`Some`), else fib(n) asked of the Fibonacci service.
    pub fn new(payload: Option<usize>, n: u32) -> Self {
        match payload {
            Some(len) => {
                let body = pattern(len);
                Self {
                    expected: Some(body.clone()),
                    body,
                }
            }
            None => Self {
                body: Bytes::from(n.to_string()),
                expected: fib(n).map(|v| Bytes::from(v.to_string())),
            },
        }
    }

    /// Whether `reply` is the right answer.
    pub fn is_right(&self, reply: &[u8]) -> bool {
        self.expected.as_deref() == Some(reply)
    }
}

/// `len` bytes that are not all alike (a byte lost, doubled or moved breaks the comparison):
/// the byte at offset i is i mod 251, a prime, so the pattern does not line up with any power
/// of two (frame sizes, buffer sizes).
pub fn pattern(len: usize) -> Bytes {
    // `i % 251 < 251 <= u8::MAX`: the cast keeps every value.
    (0..len)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into()
}

/// The echo service (`server --echo`): the reply is the request's body, as it came. Moves the
/// body's [`Bytes`] handle: no copy here.
pub async fn echo_handler(request: Request) -> Result<Bytes, HandlerError> {
    Ok(request.body)
}

/// This process's resident memory now and at its peak, in KiB (`VmRSS`, `VmHWM` of
/// `/proc/self/status`); zeros where /proc cannot be read.
pub fn resident_kib() -> ResidentMemory {
    ResidentMemory {
        now_kib: proc_status_kib(None, "VmRSS:").unwrap_or(0),
        peak_kib: proc_status_kib(None, "VmHWM:").unwrap_or(0),
    }
}

/// Resident memory of this process, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResidentMemory {
    /// Resident now (`VmRSS`).
    pub now_kib: u64,
    /// The most it has been resident (`VmHWM`).
    pub peak_kib: u64,
}

/// The figures a run adds to the bench's JSON line for the payload and concurrency curves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CurveFigures {
    /// Body bytes of each request.
    pub payload_bytes: usize,
    /// Client connections the calls were spread over.
    pub connections: usize,
    /// Request body bytes sent per second, in MB (10^6 bytes).
    pub request_mb_per_sec: f64,
    /// Reply body bytes received per second, in MB.
    pub reply_mb_per_sec: f64,
    /// Resident memory once connected and warmed up, before the first measured call.
    pub idle: ResidentMemory,
    /// Resident memory after the last call.
    pub after: ResidentMemory,
}

impl CurveFigures {
    /// The fields as JSON members, each preceded by a comma, to append inside the JSON line.
    pub fn json_members(&self) -> String {
        format!(
            ",\"payload_bytes\":{},\"connections\":{},\"request_mb_per_sec\":{:.2},\"reply_mb_per_sec\":{:.2},\"rss_idle_kib\":{},\"rss_peak_kib\":{}",
            self.payload_bytes,
            self.connections,
            self.request_mb_per_sec,
            self.reply_mb_per_sec,
            self.idle.now_kib,
            self.after.peak_kib,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_workload_expects_its_own_body_back() {
        let w = Workload::new(Some(1000), 30);
        assert_eq!(w.body.len(), 1000);
        assert!(w.is_right(&w.body.clone()));
        let mut wrong = w.body.to_vec();
        wrong.swap(0, 1);
        assert!(!w.is_right(&wrong));
        assert!(!w.is_right(&w.body[..999]));
        // The pattern is not constant: a shifted copy differs.
        assert_ne!(&w.body[..500], &w.body[1..501]);
    }

    #[test]
    fn fib_workload_is_the_tutorials() {
        let w = Workload::new(None, 30);
        assert_eq!(w.body, Bytes::from_static(b"30"));
        assert!(w.is_right(b"832040"));
        assert!(!w.is_right(b"30"));
        assert_eq!(Workload::new(None, 187).expected, None);
        assert_eq!(Workload::new(Some(0), 1).body.len(), 0);
    }

    #[test]
    fn resident_memory_is_read_on_linux() {
        let m = resident_kib();
        if cfg!(target_os = "linux") {
            assert!(m.now_kib > 0 && m.peak_kib >= m.now_kib, "{m:?}");
        }
    }

    #[test]
    fn json_members_append_to_an_object() {
        let f = CurveFigures {
            payload_bytes: 100,
            connections: 4,
            request_mb_per_sec: 1.5,
            reply_mb_per_sec: 1.25,
            idle: ResidentMemory {
                now_kib: 10,
                peak_kib: 11,
            },
            after: ResidentMemory {
                now_kib: 20,
                peak_kib: 30,
            },
        };
        assert_eq!(
            f.json_members(),
            ",\"payload_bytes\":100,\"connections\":4,\"request_mb_per_sec\":1.50,\"reply_mb_per_sec\":1.25,\"rss_idle_kib\":10,\"rss_peak_kib\":30"
        );
    }
}

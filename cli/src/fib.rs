//! The Fibonacci service of the RabbitMQ RPC tutorial: the one copy that the programs, the
//! end-to-end tests and the examples use.

use amqp_rpc_driver::{HandlerError, Request};
use bytes::Bytes;

/// The largest n whose Fibonacci number fits in a u128 (fib(186) ≈ 3.3 × 10^38).
pub const FIB_MAX: u32 = 186;

/// fib(n), iteratively in u128; `None` for n above [`FIB_MAX`], the largest n whose result fits.
pub fn fib(n: u32) -> Option<u128> {
    if n > FIB_MAX {
        return None;
    }
    let (mut a, mut b) = (0u128, 1u128);
    for _ in 0..n {
        // For n = 186 the last step computes fib(187), which overflows u128; it is never
        // returned (only `a` is), so saturating is enough to avoid the overflow.
        let next = a.saturating_add(b);
        a = b;
        b = next;
    }
    Some(a)
}

/// The Fibonacci service as a [`Server`](amqp_rpc_driver::Server) handler: see [`fib_reply`].
pub async fn fib_handler(request: Request) -> Result<Bytes, HandlerError> {
    fib_reply(&request.body)
}

/// The Fibonacci service's answer to a request body: the body is a decimal `n` (surrounding
/// whitespace allowed) with 0 ≤ n ≤ [`FIB_MAX`]; the reply is fib(n) in decimal. Anything else
/// is refused with an `invalid_request` error reply.
pub fn fib_reply(body: &[u8]) -> Result<Bytes, HandlerError> {
    let invalid = |message: String| HandlerError::Rejected {
        code: "invalid_request".into(),
        message,
    };
    // A number up to 186 needs 3 digits; anything long is refused without being parsed or
    // quoted back in full.
    if body.len() > 64 {
        return Err(invalid(format!(
            "expected a number from 0 to {FIB_MAX}, got {} bytes",
            body.len()
        )));
    }
    let text = std::str::from_utf8(body)
        .map_err(|_| invalid("request is not UTF-8".into()))?
        .trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(format!(
            "expected a number from 0 to {FIB_MAX}, got {text:?}"
        )));
    }
    let n: u32 = text
        .parse()
        .map_err(|_| invalid(format!("{text} is out of range 0..={FIB_MAX}")))?;
    match fib(n) {
        Some(value) => Ok(Bytes::from(value.to_string())),
        None => Err(invalid(format!("{n} is out of range 0..={FIB_MAX}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fib_values() {
        assert_eq!(fib(0), Some(0));
        assert_eq!(fib(1), Some(1));
        assert_eq!(fib(30), Some(832_040));
        assert_eq!(
            fib(FIB_MAX),
            Some(332_825_110_087_067_562_321_196_029_789_634_457_848)
        );
        assert_eq!(fib(FIB_MAX + 1), None);
    }

    #[test]
    fn fib_reply_accepts_numbers_and_rejects_the_rest() {
        assert_eq!(fib_reply(b"30"), Ok(Bytes::from_static(b"832040")));
        assert_eq!(fib_reply(b" 7\n"), Ok(Bytes::from_static(b"13")));
        for bad in [
            &b""[..],
            b"-1",
            b"abc",
            b"187",
            b"99999999999999999999999",
            b"3.5",
            b"\xff\xfe",
            &[b'1'; 100][..],
        ] {
            assert!(
                matches!(fib_reply(bad), Err(HandlerError::Rejected { .. })),
                "{bad:?}"
            );
        }
    }
}

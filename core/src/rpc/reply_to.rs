//! Which `reply_to` addresses a reply can be published to without harm.
//!
//! RabbitMQ 3.10 routes a publish whose routing key is `amq.rabbitmq.reply-to.<a>.<b>`
//! (default exchange) to the channel process whose pid `<a>` encodes (base64 of the Erlang
//! external term format, RabbitMQ "Direct Reply-to"). Measured against 3.10.8 on OTP 25 (see
//! `tests/tests/server_safety.rs`): when the suffix splits at dots into exactly two
//! non-empty parts and the first does not decode to a live channel's pid (`x.y`, a well-formed
//! pid of no process), the broker's channel process crashes and it closes the whole
//! connection with 541 INTERNAL_ERROR; any other suffix (`x`, `a.b.c`) is routed nowhere and
//! dropped. So a request carrying such a name must not be answered: its caller cannot hear,
//! and the attempt kills the server's connection. This check catches every name that cannot
//! decode to a pid; a well-formed pid of a dead channel (a caller that went away) is caught
//! by the server's culprit isolation instead.

use super::DIRECT_REPLY_TO;

/// Whether a reply to `reply_to` could reach anyone without making the broker close the
/// connection: any ordinary queue name, or a direct reply-to name whose pid part decodes to an
/// Erlang pid.
pub(crate) fn is_answerable(reply_to: &str) -> bool {
    let Some(rest) = reply_to.strip_prefix(DIRECT_REPLY_TO) else {
        return true;
    };
    let Some(rest) = rest.strip_prefix('.') else {
        // `amq.rabbitmq.reply-to` itself, or `amq.rabbitmq.reply-toX`: not a direct address;
        // the bare name is rewritten by the broker when the caller publishes, so a request
        // never carries it.
        return !rest.is_empty();
    };
    // Erlang's string:tokens: empty parts do not count.
    let mut parts = rest.split('.').filter(|p| !p.is_empty());
    match (parts.next(), parts.next(), parts.next()) {
        (Some(pid), Some(_key), None) => decode_base64(pid).is_some_and(|t| is_pid_term(&t)),
        // Routed nowhere by the broker: no caller can hear a reply.
        _ => false,
    }
}

/// Standard base64 with padding (Erlang's `base64:decode`), at most 256 bytes out.
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    if bytes.is_empty() || !bytes.len().is_multiple_of(4) || bytes.len() > 344 {
        return None;
    }
    let value = |c: u8| -> Option<u32> {
        Some(u32::from(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        }))
    };
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    let chunks = bytes.len() / 4;
    for (i, chunk) in bytes.chunks(4).enumerate() {
        let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && i + 1 != chunks) {
            return None;
        }
        let mut n = 0u32;
        for &c in &chunk[..4 - pad] {
            n = (n << 6) | value(c)?;
        }
        n <<= 6 * pad as u32;
        let [_, a, b, c] = n.to_be_bytes();
        out.extend_from_slice(&[a, b, c][..3 - pad]);
    }
    Some(out)
}

/// Whether `term` is an Erlang pid in the external term format: version 131, `PID_EXT` (103)
/// or `NEW_PID_EXT` (88), a node atom, then the pid's id, serial and creation (9 or 12 bytes).
fn is_pid_term(term: &[u8]) -> bool {
    let (trailer, rest) = match term {
        [131, 103, rest @ ..] => (9, rest),
        [131, 88, rest @ ..] => (12, rest),
        _ => return false,
    };
    let (len, atom_and_rest) = match rest {
        // ATOM_EXT, ATOM_UTF8_EXT: a 2-byte length.
        [100 | 118, a, b, rest @ ..] => (usize::from(u16::from_be_bytes([*a, *b])), rest),
        // SMALL_ATOM_EXT, SMALL_ATOM_UTF8_EXT: a 1-byte length.
        [115 | 119, n, rest @ ..] => (usize::from(*n), rest),
        _ => return false,
    };
    len > 0
        && atom_and_rest.len() == len + trailer
        && std::str::from_utf8(&atom_and_rest[..len]).is_ok_and(|node| node.contains('@'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_reply_to_names_that_cannot_name_a_pid_are_refused() {
        // Shapes RabbitMQ 3.10.8 produced or was fed (see the module docs).
        let real = "amq.rabbitmq.reply-to.g1h2ABByYWJiaXRAbG9jYWxob3N0AAAwOQAAAAAAAAAB.abc";
        // PID_EXT, as OTP before 23 encodes a pid.
        let old_otp = "amq.rabbitmq.reply-to.g2dkABByYWJiaXRAbG9jYWxob3N0AAAC1wAAAAAA.6XGxKqYrsG3FmhSANTUuzw==";
        for ok in [
            real,
            old_otp,
            "replies",
            "amq.gen-abc",
            "amq.rabbitmq.reply-tox",
        ] {
            assert!(is_answerable(ok), "{ok}");
        }
        for bad in [
            "amq.rabbitmq.reply-to",
            "amq.rabbitmq.reply-to.x",
            "amq.rabbitmq.reply-to.x.y",
            "amq.rabbitmq.reply-to.g2Q.abc",
            "amq.rabbitmq.reply-to..x",
            "amq.rabbitmq.reply-to.a.b.c",
            "amq.rabbitmq.reply-to.AAAA.key",
            "amq.rabbitmq.reply-to.g1h2ABByYWJpdEBsb2NhbGhvc3QAADA5AAAAAAAAAAE=.k",
        ] {
            assert!(!is_answerable(bad), "{bad}");
        }
    }

    #[test]
    fn base64_decodes_with_padding_only_at_the_end() {
        assert_eq!(decode_base64("aGk=").as_deref(), Some(&b"hi"[..]));
        assert_eq!(decode_base64("aGVsbG8h").as_deref(), Some(&b"hello!"[..]));
        assert_eq!(decode_base64("aG=k"), None);
        assert_eq!(decode_base64("aGk"), None);
        assert_eq!(decode_base64("a===",), None);
        assert_eq!(decode_base64("aGk=aGk="), None);
    }
}

//! Correlation ids that nobody can predict: a call's number and a keyed MAC of it.
//!
//! A reply is matched to its call by correlation id alone, so whoever can guess the id of a
//! call in flight can answer it in the caller's name (anyone allowed to publish to the default
//! exchange can publish to a reply queue). The ids of this client therefore carry a 128-bit tag
//! computed from the call number with a secret key (SipHash-2-4 twice, under two independent
//! 128-bit keys: SipHash is a pseudo-random function, "SipHash: a fast short-input PRF",
//! Aumasson and Bernstein, 2012). Seeing any number of ids tells nothing about the tag of the
//! next one, and a forged id is rejected as unknown. The core stays deterministic: the driver
//! draws the key from the operating system once per client.

use std::fmt;

use amq_protocol::types::ShortString;

/// Identifies one call from [`RpcClient::call`](super::RpcClient::call) to its
/// [`ClientEvent::CallEnded`](super::ClientEvent::CallEnded); its correlation id is made from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CallId(pub u64);

/// The secret a client's correlation ids are keyed with: 32 random bytes, drawn once per client
/// by the driver (e.g. from the operating system's random source). `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct CorrelationKey {
    /// Two SipHash keys of two 64-bit words each.
    words: [u64; 4],
}

impl CorrelationKey {
    /// A key from 32 random bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        let mut words = [0u64; 4];
        for (word, chunk) in words.iter_mut().zip(bytes.chunks_exact(8)) {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            *word = u64::from_le_bytes(b);
        }
        Self { words }
    }

    /// A key from the operating system's random source (through `uuid`'s v4 generator: 122
    /// random bits per UUID, two of them). The one place the core reads outside input; the
    /// machines themselves take the key as an argument and stay deterministic.
    pub fn random() -> Self {
        let mut bytes = [0u8; 32];
        bytes[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        bytes[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        Self::from_bytes(bytes)
    }

    /// The tag of call number `call`.
    fn tag(&self, call: u64) -> u128 {
        let msg = call.to_le_bytes();
        let hi = siphash24(self.words[0], self.words[1], &msg);
        let lo = siphash24(self.words[2], self.words[3], &msg);
        (u128::from(hi) << 64) | u128::from(lo)
    }

    /// The correlation id of `call`: its number and its tag, in hex (at most 16 + 1 + 32 bytes,
    /// so always a valid short string).
    pub fn issue(&self, call: CallId) -> ShortString {
        ShortString::from(format!("{:x}.{:032x}", call.0, self.tag(call.0)))
    }

    /// The call a correlation id names, if this key issued it.
    pub fn verify(&self, id: &str) -> Option<CallId> {
        let (number, tag) = id.split_once('.')?;
        if number.is_empty() || number.len() > 16 || tag.len() != 32 {
            return None;
        }
        let call = u64::from_str_radix(number, 16).ok()?;
        let tag = u128::from_str_radix(tag, 16).ok()?;
        (tag == self.tag(call)).then_some(CallId(call))
    }
}

impl fmt::Debug for CorrelationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CorrelationKey(..)")
    }
}

/// SipHash-2-4 of `msg` under the key `(k0, k1)`, as specified in the SipHash paper (§2).
fn siphash24(k0: u64, k1: u64, msg: &[u8]) -> u64 {
    let mut v = [
        k0 ^ 0x736f_6d65_7073_6575,
        k1 ^ 0x646f_7261_6e64_6f6d,
        k0 ^ 0x6c79_6765_6e65_7261,
        k1 ^ 0x7465_6462_7974_6573,
    ];
    let blocks = msg.chunks_exact(8);
    let tail = blocks.remainder();
    for block in blocks {
        let mut b = [0u8; 8];
        b.copy_from_slice(block);
        compress(&mut v, u64::from_le_bytes(b));
    }
    // The last block: the remaining bytes, and the message length mod 256 in the top byte.
    let mut last = (msg.len() as u64 & 0xff) << 56;
    for (i, byte) in tail.iter().enumerate() {
        last |= u64::from(*byte) << (8 * i);
    }
    compress(&mut v, last);
    v[2] ^= 0xff;
    for _ in 0..4 {
        sip_round(&mut v);
    }
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

/// One message block through two SipRounds.
fn compress(v: &mut [u64; 4], m: u64) {
    v[3] ^= m;
    sip_round(v);
    sip_round(v);
    v[0] ^= m;
}

fn sip_round(v: &mut [u64; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13) ^ v[0];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(16) ^ v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(21) ^ v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(17) ^ v[2];
    v[2] = v[2].rotate_left(32);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key 00 01 .. 0f of the paper's test vectors, as two little-endian words.
    const K0: u64 = 0x0706_0504_0302_0100;
    const K1: u64 = 0x0f0e_0d0c_0b0a_0908;

    #[test]
    fn siphash_matches_the_papers_vectors() {
        // Appendix A: the 15-byte message 00 01 .. 0e.
        let msg: Vec<u8> = (0u8..15).collect();
        assert_eq!(siphash24(K0, K1, &msg), 0xa129_ca61_49be_45e5);
        // The reference implementation's first vector: the empty message.
        assert_eq!(siphash24(K0, K1, &[]), 0x726f_db47_dd0e_0e31);
    }

    #[test]
    fn ids_verify_and_forgeries_do_not() {
        let key = CorrelationKey::from_bytes([7; 32]);
        let id = key.issue(CallId(42));
        assert_eq!(key.verify(id.as_str()), Some(CallId(42)));
        // The next call's id, guessed from this one by changing the number: rejected.
        let (_, tag) = id.as_str().split_once('.').unwrap_or_default();
        assert_eq!(key.verify(&format!("2b.{tag}")), None);
        // Another client's key does not verify ours.
        let other = CorrelationKey::from_bytes([8; 32]);
        assert_eq!(other.verify(id.as_str()), None);
        for junk in [
            "",
            ".",
            "2a",
            "2a.",
            "zz.00",
            "2a.0123",
            &format!("-1.{tag}"),
        ] {
            assert_eq!(key.verify(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn tags_of_consecutive_calls_share_nothing_visible() {
        // Not a proof (SipHash's analysis is), but catches a tag that leaks the counter.
        let key = CorrelationKey::from_bytes([1; 32]);
        let a = key.tag(1);
        let b = key.tag(2);
        assert_ne!(a, b);
        assert!((a ^ b).count_ones() > 32, "{a:x} {b:x}");
    }

    #[test]
    fn debug_hides_the_key() {
        let key = CorrelationKey::from_bytes([0xab; 32]);
        assert_eq!(format!("{key:?}"), "CorrelationKey(..)");
    }
}

//! The frame decoder on arbitrary bytes: each call yields a frame, asks for more bytes, or
//! returns a typed error; it never panics, aborts or allocates much more than frame_max.
//!
//! The first byte picks the decoder's frame_max (the pre-tune 8192, or a tuned value up to
//! 1 MiB); the rest is the byte stream. Every method and content header that decodes is
//! encoded again and must decode to the same bytes (the encoder accepts what the decoder made).

use amqp_rpc_core::codec::{encode_content, encode_method, Frame, FrameDecoder};
use bytes::BytesMut;

/// Runs the `frames` scenario on one fuzz input.
pub fn frames(data: &[u8]) {
    let Some((&selector, stream)) = data.split_first() else {
        return;
    };
    let mut decoder = FrameDecoder::new();
    if selector & 1 == 1 {
        decoder.set_frame_max(4096 + u32::from(selector >> 1) * 8192);
    }
    let frame_max = decoder.frame_max();
    let mut buf = BytesMut::from(stream);
    loop {
        let before = buf.len();
        match decoder.decode(&mut buf) {
            Ok(Some(frame)) => {
                assert!(buf.len() < before, "a frame consumed nothing");
                reencode(&frame);
            }
            Ok(None) => {
                // Waiting for the rest of one frame: it may reserve room for that frame (rounded
                // up by the allocator's growth policy), never what the header claims beyond it.
                assert!(buf.capacity() <= 2 * before.max(frame_max as usize));
                break;
            }
            Err(e) => {
                let code = e.reply_code().0;
                assert!(matches!(code, 501 | 502 | 505), "{e}: {code}");
                break;
            }
        }
    }
}

/// Encodes a decoded frame again; decoding that must give the same frame, byte for byte.
fn reencode(frame: &Frame) {
    let mut out = Vec::new();
    let channel = match frame {
        Frame::Method { channel, method } => {
            encode_method(*channel, method, u32::MAX, &mut out).expect("encode a decoded method");
            *channel
        }
        Frame::Header { channel, header } => {
            // Only the header frame: a body of `body_size` bytes is not ours to invent.
            encode_content(*channel, &header.properties, &[], u32::MAX, &mut out)
                .expect("encode a decoded header");
            *channel
        }
        _ => return,
    };
    let mut decoder = FrameDecoder::new();
    decoder.set_frame_max(u32::MAX);
    let mut buf = BytesMut::from(&out[..]);
    let again = decoder
        .decode(&mut buf)
        .expect("our encoding decodes")
        .expect("our encoding is a whole frame");
    let mut out2 = Vec::new();
    match &again {
        Frame::Method { method, .. } => {
            encode_method(channel, method, u32::MAX, &mut out2).expect("encode again");
        }
        Frame::Header { header, .. } => {
            encode_content(channel, &header.properties, &[], u32::MAX, &mut out2)
                .expect("encode again");
        }
        _ => panic!("re-encoded frame changed kind: {again:?}"),
    }
    assert_eq!(out, out2, "encoding is not stable");
}

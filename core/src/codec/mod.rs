//! Frames: the AMQP 0-9-1 wire format (spec §2.3.5, §4.2.3).
//!
//! A frame is a 7-byte header (type, channel, payload size), the payload and the frame-end octet
//! `0xCE`. We read the header ourselves so that an oversized frame is rejected before a byte of
//! its payload is buffered, then hand method and content-header payloads to amq-protocol. Body
//! payloads stay zero-copy [`Bytes`] slices of the read buffer.

mod depth;

pub use depth::MAX_TABLE_DEPTH;

use amq_protocol::frame::{
    parsing::{parse_content_header, traits::ParsableInput},
    AMQPContentHeader,
};
use amq_protocol::frame::{SerializeFn, WriteContext};
use amq_protocol::protocol::basic::gen_properties;
use amq_protocol::protocol::{gen_class, parse_class, AMQPClass, BasicProperties};
use bytes::{Buf, Bytes, BytesMut};

use crate::error::FrameError;
use crate::ids::ChannelId;

/// Frame type octets (spec §4.2.3, constants FRAME-METHOD etc.).
const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_HEARTBEAT: u8 = 8;
pub(crate) const FRAME_END: u8 = 0xCE;

/// The frame header: type, channel, payload size (§4.2.3).
pub(crate) const FRAME_HEADER_LEN: usize = 7;

/// Bytes a frame adds around its payload: the 7-byte header and the frame-end octet.
pub const FRAME_OVERHEAD: u32 = 8;
/// The frame size both peers must accept before tune (RabbitMQ's `frame_min_size` is 4096; we
/// allow what RabbitMQ itself sends before tune, which stays well under 8192).
pub const PRE_TUNE_FRAME_MAX: u32 = 8192;
/// The smallest frame_max a peer may negotiate (spec §4.2.3, FRAME-MIN-SIZE).
pub const FRAME_MIN_SIZE: u32 = 4096;

/// The AMQP 0-9-1 protocol header a client sends first (spec §4.2.2).
pub const PROTOCOL_HEADER: [u8; 8] = *b"AMQP\x00\x00\x09\x01";

/// Content class id for `basic` (the only class that carries content).
pub const BASIC_CLASS_ID: u16 = 60;

/// One decoded frame.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Frame {
    /// A method frame.
    Method {
        /// The channel it travels on.
        channel: ChannelId,
        /// The parsed method.
        method: Box<AMQPClass>,
    },
    /// A content header frame.
    Header {
        /// The channel it travels on.
        channel: ChannelId,
        /// Class, body size and properties.
        header: Box<AMQPContentHeader>,
    },
    /// A content body frame; the payload is a slice of the read buffer.
    Body {
        /// The channel it travels on.
        channel: ChannelId,
        /// The body bytes this frame carries.
        payload: Bytes,
    },
    /// A heartbeat frame (always channel 0).
    Heartbeat,
}

/// Incremental frame decoder.
///
/// Feed it a buffer that grows as bytes arrive; each call to [`FrameDecoder::decode`] takes at
/// most one frame off its front. Incomplete input is never an error.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    frame_max: u32,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    /// A decoder that accepts frames up to [`PRE_TUNE_FRAME_MAX`] bytes.
    pub fn new() -> Self {
        Self {
            frame_max: PRE_TUNE_FRAME_MAX,
        }
    }

    /// Sets the negotiated frame_max (whole frame, header and end octet included).
    pub fn set_frame_max(&mut self, frame_max: u32) {
        self.frame_max = frame_max;
    }

    /// When `bytes` start with the header of a body frame that [`FrameDecoder::decode`]
    /// would accept (non-zero channel, within `frame_max`): its channel and payload size. The
    /// connection then takes the payload straight from its input (see
    /// `Connection::handle_input`); anything else is left to `decode`, which reports it.
    pub(crate) fn body_frame_start(&self, bytes: &[u8]) -> Option<(ChannelId, usize)> {
        if bytes.first() != Some(&FRAME_BODY) {
            return None;
        }
        let (channel, size) = frame_head(bytes)?;
        (!channel.is_zero() && self.fits(size)).then_some((channel, payload_len(size)))
    }

    /// Whether a frame of `size` payload bytes is within `frame_max`. u64 arithmetic: `size + 8`
    /// cannot overflow, whatever the peer claims.
    fn fits(&self, size: u32) -> bool {
        u64::from(size) + u64::from(FRAME_OVERHEAD) <= u64::from(self.frame_max)
    }

    /// The largest whole frame this decoder accepts.
    pub fn frame_max(&self) -> u32 {
        self.frame_max
    }

    /// Takes one frame off the front of `buf`: `Ok(Some(frame))`, `Ok(None)` when more bytes are
    /// needed, or a [`FrameError`] that the connection must treat as fatal.
    // The frame layout (spec §4.2.3) checked in wire order, top to bottom: splitting would hide it.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if buf.len() < FRAME_HEADER_LEN {
            // The server answers a protocol header it does not support with its own header
            // and closes (spec §4.2.2); recognise it as soon as its first byte arrives.
            if buf.first() == Some(&b'A') {
                return self.protocol_header(buf);
            }
            return Ok(None);
        }
        let kind = buf[0];
        if kind == b'A' {
            return self.protocol_header(buf);
        }
        let Some((channel, size)) = frame_head(buf) else {
            return Ok(None);
        };
        if !self.fits(size) {
            return Err(FrameError::FrameTooLarge {
                size,
                frame_max: self.frame_max,
            });
        }
        if !matches!(
            kind,
            FRAME_METHOD | FRAME_HEADER | FRAME_BODY | FRAME_HEARTBEAT
        ) {
            return Err(FrameError::UnknownFrameType(kind));
        }
        let total = payload_len(size) + FRAME_OVERHEAD as usize;
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        let end = buf[total - 1];
        if end != FRAME_END {
            return Err(FrameError::BadFrameEnd(end));
        }
        let mut frame = buf.split_to(total).freeze();
        frame.advance(7);
        frame.truncate(size as usize);
        let payload = frame;
        match kind {
            FRAME_METHOD => {
                depth::check_method(&payload).map_err(|_| FrameError::TableTooDeep)?;
                let method =
                    parse_all(&payload[..], parse_class).ok_or_else(|| FrameError::Syntax {
                        what: method_name(&payload),
                    })?;
                Ok(Some(Frame::Method {
                    channel,
                    method: Box::new(method),
                }))
            }
            FRAME_HEADER => {
                if channel.is_zero() {
                    return Err(FrameError::ContentOnChannelZero);
                }
                depth::check_content_header(&payload).map_err(|_| FrameError::TableTooDeep)?;
                let header =
                    parse_all(&payload[..], parse_content_header).ok_or(FrameError::Syntax {
                        what: "content header",
                    })?;
                Ok(Some(Frame::Header {
                    channel,
                    header: Box::new(header),
                }))
            }
            FRAME_BODY => {
                if channel.is_zero() {
                    return Err(FrameError::ContentOnChannelZero);
                }
                Ok(Some(Frame::Body { channel, payload }))
            }
            _ => {
                // Heartbeats are channel 0 and empty (spec §4.2.7); RabbitMQ closes with
                // 501 frame-error otherwise.
                if !channel.is_zero() || size != 0 {
                    return Err(FrameError::BadHeartbeat);
                }
                Ok(Some(Frame::Heartbeat))
            }
        }
    }

    fn protocol_header(&self, buf: &BytesMut) -> Result<Option<Frame>, FrameError> {
        let want = &PROTOCOL_HEADER[..4];
        let have = &buf[..buf.len().min(8)];
        if have.len() < 8 {
            if want.starts_with(&have[..have.len().min(4)]) {
                return Ok(None);
            }
            return Err(FrameError::UnknownFrameType(b'A'));
        }
        if &have[..4] != want {
            return Err(FrameError::UnknownFrameType(b'A'));
        }
        Err(FrameError::ProtocolVersionRejected {
            major: have[5],
            minor: have[6],
            revision: have[7],
        })
    }
}

/// Runs a nom parser that must consume the whole payload.
/// The channel and payload size of the frame header at the front of `bytes` (§4.2.3), if all
/// of it is there.
fn frame_head(bytes: &[u8]) -> Option<(ChannelId, u32)> {
    let head: &[u8; FRAME_HEADER_LEN] = bytes.get(..FRAME_HEADER_LEN)?.try_into().ok()?;
    let channel = ChannelId(u16::from_be_bytes([head[1], head[2]]));
    Some((
        channel,
        u32::from_be_bytes([head[3], head[4], head[5], head[6]]),
    ))
}

/// A payload size already checked against `frame_max` as a usize: `size <= frame_max - 8 <=
/// u32::MAX - 8`, which fits on every platform we build for (usize is at least 32 bits there).
fn payload_len(size: u32) -> usize {
    size as usize
}

fn parse_all<I, T, E>(input: I, parser: impl Fn(I) -> Result<(I, T), E>) -> Option<T>
where
    I: ParsableInput,
{
    match parser(input) {
        Ok((rest, value)) if rest.input_len() == 0 => Some(value),
        _ => None,
    }
}

/// A short label for a method payload that failed to parse, for the error message.
fn method_name(payload: &[u8]) -> &'static str {
    match payload.get(..2) {
        Some([0, 10]) => "connection method",
        Some([0, 20]) => "channel method",
        Some([0, 40]) => "exchange method",
        Some([0, 50]) => "queue method",
        Some([0, 60]) => "basic method",
        Some([0, 85]) => "confirm method",
        Some([0, 90]) => "tx method",
        _ => "method of an unknown class",
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding. Everything appends whole frames to a `Vec<u8>`: cookie-factory can panic when it
// writes into a fixed slice that is too small, never into a growable vector.
// ---------------------------------------------------------------------------------------------

/// Appends the protocol header.
pub fn encode_protocol_header(out: &mut Vec<u8>) {
    out.extend_from_slice(&PROTOCOL_HEADER);
}

/// Appends a heartbeat frame.
pub fn encode_heartbeat(out: &mut Vec<u8>) {
    out.extend_from_slice(&[FRAME_HEARTBEAT, 0, 0, 0, 0, 0, 0, FRAME_END]);
}

/// Appends one method frame. Fails, leaving `out` as it was, when the frame would exceed
/// `frame_max` (only user-supplied tables can make a method that large).
pub fn encode_method(
    channel: ChannelId,
    method: &AMQPClass,
    frame_max: u32,
    out: &mut Vec<u8>,
) -> Result<(), FrameTooLargeToSend> {
    let start = out.len();
    out.extend_from_slice(&[FRAME_METHOD]);
    out.extend_from_slice(&channel.0.to_be_bytes());
    out.extend_from_slice(&[0; 4]);
    if !serialize(out, gen_class(method)) {
        out.truncate(start);
        return Err(FrameTooLargeToSend);
    }
    finish_frame(start, frame_max, out)
}

/// Appends a content header frame and the body frames of one message, splitting the body at
/// `frame_max - 8` (spec §4.2.6.2).
pub fn encode_content(
    channel: ChannelId,
    properties: &BasicProperties,
    body: &[u8],
    frame_max: u32,
    out: &mut Vec<u8>,
) -> Result<(), FrameTooLargeToSend> {
    let start = out.len();
    out.extend_from_slice(&[FRAME_HEADER]);
    out.extend_from_slice(&channel.0.to_be_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&BASIC_CLASS_ID.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes()); // weight, always 0
    out.extend_from_slice(&(body.len() as u64).to_be_bytes());
    if !serialize(out, gen_properties(properties)) {
        out.truncate(start);
        return Err(FrameTooLargeToSend);
    }
    finish_frame(start, frame_max, out)?;
    let chunk = (frame_max.saturating_sub(FRAME_OVERHEAD)).max(1) as usize;
    out.reserve(body.len() + (body.len() / chunk + 1) * FRAME_OVERHEAD as usize);
    for piece in body.chunks(chunk) {
        out.extend_from_slice(&[FRAME_BODY]);
        out.extend_from_slice(&channel.0.to_be_bytes());
        // `piece.len() <= chunk <= u32::MAX`.
        out.extend_from_slice(&(piece.len() as u32).to_be_bytes());
        out.extend_from_slice(piece);
        out.push(FRAME_END);
    }
    Ok(())
}

/// Runs an amq-protocol serializer and appends what it wrote to `out`. It writes into a vector
/// of its own so that a failure (which needs a field over 4 GiB) leaves `out` intact.
fn serialize(out: &mut Vec<u8>, serializer: impl SerializeFn<Vec<u8>>) -> bool {
    match serializer(WriteContext::from(Vec::with_capacity(128))) {
        Ok(ctx) => {
            out.extend_from_slice(&ctx.write);
            true
        }
        Err(_) => false,
    }
}

/// Patches the size field of the frame that starts at `start` and appends the frame-end octet.
fn finish_frame(
    start: usize,
    frame_max: u32,
    out: &mut Vec<u8>,
) -> Result<(), FrameTooLargeToSend> {
    let size = out.len() - start - 7;
    match u32::try_from(size) {
        Ok(size) if u64::from(size) + u64::from(FRAME_OVERHEAD) <= u64::from(frame_max) => {
            out[start + 3..start + 7].copy_from_slice(&size.to_be_bytes());
            out.push(FRAME_END);
            Ok(())
        }
        _ => {
            out.truncate(start);
            Err(FrameTooLargeToSend)
        }
    }
}

/// A method or content header we were asked to send does not fit in the negotiated frame_max.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameTooLargeToSend;

#[cfg(test)]
mod tests;

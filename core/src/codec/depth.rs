//! Field-table nesting guard.
//!
//! amq-protocol parses field tables and arrays recursively, so a peer that nests tables a few
//! thousand levels deep overflows the stack (about 1,150 levels on a 2 MiB stack with
//! amq-protocol 10.6.3). This module walks the same bytes iteratively, with an explicit stack,
//! and rejects a payload nested deeper than [`MAX_TABLE_DEPTH`] before the recursive parser sees
//! it. The walk reads exactly what the parser would read, in the same order, so the parser never
//! reaches a depth the walk did not check.

pub use crate::error::MAX_TABLE_DEPTH;

/// Outcome of a walk over a payload that is too deep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TooDeep;

/// One field the method layouts skip before reaching their table.
#[derive(Clone, Copy)]
enum Field {
    Octet,
    Short,
    ShortStr,
}

/// Where the field table sits in the methods that carry one (AMQP 0-9-1 §1.4 method grammar),
/// as the fields that precede it. `None` for every method without a table.
fn table_layout(class_id: u16, method_id: u16) -> Option<&'static [Field]> {
    use Field::*;
    Some(match (class_id, method_id) {
        (10, 10) => &[Octet, Octet],                     // connection.start
        (10, 11) => &[],                                 // connection.start-ok
        (40, 10) => &[Short, ShortStr, ShortStr, Octet], // exchange.declare
        (40, 30) | (40, 40) => &[Short, ShortStr, ShortStr, ShortStr, Octet], // exchange.(un)bind
        (50, 10) => &[Short, ShortStr, Octet],           // queue.declare
        (50, 20) => &[Short, ShortStr, ShortStr, ShortStr, Octet], // queue.bind
        (50, 50) => &[Short, ShortStr, ShortStr, ShortStr], // queue.unbind
        (60, 20) => &[Short, ShortStr, ShortStr, Octet], // basic.consume
        _ => return None,
    })
}

/// Checks the nesting depth of the one table a method payload may carry.
pub(crate) fn check_method(payload: &[u8]) -> Result<(), TooDeep> {
    let (Some(class), Some(method)) = (read_u16(payload, 0), read_u16(payload, 2)) else {
        return Ok(());
    };
    let Some(layout) = table_layout(class, method) else {
        return Ok(());
    };
    let mut pos = 4;
    for field in layout {
        let len = match field {
            Field::Octet => 1,
            Field::Short => 2,
            Field::ShortStr => match payload.get(pos) {
                Some(&n) => 1 + usize::from(n),
                None => return Ok(()),
            },
        };
        pos += len;
    }
    check_table_at(payload, pos)
}

/// Checks the `headers` table of a content-header payload (class, weight, body size, property
/// flags, then content-type and content-encoding short strings when present, then headers).
pub(crate) fn check_content_header(payload: &[u8]) -> Result<(), TooDeep> {
    const CONTENT_TYPE: u16 = 1 << 15;
    const CONTENT_ENCODING: u16 = 1 << 14;
    const HEADERS: u16 = 1 << 13;
    let Some(flags) = read_u16(payload, 12) else {
        return Ok(());
    };
    if flags & HEADERS == 0 {
        return Ok(());
    }
    let mut pos = 14;
    for bit in [CONTENT_TYPE, CONTENT_ENCODING] {
        if flags & bit != 0 {
            match payload.get(pos) {
                Some(&n) => pos += 1 + usize::from(n),
                None => return Ok(()),
            }
        }
    }
    check_table_at(payload, pos)
}

/// What a nesting level is: a table holds `key type value` entries, an array `type value`.
#[derive(Clone, Copy, PartialEq)]
enum Level {
    Table,
    Array,
}

/// Walks the field table whose 4-byte length starts at `start`. Malformed bytes end the walk with
/// `Ok`: the parser rejects them at the same place, no deeper than the walk went.
fn check_table_at(payload: &[u8], start: usize) -> Result<(), TooDeep> {
    let Some(len) = read_u32(payload, start) else {
        return Ok(());
    };
    let mut pos = start + 4;
    // Each entry is the kind of level and the end offset of its bytes.
    let mut stack: Vec<(Level, usize)> = vec![(Level::Table, pos.saturating_add(len))];
    while let Some(&(level, end)) = stack.last() {
        if pos >= end {
            stack.pop();
            continue;
        }
        if level == Level::Table {
            let Some(&key_len) = payload.get(pos) else {
                return Ok(());
            };
            pos += 1 + usize::from(key_len);
        }
        let Some(&kind) = payload.get(pos) else {
            return Ok(());
        };
        pos += 1;
        let fixed = match kind {
            b't' | b'b' | b'B' => 1,
            b's' | b'U' | b'u' => 2,
            b'I' | b'i' | b'f' => 4,
            b'D' => 5,
            b'L' | b'l' | b'd' | b'T' => 8,
            b'V' => 0,
            // Saturating: a claimed length near u32::MAX must not overflow a 32-bit usize.
            b'S' | b'x' => match read_u32(payload, pos) {
                Some(n) => n.saturating_add(4),
                None => return Ok(()),
            },
            b'F' | b'A' => {
                let Some(n) = read_u32(payload, pos) else {
                    return Ok(());
                };
                if stack.len() >= MAX_TABLE_DEPTH {
                    return Err(TooDeep);
                }
                pos += 4;
                let nested = if kind == b'F' {
                    Level::Table
                } else {
                    Level::Array
                };
                stack.push((nested, pos.saturating_add(n)));
                continue;
            }
            _ => return Ok(()),
        };
        pos = pos.saturating_add(fixed);
    }
    Ok(())
}

fn read_u16(bytes: &[u8], at: usize) -> Option<u16> {
    let b = bytes.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([b[0], b[1]]))
}

fn read_u32(bytes: &[u8], at: usize) -> Option<usize> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    usize::try_from(u32::from_be_bytes([b[0], b[1], b[2], b[3]])).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection.start payload whose server-properties nest `depth` tables.
    pub(crate) fn nested_start(depth: usize) -> Vec<u8> {
        let mut payload = vec![0, 10, 0, 10, 0, 9];
        payload.extend_from_slice(&amqp_rpc_sim::frames::nested_table(depth));
        payload.extend_from_slice(&5u32.to_be_bytes());
        payload.extend_from_slice(b"PLAIN");
        payload.extend_from_slice(&5u32.to_be_bytes());
        payload.extend_from_slice(b"en_US");
        payload
    }

    #[test]
    fn shallow_tables_pass() {
        assert_eq!(check_method(&nested_start(3)), Ok(()));
        assert_eq!(check_method(&nested_start(MAX_TABLE_DEPTH - 1)), Ok(()));
    }

    #[test]
    fn deep_tables_are_rejected_without_recursion() {
        assert_eq!(check_method(&nested_start(MAX_TABLE_DEPTH)), Err(TooDeep));
        assert_eq!(check_method(&nested_start(10_000)), Err(TooDeep));
    }

    #[test]
    fn arrays_count_as_levels() {
        // {"a": A [A [A ... ]]}
        let mut value = 0u32.to_be_bytes().to_vec();
        for _ in 0..200 {
            let mut arr = vec![b'A'];
            arr.extend_from_slice(&value);
            let mut wrapped = (arr.len() as u32).to_be_bytes().to_vec();
            wrapped.extend_from_slice(&arr);
            value = wrapped;
        }
        let mut entry = vec![1, b'a', b'A'];
        entry.extend_from_slice(&value);
        let mut payload = vec![0, 10, 0, 11];
        payload.extend_from_slice(&(entry.len() as u32).to_be_bytes());
        payload.extend_from_slice(&entry);
        assert_eq!(check_method(&payload), Err(TooDeep));
    }

    #[test]
    fn truncated_input_is_left_to_the_parser() {
        let full = nested_start(5);
        for cut in 0..full.len() {
            assert_eq!(check_method(&full[..cut]), Ok(()));
        }
    }
}

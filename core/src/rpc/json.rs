//! JSON payloads (the `json` feature): how a [`serde_json::Error`] becomes a [`HandlerError`].

use super::server::{HandlerError, IO_ERROR};

/// Error code of the rejected error reply for a request body that is not valid JSON, or not
/// the JSON the handler expects (`From<serde_json::Error>` for [`HandlerError`]).
pub const INVALID_JSON: &str = "invalid_json";

/// A body that does not parse as the JSON a handler expects is invalid input: rejected, never
/// ran ([`INVALID_JSON`]). Only an I/O error while reading (a reader that failed) is a failure.
///
/// This is meant for parsing the request (`serde_json::from_slice(&request.body)?`); a reply
/// that does not serialize is the handler's failure, not the caller's: map that one to
/// [`HandlerError::Failed`] yourself.
impl From<serde_json::Error> for HandlerError {
    fn from(e: serde_json::Error) -> Self {
        if e.is_io() {
            HandlerError::Failed {
                code: IO_ERROR.into(),
                message: e.to_string(),
            }
        } else {
            HandlerError::Rejected {
                code: INVALID_JSON.into(),
                message: format!("the body is not valid JSON for this request: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_json_is_rejected() {
        let e = serde_json::from_slice::<u32>(b"{").map_err(HandlerError::from);
        match e {
            Err(HandlerError::Rejected { code, .. }) => assert_eq!(code, INVALID_JSON),
            other => panic!("expected rejected, got {other:?}"),
        }
    }
}

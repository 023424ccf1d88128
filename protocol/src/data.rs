//! `DATA` frames (protocol.md 2.2): one binary WebSocket message,
//! `0x01 ‖ session id (16 bytes) ‖ body (at least 1 byte, opaque to the relay)`, which the
//! relay forwards live to the session's other member and never keeps. JSON text never starts
//! with byte 0x01, so a binary message that does not is read as JSON text, as before.

/// The first byte of every `DATA` frame.
pub const DATA_TAG: u8 = 0x01;
/// The tag and the session id; the body follows.
pub const DATA_HEADER_BYTES: usize = 17;

/// Whether a binary message is meant as a `DATA` frame (well formed or not).
pub fn is_data(message: &[u8]) -> bool {
    message.first() == Some(&DATA_TAG)
}

/// The session id of a well-formed `DATA` frame (the 16 bytes whose lowercase hex is the
/// `sid`); `None` if `message` is not one (another tag, or no body).
pub fn data_sid(message: &[u8]) -> Option<[u8; 16]> {
    if !is_data(message) || message.len() <= DATA_HEADER_BYTES {
        return None;
    }
    message.get(1..DATA_HEADER_BYTES)?.try_into().ok()
}

/// The header of a `DATA` frame for the session whose id is `sid`; the body goes after it.
pub fn data_header(sid: [u8; 16]) -> [u8; DATA_HEADER_BYTES] {
    let mut header = [DATA_TAG; DATA_HEADER_BYTES];
    for (to, from) in header.iter_mut().skip(1).zip(sid) {
        *to = from;
    }
    header
}

/// A whole `DATA` frame for session `sid` carrying `body`.
pub fn frame(sid: &[u8; 16], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(DATA_HEADER_BYTES + body.len());
    out.extend_from_slice(&data_header(*sid));
    out.extend_from_slice(body);
    out
}

/// The session id and body of a well-formed `DATA` frame; `None` if `message` is not one.
pub fn parse(message: &[u8]) -> Option<([u8; 16], &[u8])> {
    Some((data_sid(message)?, message.get(DATA_HEADER_BYTES..)?))
}

/// The 16 bytes of a session id given as its 32 hex digits.
pub fn sid_bytes(sid: &str) -> Option<[u8; 16]> {
    let mut out = [0u8; 16];
    hex::decode_to_slice(sid, &mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_frame_is_its_tag_sid_and_a_body() {
        let sid: [u8; 16] = core::array::from_fn(|i| i as u8);
        let mut frame = data_header(sid).to_vec();
        assert!(is_data(&frame));
        assert_eq!(data_sid(&frame), None, "no body");
        frame.push(0);
        assert_eq!(data_sid(&frame), Some(sid));
        assert_eq!(data_sid(&frame[..5]), None);
        assert_eq!(data_sid(&[]), None);
        assert!(!is_data(br#"{"t":"PING"}"#));
        assert_eq!(data_sid(&[b'{'; 40]), None);
    }

    #[test]
    fn frames_round_trip() {
        let sid = sid_bytes("7f1c0d2e9a4b3c5d6e7f8091a2b3c4d5").unwrap();
        let f = frame(&sid, b"xyz");
        assert_eq!(f.len(), DATA_HEADER_BYTES + 3);
        assert_eq!(parse(&f), Some((sid, &b"xyz"[..])));
        assert_eq!(parse(&f[..DATA_HEADER_BYTES]), None, "no body");
        assert_eq!(sid_bytes("7f1c"), None);
    }
}

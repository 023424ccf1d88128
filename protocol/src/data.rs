//! DATA frames: binary WebSocket messages the relay forwards live to the other member and
//! never stores (protocol.md 2.2, "DATA"). `0x01 || sid (16 bytes) || body`.

/// The first byte of a DATA frame. JSON text never starts with it, so a binary message that
/// starts otherwise is still read as UTF-8 JSON.
pub const DATA: u8 = 0x01;

/// Bytes before the body: the marker and the session id.
pub const HEADER_BYTES: usize = 1 + 16;

/// A DATA frame for session `sid` (its 16 bytes) carrying `body`.
pub fn frame(sid: &[u8; 16], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + body.len());
    out.push(DATA);
    out.extend_from_slice(sid);
    out.extend_from_slice(body);
    out
}

/// The session id and body of a DATA frame; `None` if `message` is not one (another first
/// byte, or too short to hold a header and a body).
pub fn parse(message: &[u8]) -> Option<([u8; 16], &[u8])> {
    if message.first() != Some(&DATA) || message.len() <= HEADER_BYTES {
        return None;
    }
    let sid = message.get(1..HEADER_BYTES)?.try_into().ok()?;
    Some((sid, message.get(HEADER_BYTES..)?))
}

/// The 16 bytes of a session id given as 32 hex digits.
pub fn sid_bytes(sid: &str) -> Option<[u8; 16]> {
    let mut out = [0u8; 16];
    hex::decode_to_slice(sid, &mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_other_messages_are_not_data() {
        let sid = sid_bytes("7f1c0d2e9a4b3c5d6e7f8091a2b3c4d5").unwrap();
        let f = frame(&sid, b"xyz");
        assert_eq!(f.len(), HEADER_BYTES + 3);
        assert_eq!(parse(&f), Some((sid, &b"xyz"[..])));
        assert_eq!(parse(&f[..HEADER_BYTES]), None, "no body");
        assert_eq!(parse(b"{\"t\":\"PING\"}"), None);
        assert_eq!(parse(b""), None);
        assert_eq!(sid_bytes("7f1c"), None);
    }
}

//! `DATA` frames (protocol.md 2.2): binary messages the relay forwards live from one member
//! of a session to the other, byte for byte, in order with the sender's text frames, and
//! never keeps. Raw WebSocket clients against the real relay binary.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use futures_util::{SinkExt, StreamExt};
use parley_e2e::raw::{Ws, connect, send};
use parley_e2e::{RelayProcess, STEP};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{Bytes, Message};

/// What a client received: a JSON frame, or a binary message.
#[derive(Debug, Clone, PartialEq)]
enum Got {
    Text(Value),
    Binary(Vec<u8>),
}

/// The next message that is not a `PING`.
async fn next(ws: &mut Ws) -> Got {
    loop {
        let message = tokio::time::timeout(STEP, ws.next())
            .await
            .expect("nothing in time")
            .expect("connection closed")
            .unwrap();
        match message {
            Message::Text(text) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                if frame["t"] != "PING" {
                    return Got::Text(frame);
                }
            }
            Message::Binary(bytes) => return Got::Binary(bytes.to_vec()),
            _ => {}
        }
    }
}

async fn next_text(ws: &mut Ws) -> Value {
    match next(ws).await {
        Got::Text(frame) => frame,
        Got::Binary(bytes) => panic!("a binary message ({} bytes)", bytes.len()),
    }
}

/// A `DATA` frame: 0x01, the sid's 16 bytes, the body.
fn data(sid: &str, body: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x01];
    frame.extend(hex::decode(sid).unwrap());
    frame.extend_from_slice(body);
    frame
}

/// A paired host and guest on one relay: (host, guest, sid, the guest's member token).
async fn paired(addr: &str) -> (Ws, Ws, String, String) {
    let mut host = connect(addr).await;
    send(&mut host, json!({"t": "CREATE_SESSION"})).await;
    let sid = next_text(&mut host).await["sid"]
        .as_str()
        .unwrap()
        .to_string();
    send(&mut host, json!({"t": "INVITE_CREATE", "sid": sid})).await;
    let code = next_text(&mut host).await["data"]["code"].clone();
    let mut guest = connect(addr).await;
    send(&mut guest, json!({"t": "JOIN", "data": {"code": code}})).await;
    let request = next_text(&mut host).await;
    assert_eq!(request["t"], "JOIN_REQUEST", "{request}");
    assert_eq!(next_text(&mut guest).await["t"], "JOINED");
    send(
        &mut host,
        json!({"t": "JOIN_ACCEPT", "sid": sid, "data": {"clientID": request["data"]["clientID"]}}),
    )
    .await;
    let joined = next_text(&mut guest).await;
    assert_eq!(joined["t"], "JOINED", "{joined}");
    let token = joined["data"]["resumeToken"].as_str().unwrap().to_string();
    (host, guest, sid, token)
}

/// What one side sends: MSGs and DATA frames (large and small) in turn; and what the other
/// side must receive for it, in order.
fn script(sid: &str, tag: u8, max_frame: usize) -> (Vec<Message>, Vec<Got>) {
    let sizes = [1usize, 100, 61_500, max_frame - 17, 7];
    let (mut out, mut expect) = (Vec::new(), Vec::new());
    for (i, size) in sizes.into_iter().enumerate() {
        let msg = json!({"t": "MSG", "sid": sid, "data": {"payload": "00", "msgID": format!("{tag}-{i}")}});
        out.push(Message::text(msg.to_string()));
        expect.push(Got::Text(msg));
        let body: Vec<u8> = (0..size)
            .map(|j| (j as u8).wrapping_mul(31) ^ tag ^ i as u8)
            .collect();
        let frame = data(sid, &body);
        out.push(Message::binary(Bytes::from(frame.clone())));
        expect.push(Got::Binary(frame));
    }
    (out, expect)
}

/// Sends `out` while reading; what it received (DELIVERED and PING left out) once it has
/// `n` frames, and how many DELIVERED came.
async fn exchange(ws: &mut Ws, out: Vec<Message>, n: usize) -> (Vec<Got>, usize) {
    let (mut sink, mut stream) = ws.split();
    let sending = async {
        for message in out {
            sink.send(message).await.unwrap();
        }
    };
    let receiving = async {
        let (mut got, mut delivered) = (Vec::new(), 0);
        while got.len() < n {
            let message = stream.next().await.expect("connection closed").unwrap();
            match message {
                Message::Text(text) => {
                    let frame: Value = serde_json::from_str(&text).unwrap();
                    match frame["t"].as_str().unwrap() {
                        "PING" => {}
                        "DELIVERED" => delivered += 1,
                        _ => got.push(Got::Text(frame)),
                    }
                }
                Message::Binary(bytes) => got.push(Got::Binary(bytes.to_vec())),
                _ => {}
            }
        }
        (got, delivered)
    };
    let ((), result) = tokio::time::timeout(STEP, async { tokio::join!(sending, receiving) })
        .await
        .expect("the exchange did not finish in time");
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_frames_pass_live_between_members_in_order_with_their_msgs() {
    let relay = RelayProcess::start(&[]);
    let (mut host, mut guest, sid, guest_token) = paired(relay.addr()).await;

    // Both ways at once, each side's DATA frames among its MSGs: every one arrives, byte for
    // byte, in the order sent (a DATA frame as large as the frame limit allows included).
    let (host_out, host_expect) = script(&sid, 1, 65_536);
    let (guest_out, guest_expect) = script(&sid, 2, 65_536);
    let ((host_got, host_delivered), (guest_got, guest_delivered)) = tokio::join!(
        exchange(&mut host, host_out, guest_expect.len()),
        exchange(&mut guest, guest_out, host_expect.len()),
    );
    assert!(guest_got == host_expect, "the guest got the host's frames");
    assert!(host_got == guest_expect, "the host got the guest's frames");
    // DATA gets no answer: one DELIVERED per MSG (5 each), none for DATA. Any that had not
    // arrived yet come now, and nothing else.
    let mut host_delivered = host_delivered;
    while host_delivered < 5 {
        assert_eq!(next_text(&mut host).await["t"], "DELIVERED");
        host_delivered += 1;
    }
    let mut guest_delivered = guest_delivered;
    while guest_delivered < 5 {
        assert_eq!(next_text(&mut guest).await["t"], "DELIVERED");
        guest_delivered += 1;
    }

    // A stranger's DATA for the session is refused; the session is untouched.
    let mut stranger = connect(relay.addr()).await;
    stranger
        .send(Message::binary(data(&sid, b"intruder")))
        .await
        .unwrap();
    let refused = next_text(&mut stranger).await;
    assert_eq!(refused["t"], "ERROR", "{refused}");
    assert_eq!(refused["data"]["code"], "not_member", "{refused}");
    assert!(refused["data"].get("msgID").is_none(), "{refused}");

    // A message that starts as DATA but is too short to be one: refused, the connection
    // still serves; JSON text in a binary message is still read as before.
    host.send(Message::binary(data(&sid, b""))).await.unwrap();
    let refused = next_text(&mut host).await;
    assert_eq!(refused["data"]["code"], "malformed_data", "{refused}");
    host.send(Message::binary(Bytes::from_static(br#"{"t":"PING"}"#)))
        .await
        .unwrap();
    assert_eq!(next_text(&mut host).await["t"], "PONG");

    // The guest goes away: DATA for it is dropped, not kept; a MSG is kept as ever.
    drop(guest);
    assert_eq!(next_text(&mut host).await["t"], "PEER_OFFLINE");
    host.send(Message::binary(data(&sid, b"lost")))
        .await
        .unwrap();
    let kept = json!({"t": "MSG", "sid": sid, "data": {"payload": "00", "msgID": "kept"}});
    send(&mut host, kept.clone()).await;
    assert_eq!(next_text(&mut host).await["t"], "DELIVERED");
    let mut guest = connect(relay.addr()).await;
    send(
        &mut guest,
        json!({"t": "REATTACH", "sid": sid, "data": {"resumeToken": guest_token}}),
    )
    .await;
    assert_eq!(next_text(&mut guest).await["t"], "PEER_ONLINE");
    assert_eq!(next(&mut guest).await, Got::Text(kept));
    assert_eq!(next_text(&mut host).await["t"], "PEER_ONLINE");
    // And live again once it is back.
    let frame = data(&sid, b"after");
    host.send(Message::binary(frame.clone())).await.unwrap();
    assert_eq!(next(&mut guest).await, Got::Binary(frame));
}

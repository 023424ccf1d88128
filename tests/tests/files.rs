//! Files through the real binaries and a real relay (protocol.md 3.10): 3 and 50 MiB of
//! random bytes arrive byte-identical, a folder keeps its nested paths, an offer is declined
//! without `--accept-files`, `--max-file-bytes` refuses a larger one; a receiver killed
//! halfway, a sender killed and back, a relay restarted and a connection cut all end with the
//! right file and bounded re-sending; hostile names land inside the download directory or are
//! refused; a relay altering, dropping, repeating or swapping a chunk fails the file; a chat
//! line crosses during a transfer. Where a test must act mid-transfer, a proxy in front of the
//! relay holds the transfer at a known chunk (a [`Gate`]): a transfer is too fast to catch.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use parley_e2e::proxy::{DataTamper, Proxy, Toward};
use parley_e2e::{Client, RelayProcess, STEP, TempDir, pair_and_quit, random_file};
use sha2::{Digest, Sha256};

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// `parley resume` as a receiving script: offers accepted (or not), files into `downloads`.
fn receiver(url: &str, dir: &Path, downloads: &Path, extra: &[&str]) -> Client {
    let mut args = vec![
        "--download-dir".to_string(),
        downloads.display().to_string(),
        "--timeout".into(),
        "120".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push("resume".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Client::spawn(url, dir, "bob", &args)
}

fn sender(url: &str, dir: &Path, paths: &[&Path]) -> Client {
    let mut args = vec!["--timeout".to_string(), "120".into(), "send".into()];
    args.extend(paths.iter().map(|p| p.display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut client = Client::spawn(url, dir, "alice", &args);
    client.close_stdin();
    client
}

/// Events named `name` among `events`.
fn named<'a>(events: &'a [serde_json::Value], name: &str) -> Vec<&'a serde_json::Value> {
    events.iter().filter(|e| e["event"] == name).collect()
}

#[test]
fn a_file_of_a_few_mib_arrives_byte_identical_with_its_sha256() {
    let relay = RelayProcess::start(&[]);
    let (alice_dir, bob_dir) = pair_and_quit(relay.url());
    let work = TempDir::new("files-work");
    let source = work.path().join("random.bin");
    let data = random_file(&source, 3 * 1024 * 1024 + 12_345);
    let downloads = work.path().join("downloads");

    let mut bob = receiver(
        relay.url(),
        bob_dir.path(),
        &downloads,
        &["--accept-files", "--exit-after-files", "1"],
    );
    bob.close_stdin();
    bob.expect("resumed");
    let alice = sender(relay.url(), alice_dir.path(), &[&source]);

    let (alice_status, alice_events) = alice.wait_long();
    assert!(alice_status.success(), "{alice_status}: {alice_events:?}");
    let sent = named(&alice_events, "file_sent");
    assert_eq!(sent.len(), 1, "{alice_events:?}");
    assert_eq!(sent[0]["sha256"], sha(&data));
    assert_eq!(sent[0]["size"], data.len() as u64);

    let (bob_status, bob_events) = bob.wait_long();
    assert!(bob_status.success(), "{bob_status}");
    let offer = named(&bob_events, "file_offer");
    assert_eq!(offer[0]["name"], "random.bin");
    let received = named(&bob_events, "file_received");
    assert_eq!(received.len(), 1, "{bob_events:?}");
    assert_eq!(received[0]["sha256"], sha(&data));
    let path = PathBuf::from(received[0]["path"].as_str().unwrap());
    assert_eq!(path, downloads.join("random.bin"));
    assert!(std::fs::read(&path).unwrap() == data, "the bytes differ");
    // Progress came, bounded, and no .part is left.
    assert!(!named(&bob_events, "file_progress").is_empty());
    assert!(leftover_parts(&downloads).is_empty());
}

#[test]
fn a_folder_arrives_with_its_nested_paths() {
    let relay = RelayProcess::start(&[]);
    let (alice_dir, bob_dir) = pair_and_quit(relay.url());
    let work = TempDir::new("files-work");
    let tree = work.path().join("tree");
    let files = [
        ("a.txt", 10),
        ("sub/b.bin", 100_000),
        ("sub/deeper/c.dat", 0),
    ];
    let contents: Vec<Vec<u8>> = files
        .iter()
        .map(|(name, len)| random_file(&tree.join(name), *len))
        .collect();
    let downloads = work.path().join("downloads");

    let mut bob = receiver(
        relay.url(),
        bob_dir.path(),
        &downloads,
        &["--accept-files", "--exit-after-files", "3"],
    );
    bob.close_stdin();
    bob.expect("resumed");
    let alice = sender(relay.url(), alice_dir.path(), &[&tree]);
    let (alice_status, alice_events) = alice.wait_long();
    assert!(alice_status.success(), "{alice_status}: {alice_events:?}");
    assert_eq!(named(&alice_events, "file_sent").len(), 3);
    let (bob_status, bob_events) = bob.wait_long();
    assert!(bob_status.success(), "{bob_status}");
    assert_eq!(named(&bob_events, "file_received").len(), 3);
    for ((name, _), content) in files.iter().zip(&contents) {
        let landed = downloads.join("tree").join(name);
        assert!(std::fs::read(&landed).unwrap() == *content, "{name}");
    }
}

#[test]
fn an_offer_is_declined_without_accept_files() {
    let relay = RelayProcess::start(&[]);
    let (alice_dir, bob_dir) = pair_and_quit(relay.url());
    let work = TempDir::new("files-work");
    let source = work.path().join("x.bin");
    random_file(&source, 5000);
    let downloads = work.path().join("downloads");

    // Not a terminal, no --accept-files: nobody to ask, so no.
    let mut bob = receiver(relay.url(), bob_dir.path(), &downloads, &[]);
    bob.expect("resumed");
    let alice = sender(relay.url(), alice_dir.path(), &[&source]);
    let failed = bob.expect("file_failed");
    assert_eq!(failed["code"], "declined");
    let (alice_status, alice_events) = alice.wait_long();
    assert_eq!(alice_status.code(), Some(8), "{alice_events:?}");
    let failed = named(&alice_events, "file_failed");
    assert_eq!(failed[0]["code"], "declined", "{alice_events:?}");
    assert!(!downloads.exists() || leftover_files(&downloads).is_empty());
}

#[test]
fn max_file_bytes_refuses_a_larger_offer() {
    let relay = RelayProcess::start(&[]);
    let (alice_dir, bob_dir) = pair_and_quit(relay.url());
    let work = TempDir::new("files-work");
    let source = work.path().join("big.bin");
    random_file(&source, 5000);
    let downloads = work.path().join("downloads");

    let mut bob = receiver(
        relay.url(),
        bob_dir.path(),
        &downloads,
        &["--accept-files", "--max-file-bytes", "4999"],
    );
    bob.expect("resumed");
    let alice = sender(relay.url(), alice_dir.path(), &[&source]);
    assert_eq!(bob.expect("file_offer")["size"], 5000);
    assert_eq!(bob.expect("file_failed")["code"], "too_large");
    let (alice_status, alice_events) = alice.wait_long();
    assert_eq!(alice_status.code(), Some(8), "{alice_events:?}");
    assert_eq!(named(&alice_events, "file_failed")[0]["code"], "too_large");
    assert!(!downloads.exists() || leftover_files(&downloads).is_empty());
}

/// Alice paired with Bob, and a file of `len` random bytes for her to send. The clients
/// reach the relay directly, or through a hostile [`Proxy`] in front of it.
struct Scene {
    /// (Taken out while it is restarted.)
    relay: Option<RelayProcess>,
    _proxy: Option<Proxy>,
    url: String,
    alice_dir: TempDir,
    bob_dir: TempDir,
    work: TempDir,
    source: PathBuf,
    data: Vec<u8>,
    downloads: PathBuf,
}

impl Scene {
    fn new(len: usize) -> Scene {
        Scene::behind(len, None)
    }

    /// A scene whose clients go through `proxy`, started in front of the relay.
    fn behind(len: usize, proxy: Option<&dyn Fn(&str) -> Proxy>) -> Scene {
        let relay = RelayProcess::start(&[]);
        let proxy = proxy.map(|start| start(relay.url()));
        let url = proxy.as_ref().map_or(relay.url(), |p| p.url()).to_string();
        let (alice_dir, bob_dir) = pair_and_quit(&url);
        let work = TempDir::new("files-work");
        let source = work.path().join("big.bin");
        let data = random_file(&source, len);
        let downloads = work.path().join("downloads");
        Scene {
            relay: Some(relay),
            _proxy: proxy,
            url,
            alice_dir,
            bob_dir,
            work,
            source,
            data,
            downloads,
        }
    }

    /// Bob receiving one file, accepted; his stdin left open.
    fn bob(&self) -> Client {
        let accept = ["--accept-files", "--exit-after-files", "1"];
        receiver(&self.url, self.bob_dir.path(), &self.downloads, &accept)
    }

    fn alice(&self) -> Client {
        sender(&self.url, self.alice_dir.path(), &[&self.source])
    }

    /// SIGKILLs the relay and starts it again at its address with its secret.
    fn restart_relay(&mut self) {
        let relay = self.relay.take().expect("a relay");
        self.relay = Some(relay.kill().start_again(&[]));
    }

    /// Waits for `client` to exit 0; returns its events.
    fn success(client: Client) -> Vec<serde_json::Value> {
        let (status, events) = client.wait_long();
        assert!(status.success(), "{status}: {events:?}");
        events
    }

    /// Bob's run ended with the file in place, intact, and no .part left.
    fn received_intact(&self, bob_events: &[serde_json::Value]) {
        let received = named(bob_events, "file_received");
        assert_eq!(received.len(), 1, "{bob_events:?}");
        assert_eq!(received[0]["sha256"], sha(&self.data));
        let path = PathBuf::from(received[0]["path"].as_str().unwrap());
        assert!(
            std::fs::read(&path).unwrap() == self.data,
            "the bytes differ"
        );
        assert!(leftover_parts(&self.downloads).is_empty());
    }
}

const MIB: usize = 1024 * 1024;

/// Bytes of file data per chunk, as Parley sends them (protocol.md 3.10).
const CHUNK: u64 = 61_440;

/// The index of a chunk, if a binary message is a file chunk's DATA frame (protocol.md 3.10,
/// "The wire": `0x01 || sid || 0x01 || id (16) || pass (4) || index (8) || ...`).
fn chunk_index(frame: &[u8]) -> Option<u64> {
    if frame.first() != Some(&1) || frame.get(17) != Some(&1) {
        return None;
    }
    Some(u64::from_be_bytes(frame.get(38..46)?.try_into().ok()?))
}

/// A proxy in front of the relay that counts the chunks going toward it and, once `hold_at`
/// have, holds everything (its one thread waits) until the test releases it: the test then
/// acts (kills a client, restarts the relay) at a known point of the transfer, however fast
/// the machine. A transfer in a release build is over before a progress event could say
/// where it is.
struct Gate {
    sent: Arc<AtomicU64>,
    held: Arc<AtomicBool>,
    release: Arc<AtomicBool>,
}

impl Gate {
    fn at(hold_at: u64) -> (Gate, impl Fn(&str) -> Proxy) {
        let gate = Gate {
            sent: Arc::new(AtomicU64::new(0)),
            held: Arc::new(AtomicBool::new(false)),
            release: Arc::new(AtomicBool::new(false)),
        };
        let (sent, held, release) = (gate.sent.clone(), gate.held.clone(), gate.release.clone());
        let start = move |url: &str| {
            let (sent, held, release) = (sent.clone(), held.clone(), release.clone());
            Proxy::start_data(
                url,
                Arc::new(move |toward, frame| {
                    if toward == Toward::Relay
                        && chunk_index(frame).is_some()
                        && sent.fetch_add(1, Ordering::SeqCst) + 1 == hold_at
                    {
                        held.store(true, Ordering::SeqCst);
                        // (Bounded: a test that never releases fails on its own.)
                        for _ in 0..6_000 {
                            if release.load(Ordering::SeqCst) {
                                break;
                            }
                            std::thread::sleep(std::time::Duration::from_millis(10));
                        }
                    }
                    vec![frame.to_vec()]
                }),
            )
        };
        (gate, start)
    }

    /// Waits until the proxy holds, then a moment more for the clients to take in what
    /// reached them (and the receiver to sync it).
    fn wait_held(&self) {
        for _ in 0..6_000 {
            if self.held.load(Ordering::SeqCst) {
                std::thread::sleep(std::time::Duration::from_millis(500));
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("the transfer never reached the gate");
    }

    fn release(&self) {
        self.release.store(true, Ordering::SeqCst);
    }

    /// Chunks sent toward the relay so far.
    fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }
}

#[test]
fn a_50_mib_file_arrives_byte_identical() {
    let scene = Scene::new(50 * MIB);
    let mut bob = scene.bob();
    bob.close_stdin();
    bob.expect("resumed");
    let alice_events = Scene::success(scene.alice());
    assert_eq!(
        named(&alice_events, "file_sent")[0]["sha256"],
        sha(&scene.data)
    );
    scene.received_intact(&Scene::success(bob));
}

/// Killed halfway through 50 MiB, the receiver resumes from what it had made durable: what
/// is sent again is at most the durable window (protocol.md 3.10, "Resume"), 256 chunks.
#[test]
fn a_receiver_killed_halfway_then_resumed_completes_with_the_right_hash() {
    let chunks = (50 * MIB as u64).div_ceil(CHUNK);
    let (gate, start) = Gate::at(chunks / 2);
    let scene = Scene::behind(50 * MIB, Some(&start));
    let mut bob = scene.bob();
    bob.close_stdin();
    bob.expect("resumed");
    let alice = scene.alice();
    // SIGKILL once half has gone: no chance to save anything more.
    gate.wait_held();
    bob.kill();
    gate.release();
    let parts = leftover_parts(&scene.downloads);
    assert_eq!(parts.len(), 1, "the .part stays for the resume: {parts:?}");

    let mut bob = scene.bob();
    bob.close_stdin();
    let bob_events = Scene::success(bob);
    // The offer is not made again: the resumed receiver goes on from its record.
    assert!(
        named(&bob_events, "file_offer").is_empty(),
        "{bob_events:?}"
    );
    scene.received_intact(&bob_events);
    let alice_events = Scene::success(alice);
    assert_eq!(
        named(&alice_events, "file_sent")[0]["sha256"],
        sha(&scene.data)
    );
    let again = gate.sent() - chunks;
    println!("the receiver's restart cost {again} chunks sent again");
    assert!(again <= 256, "{again} chunks were sent again");
}

/// The sender goes offline (killed) and comes back (`send` again): the stored transfer goes
/// on from what the receiver has, which it kept, so what went before is not sent again
/// beyond what was in flight (the window, 8 chunks).
#[test]
fn a_sender_killed_halfway_then_sending_again_goes_on_with_the_same_transfer() {
    let chunks = (12 * MIB as u64).div_ceil(CHUNK);
    let (gate, start) = Gate::at(chunks / 4);
    let scene = Scene::behind(12 * MIB, Some(&start));
    let mut bob = scene.bob();
    bob.close_stdin();
    bob.expect("resumed");
    let alice = scene.alice();
    gate.wait_held();
    alice.kill();
    gate.release();

    // The same command again: the stored transfer goes on (no second offer).
    let alice_events = Scene::success(scene.alice());
    assert_eq!(
        named(&alice_events, "file_sent").len(),
        1,
        "{alice_events:?}"
    );
    let bob_events = Scene::success(bob);
    assert_eq!(named(&bob_events, "file_offer").len(), 1, "{bob_events:?}");
    scene.received_intact(&bob_events);
    let again = gate.sent() - chunks;
    assert!(again <= 8, "{again} chunks were sent again");
}

#[test]
fn a_relay_restarted_mid_transfer_the_file_completes() {
    let (gate, start) = Gate::at((20 * MIB as u64).div_ceil(CHUNK) / 4);
    let mut scene = Scene::behind(20 * MIB, Some(&start));
    let mut bob = scene.bob();
    bob.close_stdin();
    bob.expect("resumed");
    let alice = scene.alice();
    gate.wait_held();
    // Its memory is gone; both clients reconnect and re-attach with their tokens.
    scene.restart_relay();
    gate.release();
    let alice_events = Scene::success(alice);
    assert_eq!(
        named(&alice_events, "file_sent")[0]["sha256"],
        sha(&scene.data)
    );
    scene.received_intact(&Scene::success(bob));
}

/// A connection cut mid-transfer (the network, not a process): the clients reconnect by
/// themselves and the file completes.
#[test]
fn a_connection_cut_mid_transfer_the_file_completes() {
    let chunks = Arc::new(AtomicU64::new(0));
    let cut_once = Arc::new(AtomicBool::new(false));
    let start = {
        let chunks = chunks.clone();
        move |url: &str| {
            let counted = chunks.clone();
            let seen = chunks.clone();
            let cut_once = cut_once.clone();
            Proxy::start_data_cutting(
                url,
                Arc::new(move |_, frame| {
                    if chunk_index(frame).is_some() {
                        counted.fetch_add(1, Ordering::SeqCst);
                    }
                    vec![frame.to_vec()]
                }),
                Arc::new(move || {
                    seen.load(Ordering::SeqCst) >= 60 && !cut_once.swap(true, Ordering::SeqCst)
                }),
            )
        }
    };
    let scene = Scene::behind(8 * MIB, Some(&start));
    let mut bob = scene.bob();
    bob.close_stdin();
    bob.expect("resumed");
    let alice_events = Scene::success(scene.alice());
    assert_eq!(
        named(&alice_events, "file_sent")[0]["sha256"],
        sha(&scene.data)
    );
    scene.received_intact(&Scene::success(bob));
    assert!(chunks.load(Ordering::SeqCst) >= 60, "the cut happened");
}

/// Names a hostile peer might offer (`send --as` sends them as given): each lands inside the
/// download directory, made safe, or is refused (`bad_name`); nothing is created elsewhere.
/// (A NUL cannot be passed as an argument; the unit tests in client/src/files/names.rs have
/// it.)
#[test]
fn hostile_names_land_inside_the_download_dir_or_are_refused() {
    let scene = Scene::new(1000);
    let mut bob = receiver(
        &scene.url,
        scene.bob_dir.path(),
        &scene.downloads,
        &["--accept-files"],
    );
    bob.expect("resumed");
    let long = "n".repeat(10_000);
    let cases: [(&str, Option<&str>); 9] = [
        ("../x", None),
        ("/etc/x", None),
        ("a/../../x", None),
        ("..\\..\\x", None),
        ("C:\\x", None),
        ("bell\x07\x1b[31mred", Some("bell__[31mred")),
        ("CON", Some("_CON")),
        ("dir/con.txt", Some("dir/_con.txt")),
        (&long, Some(&long[..200])),
    ];
    for (name, landed) in cases {
        let source = scene.source.display().to_string();
        let args = ["--timeout", "60", "send", "--as", name, &source];
        let mut alice = Client::spawn(&scene.url, scene.alice_dir.path(), "alice", &args);
        alice.close_stdin();
        let (status, events) = alice.wait_long();
        match landed {
            None => {
                assert_eq!(status.code(), Some(8), "{name:?}: {events:?}");
                assert_eq!(named(&events, "file_failed")[0]["code"], "bad_name");
                assert_eq!(bob.expect("file_failed")["code"], "bad_name", "{name:?}");
            }
            Some(safe) => {
                assert!(status.success(), "{name:?}: {status} {events:?}");
                let received = bob.expect("file_received");
                let path = PathBuf::from(received["path"].as_str().unwrap());
                assert_eq!(path, scene.downloads.join(safe), "{name:?}");
                assert!(
                    path.components()
                        .all(|c| matches!(c, Component::Normal(_) | Component::RootDir))
                );
                assert!(std::fs::read(&path).unwrap() == scene.data);
            }
        }
    }
    bob.close_stdin();
    let (status, _) = bob.wait_long();
    assert!(status.success());
    // Nothing but the source and the download directory where the work began.
    let mut made: Vec<_> = std::fs::read_dir(scene.work.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    made.sort();
    assert_eq!(made, ["big.bin", "downloads"]);
    assert!(leftover_parts(&scene.downloads).is_empty());
}

/// A relay that alters, drops, repeats or swaps one chunk: the file fails on both sides with
/// that act's code, and nothing that looks like the file (nor its `.part`) is left.
#[test]
fn a_hostile_relay_altering_dropping_repeating_or_swapping_a_chunk_fails_the_file() {
    type Act = fn(&[u8], &Mutex<Option<Vec<u8>>>) -> Option<Vec<Vec<u8>>>;
    let cases: [(&str, Act, &str); 4] = [
        (
            "altered",
            |frame, _| {
                let mut changed = frame.to_vec();
                let at = changed.len() - 20;
                changed[at] ^= 1;
                (chunk_index(frame) == Some(3)).then(|| vec![changed])
            },
            "chunk_corrupt",
        ),
        (
            "dropped",
            |frame, _| (chunk_index(frame) == Some(3)).then(Vec::new),
            "chunk_missing",
        ),
        (
            "repeated",
            |frame, _| (chunk_index(frame) == Some(3)).then(|| vec![frame.to_vec(); 2]),
            "chunk_replayed",
        ),
        (
            "swapped",
            |frame, held| match chunk_index(frame) {
                Some(3) => {
                    *held.lock().unwrap() = Some(frame.to_vec());
                    Some(Vec::new())
                }
                Some(4) => Some(vec![frame.to_vec(), held.lock().unwrap().take()?]),
                _ => None,
            },
            "chunk_missing",
        ),
    ];
    for (what, act, code) in cases {
        let done = Arc::new(AtomicBool::new(false));
        let held = Arc::new(Mutex::new(None));
        let tamper: DataTamper = Arc::new(move |toward, frame| {
            if toward == Toward::Relay
                && !done.load(Ordering::SeqCst)
                && let Some(frames) = act(frame, &held)
            {
                // (The swap is done once both have passed.)
                done.store(held.lock().unwrap().is_none(), Ordering::SeqCst);
                return frames;
            }
            vec![frame.to_vec()]
        });
        let start = move |url: &str| Proxy::start_data(url, tamper.clone());
        let scene = Scene::behind(MIB, Some(&start));
        let mut bob = receiver(
            &scene.url,
            scene.bob_dir.path(),
            &scene.downloads,
            &["--accept-files"],
        );
        bob.expect("resumed");
        let (status, events) = scene.alice().wait_long();
        assert_eq!(status.code(), Some(8), "{what}: {events:?}");
        assert_eq!(named(&events, "file_failed")[0]["code"], code, "{what}");
        assert_eq!(bob.expect("file_failed")["code"], code, "{what}");
        bob.close_stdin();
        let (_, bob_events) = bob.wait_long();
        assert!(named(&bob_events, "file_received").is_empty(), "{what}");
        assert!(leftover_files(&scene.downloads).is_empty(), "{what}");
    }
}

#[test]
fn a_chat_line_sent_during_a_transfer_arrives_while_it_runs() {
    // Chunks slowed to one per 2 ms on their way to the relay (text frames pass between
    // them): a release build would otherwise finish 12 MiB before a line could cross.
    let slow = |url: &str| {
        Proxy::start_data(
            url,
            Arc::new(|toward, frame| {
                if toward == Toward::Relay && chunk_index(frame).is_some() {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                vec![frame.to_vec()]
            }),
        )
    };
    let scene = Scene::behind(12 * MIB, Some(&slow));
    let mut bob = scene.bob();
    bob.expect("resumed");
    let mut alice = scene.alice();
    bob.expect("file_progress");
    bob.send_line("while the file moves");
    bob.close_stdin();
    // Alice (whose `send` reads no lines but shows them) has it before the file is done.
    assert_eq!(alice.expect("message")["text"], "while the file moves");
    assert!(
        named(&alice.seen, "file_sent").is_empty(),
        "the line came only after the file: {:?}",
        alice.seen
    );
    let alice_events = Scene::success(alice);
    assert_eq!(
        named(&alice_events, "file_sent")[0]["sha256"],
        sha(&scene.data)
    );
    scene.received_intact(&Scene::success(bob));
}

fn leftover_parts(dir: &Path) -> Vec<PathBuf> {
    leftover_files(dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "part"))
        .collect()
}

fn leftover_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(leftover_files(&path));
        } else {
            found.push(path);
        }
    }
    found
}

/// Waiting for a transfer: a few STEPs (a debug build moves a few MiB in seconds).
trait WaitLong {
    fn wait_long(self) -> (std::process::ExitStatus, Vec<serde_json::Value>);
}

impl WaitLong for Client {
    fn wait_long(mut self) -> (std::process::ExitStatus, Vec<serde_json::Value>) {
        match self.wait_up_to(STEP * 4) {
            Some(done) => done,
            None => panic!(
                "the client did not finish within {:?}: {:?}",
                STEP * 4,
                self.seen
            ),
        }
    }
}

//! Files through the real binaries and a real relay (protocol.md 3.10): a few MiB of random
//! bytes arrive byte-identical, a folder keeps its nested paths, an offer is declined without
//! `--accept-files`, `--max-file-bytes` refuses a larger one, and a receiver killed halfway
//! finishes after a resume with the right hash.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::{Path, PathBuf};

use parley_e2e::{Client, RelayProcess, STEP, TempDir};
use rand::RngCore;
use sha2::{Digest, Sha256};

/// Alice and Bob paired through `relay`; both exited. Returns their state directories.
fn paired(relay: &RelayProcess) -> (TempDir, TempDir) {
    let (alice_dir, bob_dir) = (TempDir::new("files-alice"), TempDir::new("files-bob"));
    let mut alice = Client::spawn(relay.url(), alice_dir.path(), "alice", &["host"]);
    let code = alice.expect("invite")["code"].as_str().unwrap().to_string();
    let mut bob = Client::spawn(relay.url(), bob_dir.path(), "bob", &["join", &code]);
    alice.expect("paired");
    bob.expect("paired");
    alice.close_stdin();
    bob.close_stdin();
    let (a, _) = alice.wait();
    let (b, _) = bob.wait();
    assert!(a.success() && b.success(), "{a} {b}");
    (alice_dir, bob_dir)
}

fn random_file(path: &Path, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    rand::rng().fill_bytes(&mut data);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(path, &data).unwrap();
    data
}

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// `parley resume` as a receiving script: offers accepted (or not), files into `downloads`.
fn receiver(relay: &RelayProcess, dir: &Path, downloads: &Path, extra: &[&str]) -> Client {
    let mut args = vec![
        "--download-dir".to_string(),
        downloads.display().to_string(),
        "--timeout".into(),
        "120".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push("resume".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Client::spawn(relay.url(), dir, "bob", &args)
}

fn sender(relay: &RelayProcess, dir: &Path, paths: &[&Path]) -> Client {
    let mut args = vec!["--timeout".to_string(), "120".into(), "send".into()];
    args.extend(paths.iter().map(|p| p.display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut client = Client::spawn(relay.url(), dir, "alice", &args);
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
    let (alice_dir, bob_dir) = paired(&relay);
    let work = TempDir::new("files-work");
    let source = work.path().join("random.bin");
    let data = random_file(&source, 3 * 1024 * 1024 + 12_345);
    let downloads = work.path().join("downloads");

    let mut bob = receiver(
        &relay,
        bob_dir.path(),
        &downloads,
        &["--accept-files", "--exit-after-files", "1"],
    );
    bob.close_stdin();
    bob.expect("resumed");
    let alice = sender(&relay, alice_dir.path(), &[&source]);

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
    let (alice_dir, bob_dir) = paired(&relay);
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
        &relay,
        bob_dir.path(),
        &downloads,
        &["--accept-files", "--exit-after-files", "3"],
    );
    bob.close_stdin();
    bob.expect("resumed");
    let alice = sender(&relay, alice_dir.path(), &[&tree]);
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
    let (alice_dir, bob_dir) = paired(&relay);
    let work = TempDir::new("files-work");
    let source = work.path().join("x.bin");
    random_file(&source, 5000);
    let downloads = work.path().join("downloads");

    // Not a terminal, no --accept-files: nobody to ask, so no.
    let mut bob = receiver(&relay, bob_dir.path(), &downloads, &[]);
    bob.expect("resumed");
    let alice = sender(&relay, alice_dir.path(), &[&source]);
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
    let (alice_dir, bob_dir) = paired(&relay);
    let work = TempDir::new("files-work");
    let source = work.path().join("big.bin");
    random_file(&source, 5000);
    let downloads = work.path().join("downloads");

    let mut bob = receiver(
        &relay,
        bob_dir.path(),
        &downloads,
        &["--accept-files", "--max-file-bytes", "4999"],
    );
    bob.expect("resumed");
    let alice = sender(&relay, alice_dir.path(), &[&source]);
    assert_eq!(bob.expect("file_offer")["size"], 5000);
    assert_eq!(bob.expect("file_failed")["code"], "too_large");
    let (alice_status, alice_events) = alice.wait_long();
    assert_eq!(alice_status.code(), Some(8), "{alice_events:?}");
    assert_eq!(named(&alice_events, "file_failed")[0]["code"], "too_large");
    assert!(!downloads.exists() || leftover_files(&downloads).is_empty());
}

/// Alice paired with Bob, and a file of `len` random bytes for her to send.
struct Scene {
    relay: RelayProcess,
    alice_dir: TempDir,
    bob_dir: TempDir,
    _work: TempDir,
    source: PathBuf,
    data: Vec<u8>,
    downloads: PathBuf,
}

impl Scene {
    fn new(len: usize) -> Scene {
        let relay = RelayProcess::start(&[]);
        let (alice_dir, bob_dir) = paired(&relay);
        let work = TempDir::new("files-work");
        let source = work.path().join("big.bin");
        let data = random_file(&source, len);
        let downloads = work.path().join("downloads");
        Scene {
            relay,
            alice_dir,
            bob_dir,
            _work: work,
            source,
            data,
            downloads,
        }
    }

    /// Bob receiving one file, accepted; his stdin left open.
    fn bob(&self) -> Client {
        let accept = ["--accept-files", "--exit-after-files", "1"];
        receiver(&self.relay, self.bob_dir.path(), &self.downloads, &accept)
    }

    fn alice(&self) -> Client {
        sender(&self.relay, self.alice_dir.path(), &[&self.source])
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

    /// Waits until `client` reports that a quarter of the file is durable.
    fn until_a_quarter(&self, client: &mut Client) {
        loop {
            let progress = client.expect("file_progress");
            if progress["bytes"].as_u64().unwrap() >= self.data.len() as u64 / 4 {
                return;
            }
        }
    }
}

#[test]
fn a_receiver_killed_halfway_then_resumed_completes_with_the_right_hash() {
    let scene = Scene::new(12 * 1024 * 1024);
    let mut bob = scene.bob();
    bob.close_stdin();
    bob.expect("resumed");
    let alice = scene.alice();
    // SIGKILL once a quarter is durable: no chance to save anything more.
    scene.until_a_quarter(&mut bob);
    bob.kill();
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
}

#[test]
fn a_sender_killed_halfway_then_sending_again_goes_on_with_the_same_transfer() {
    let scene = Scene::new(12 * 1024 * 1024);
    let mut bob = scene.bob();
    bob.close_stdin();
    bob.expect("resumed");
    let mut alice = scene.alice();
    scene.until_a_quarter(&mut alice);
    alice.kill();

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
}

#[test]
fn a_chat_line_sent_during_a_transfer_arrives_while_it_runs() {
    let scene = Scene::new(12 * 1024 * 1024);
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

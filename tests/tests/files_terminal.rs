//! Files on a terminal (README "Files", protocol.md 3.10): the real `parley` on a
//! pseudo-terminal, human output, typed at like a person. The receiver is asked about an
//! offer and its answer decides (`y` takes the file, byte-identical; `n` declines it and the
//! sender hears `declined`); `/send` typed in the chat sends a file (a path with spaces; a
//! path that is not there is an error line and the chat goes on); progress and the last
//! lines are shown.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use parley_e2e::{Client, RelayProcess, STEP, TempDir, binaries, pair_and_quit, random_file};
use portable_pty::{CommandBuilder, PtySize, native_pty_system};

/// `parley` on a pseudo-terminal: what it printed so far, and a keyboard.
struct Terminal {
    child: Box<dyn portable_pty::Child + Send + Sync>,
    keyboard: Arc<Mutex<Box<dyn Write + Send>>>,
    screen: Arc<Mutex<String>>,
    /// What `expect` has matched up to, in `screen`.
    read_to: usize,
}

impl Terminal {
    /// `parley --relay URL --state-dir DIR --name NAME ARGS...` (no `--json`) on a terminal.
    fn spawn(relay_url: &str, state_dir: &Path, name: &str, args: &[&str]) -> Terminal {
        let pair = native_pty_system()
            .openpty(PtySize {
                rows: 30,
                cols: 120,
                pixel_width: 0,
                pixel_height: 0,
            })
            .unwrap();
        let mut command = CommandBuilder::new(&binaries().client);
        command.args(["--relay", relay_url, "--name", name, "--state-dir"]);
        command.arg(state_dir);
        command.args(args);
        command.env("TERM", "xterm");
        command.env_remove("NO_COLOR");
        let child = pair.slave.spawn_command(command).unwrap();
        drop(pair.slave);
        let keyboard = Arc::new(Mutex::new(pair.master.take_writer().unwrap()));
        let screen = Arc::new(Mutex::new(String::new()));
        let mut reader = pair.master.try_clone_reader().unwrap();
        let (answer, shown) = (keyboard.clone(), screen.clone());
        // The master must live as long as the reader reads.
        let master = pair.master;
        std::thread::spawn(move || {
            let _master = master;
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                // The line editor asks where the cursor is; a terminal answers.
                if text.contains("\x1b[6n") {
                    let mut keys = answer.lock().unwrap();
                    let _ = keys.write_all(b"\x1b[1;1R");
                    let _ = keys.flush();
                }
                shown.lock().unwrap().push_str(&text);
            }
        });
        Terminal {
            child,
            keyboard,
            screen,
            read_to: 0,
        }
    }

    fn screen(&self) -> String {
        self.screen.lock().unwrap().clone()
    }

    /// Waits (bounded) until `needle` is printed after what was matched so far; returns the
    /// output up to and including it.
    fn expect(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + STEP;
        loop {
            let screen = self.screen();
            if let Some(at) = screen.get(self.read_to..).and_then(|s| s.find(needle)) {
                let end = self.read_to + at + needle.len();
                let seen = screen[self.read_to..end].to_string();
                self.read_to = end;
                return seen;
            }
            if Instant::now() > deadline {
                panic!("`{needle}` not shown within {STEP:?}; the screen:\n{screen:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Types `text` and Enter, once the line editor shows `prompt`.
    fn type_line(&mut self, text: &str) {
        // A moment for the editor to take the terminal after drawing its prompt.
        std::thread::sleep(Duration::from_millis(300));
        let mut keys = self.keyboard.lock().unwrap();
        keys.write_all(text.as_bytes()).unwrap();
        keys.write_all(b"\r").unwrap();
        keys.flush().unwrap();
    }

    /// Ctrl-D, then waits (bounded) for the exit; its code.
    fn quit(mut self) -> u32 {
        std::thread::sleep(Duration::from_millis(300));
        {
            let mut keys = self.keyboard.lock().unwrap();
            keys.write_all(b"\x04").unwrap();
            keys.flush().unwrap();
        }
        let deadline = Instant::now() + STEP;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.exit_code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("parley did not quit; the screen:\n{:?}", self.screen());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

/// `parley --json send PATH` as Alice, on a thread of its own: its exit code and events.
fn send_in_background(
    relay: &RelayProcess,
    dir: &Path,
    path: &Path,
) -> std::thread::JoinHandle<(Option<i32>, Vec<serde_json::Value>)> {
    let (relay, dir, path) = (
        relay.url().to_string(),
        dir.to_path_buf(),
        path.display().to_string(),
    );
    std::thread::spawn(move || {
        let mut alice = Client::spawn(&relay, &dir, "alice", &["--timeout", "60", "send", &path]);
        alice.close_stdin();
        let (status, events) = alice
            .wait_up_to(Duration::from_secs(90))
            .expect("parley send did not finish");
        (status.code(), events)
    })
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| entries.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default()
}

/// Bob on a terminal is asked; `y` takes the file, which arrives byte-identical, with a
/// progress line and a last line; `n` declines the next, and the sender hears `declined`.
#[test]
fn the_person_is_asked_and_yes_takes_the_file_and_no_declines_it() {
    let relay = RelayProcess::start(&[]);
    let (alice_dir, bob_dir) = pair_and_quit(relay.url());
    let work = TempDir::new("tty-work");
    let source = work.path().join("report.bin");
    let data = random_file(&source, 2_300_000);
    let downloads = work.path().join("downloads");
    let download_dir = downloads.display().to_string();

    let mut bob = Terminal::spawn(
        relay.url(),
        bob_dir.path(),
        "bob",
        &[
            "--download-dir",
            &download_dir,
            "--timeout",
            "120",
            "resume",
        ],
    );
    bob.expect("Resumed session with alice");
    let sender = send_in_background(&relay, alice_dir.path(), &source);
    bob.expect("alice offers report.bin, 2.3 MB: accept? [y/N]");
    // Nothing is written before the answer.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        files_in(&downloads).is_empty(),
        "{:?}",
        files_in(&downloads)
    );
    bob.type_line("y");
    let progress = bob.expect("received report.bin (2.3 MB) \u{2192} ");
    assert!(
        progress.contains("~ report.bin"),
        "no progress line: {progress:?}"
    );
    assert!(progress.contains(" / 2.3 MB"), "{progress:?}");
    let (code, events) = sender.join().unwrap();
    assert_eq!(code, Some(0), "{events:?}");
    assert!(
        std::fs::read(downloads.join("report.bin")).unwrap() == data,
        "the bytes differ"
    );

    // A folder: its offers are asked one at a time, in order. No to the first, yes to the
    // second.
    let folder = work.path().join("pair");
    let first = random_file(&folder.join("a.bin"), 1000);
    let second = random_file(&folder.join("b.bin"), 2000);
    let sender = send_in_background(&relay, alice_dir.path(), &folder);
    bob.expect("alice offers pair/a.bin, 1.0 kB: accept? [y/N]");
    bob.type_line("n");
    bob.expect("pair/a.bin: ");
    bob.expect("(declined)");
    bob.expect("alice offers pair/b.bin, 2.0 kB: accept? [y/N]");
    bob.type_line("yes");
    bob.expect("received pair/b.bin (2.0 kB)");
    let (code, events) = sender.join().unwrap();
    assert_eq!(code, Some(8), "{events:?}");
    let failed: Vec<_> = events
        .iter()
        .filter(|e| e["event"] == "file_failed")
        .collect();
    assert_eq!(failed.len(), 1, "{events:?}");
    assert_eq!(failed[0]["code"], "declined", "{events:?}");
    assert!(!downloads.join("pair/a.bin").exists());
    assert!(std::fs::read(downloads.join("pair/b.bin")).unwrap() == second);
    assert_ne!(first, second);
    // The chat goes on after the answers: a line is a message again.
    bob.type_line("thanks");
    assert_eq!(bob.quit(), 0);
}

/// Alice types `/send PATH` in her chat (a path with spaces); a path that is not there is
/// an error line and the chat goes on. Bob, a script with `--accept-files`, gets the file.
#[test]
fn send_typed_in_the_chat_sends_a_file() {
    let relay = RelayProcess::start(&[]);
    let (alice_dir, bob_dir) = pair_and_quit(relay.url());
    let work = TempDir::new("tty-work");
    let source = work.path().join("my notes").join("big file.bin");
    let data = random_file(&source, 1_500_000);
    let downloads = work.path().join("downloads");

    let mut bob = Client::spawn(
        relay.url(),
        bob_dir.path(),
        "bob",
        &[
            "--accept-files",
            "--exit-after-files",
            "1",
            "--timeout",
            "120",
            "--download-dir",
            &downloads.display().to_string(),
            "resume",
        ],
    );
    bob.close_stdin();
    bob.expect("resumed");
    let mut alice = Terminal::spawn(relay.url(), alice_dir.path(), "alice", &["resume"]);
    alice.expect("Resumed session with bob");
    alice.expect("> ");
    alice.type_line("//slash");
    alice.type_line(&format!(
        "/send {}",
        work.path().join("nothing here").display()
    ));
    alice.expect("! cannot read ");
    alice.type_line("/sned x");
    alice.expect("! not sent: commands are /send PATH");
    alice.type_line(&format!("/send {}", source.display()));
    let shown = alice.expect("sent big file.bin (1.5 MB)");
    assert!(
        shown.contains("offering big file.bin (1.5 MB)"),
        "{shown:?}"
    );
    assert!(
        shown.contains("~ big file.bin"),
        "no progress line: {shown:?}"
    );
    let (status, events) = bob
        .wait_up_to(Duration::from_secs(60))
        .expect("bob did not finish");
    assert!(status.success(), "{status}: {events:?}");
    let received: Vec<_> = events
        .iter()
        .filter(|e| e["event"] == "file_received")
        .collect();
    assert_eq!(received.len(), 1, "{events:?}");
    assert!(
        std::fs::read(downloads.join("big file.bin")).unwrap() == data,
        "the bytes differ"
    );
    // What was typed was no chat message; `//slash` went as `/slash`.
    let texts: Vec<_> = events
        .iter()
        .filter(|e| e["event"] == "message")
        .map(|e| e["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(texts, ["/slash"]);
    assert_eq!(alice.quit(), 0);
}

//! A real `redis-server` for the cluster tests, on a free port in a private directory; stopped
//! when dropped. `.ci/run` installs Debian's redis-server when it is missing.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{STEP, TempDir};

pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
    append_only: bool,
}

fn server_binary() -> PathBuf {
    ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("redis-server"))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl RedisServer {
    /// Without persistence: what a cluster needs while Redis stays up.
    pub fn start() -> RedisServer {
        RedisServer::launch(free_port(), TempDir::new("redis"), false)
    }

    /// With an append-only file (fsync every write), so a restart keeps every key.
    pub fn start_persistent() -> RedisServer {
        RedisServer::launch(free_port(), TempDir::new("redis"), true)
    }

    fn launch(port: u16, dir: TempDir, append_only: bool) -> RedisServer {
        let mut command = Command::new(server_binary());
        command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--protected-mode", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if append_only {
            command.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            command.args(["--appendonly", "no"]);
        }
        let mut child = command.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot start redis-server ({e}); install it (Debian: apt-get install redis-server)"
            )
        });
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.contains("Ready to accept connections") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(STEP)
            .expect("redis-server did not become ready");
        RedisServer {
            child: Some(child),
            port,
            dir,
            append_only,
        }
    }

    /// Where it keeps its files (the append-only file, when persistent).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: whatever was not persisted is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and directory (its append-only file, if any).
    pub fn restart(&mut self) {
        self.kill();
        let dir = std::mem::replace(&mut self.dir, TempDir::new("redis-spent"));
        let again = RedisServer::launch(self.port, dir, self.append_only);
        *self = again;
    }

    /// Runs `redis-cli` against this server; its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("cannot run redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until `check` holds for `redis-cli`'s answer to `args`.
    pub fn wait_for(&self, args: &[&str], check: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + STEP;
        loop {
            let answer = self.cli(args);
            if check(&answer) {
                return answer;
            }
            assert!(Instant::now() < deadline, "redis-cli {args:?}: {answer}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

//! The scripted example README.md shows must actually work.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::process::Command;

#[test]
fn scripted_chat_example_runs() {
    let bins = parley_e2e::binaries();
    let bin_dir = bins.client.parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/scripted-chat.sh");
    let output = Command::new("timeout")
        .args(["120", "bash", script])
        .env("PATH", path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("alice received: hi alice, bob here"),
        "{stdout}"
    );
    assert!(stdout.contains("bob received:   hello bob"), "{stdout}");
}

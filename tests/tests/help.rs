//! `parley --help` must describe what the binary does, as README.md does.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::process::Command;

const README: &str = include_str!("../../README.md");

fn help() -> String {
    let out = Command::new(&parley_e2e::binaries().client)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    // Joined into one line: clap may wrap it anywhere.
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn help_lists_every_event_the_readme_documents() {
    let help = help();
    let events: Vec<&str> = README
        .lines()
        .skip_while(|l| !l.starts_with("| event |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .flat_map(|row| row.split('|').nth(1).unwrap().split(','))
        .map(|cell| cell.trim().trim_matches('`'))
        .collect();
    assert!(events.len() > 10, "{events:?}");
    for event in events {
        assert!(
            help.contains(event),
            "--help does not list the `{event}` event: {help}"
        );
    }
}

#[test]
fn help_says_a_script_waits_for_the_peers_receipts() {
    // The binary waits for the peer's end-to-end receipt (`delivered`) before it exits at end
    // of input; only a person at a terminal may leave once the relay holds everything.
    let help = help();
    assert!(
        help.contains("once the peer has acknowledged everything typed"),
        "{help}"
    );
    assert!(
        !help.contains("once everything typed has reached the relay"),
        "{help}"
    );
}

#[test]
fn help_and_readme_document_wss_the_ca_file_and_the_certificate_error() {
    let help = help();
    let readme = README.split_whitespace().collect::<Vec<_>>().join(" ");
    for needle in [
        "wss://",
        "--ca-file",
        "PARLEY_CA_FILE",
        "relay_certificate",
        "plaintext_relay",
    ] {
        assert!(
            help.contains(needle),
            "--help does not mention {needle}: {help}"
        );
        assert!(
            readme.contains(needle),
            "README.md does not mention {needle}"
        );
    }
}

#!/usr/bin/env bash
# relay_vs_go.sh: one sitting of the relay harness (../shared/bench) against the Go baseline
# and parley-relay, one after the other, then a side-by-side table.
#
# usage: benches/relay_vs_go.sh [SCENARIO...]     (default: s1 s2 s3 s4)
# env:   HARNESS=../shared/bench  where the harness lives (relative to the workspace root)
#        RELAY_FLAGS=...          extra parley-relay flags (default: --worker-threads 1)
#        and the harness's own knobs (REPS, PIN, WARMUP, ...; see its run.sh)
# The summaries are kept in target/bench-harness/out/sitting-<time>/{go,parley}.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."

HARNESS="${HARNESS:-../shared/bench}"
RELAY_FLAGS="${RELAY_FLAGS:---worker-threads 1}"
SITTING="target/bench-harness/out/sitting-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$SITTING"

cargo build --release --locked -p parley-relay

# Flags the harness needs, none of which changes a default that matters to the scenarios:
# every connection comes from 127.0.0.1, so the per-address session allowance is lifted; S4
# sends 64 KiB payloads as 128 KiB of hex, over the default 64 KiB frame limit.
# S3 holds 10,000 connections from that one address: the per-address connection cap is
# lifted too. The relay's secret goes in the sitting's folder.
RELAY="$PWD/target/release/parley-relay $RELAY_FLAGS --listen 127.0.0.1:{PORT} \
--sessions-created-per-address 1000000 --max-frame-bytes 262144 \
--max-connections-per-address 1000000 --secret-file $PWD/$SITTING/relay.secret"

NAME=go "$HARNESS/run.sh" go "$@" | tee "$SITTING/go.jsonl"
NAME=parley "$HARNESS/run.sh" "$RELAY" "$@" | tee "$SITTING/parley.jsonl"
python3 "$HARNESS/report.py" "$SITTING/go.jsonl" "$SITTING/parley.jsonl" | tee "$SITTING/report.md"

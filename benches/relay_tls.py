#!/usr/bin/env python3
"""relay_tls.py: what TLS and metrics cost the relay, in one sitting.

Runs the bench harness's load generator (../shared/bench/loadgen, built by its run.sh into
target/bench-harness/bin) against parley-relay in several modes, one fresh relay per run,
interleaved (mode A run 1, mode B run 1, ..., then run 2), and prints medians:

  ws         plain WebSocket (the reference)
  wss        TLS at the relay (rustls, ring; a P-256 certificate made for the sitting)
  ws+scrape  --metrics-listen on, /metrics fetched every second during the run
  OLD        (with --old-relay PATH) another build of the relay over ws, e.g. one from
             before the metrics existed, to bound what counting costs on the hot path

Scenarios are the harness's S1 (throughput), S2 (latency at 1000 msg/s/client) and S4
(64 KiB payloads), with its flags. Relay CPU is utime+stime of the relay process
(/proc/PID/stat) over the measured run, after a warm-up run.

usage: benches/relay_tls.py [--reps 3] [--old-relay PATH] [s1 s2 s4]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOADGEN = os.path.join(ROOT, "target/bench-harness/bin/loadgen")
RELAY = os.path.join(ROOT, "target/release/parley-relay")
SCENARIOS = {
    "s1": "-pairs 100 -msgs 1000 -size 64 -window 32 -timeout 120",
    "s2": "-pairs 10 -msgs 2000 -size 64 -rate 1000 -window 0 -timeout 60",
    "s4": "-pairs 10 -msgs 200 -size 65536 -window 8 -timeout 120",
}
# As benches/relay_vs_go.sh: every connection comes from 127.0.0.1, S4's hex payloads are
# over the default frame limit.
COMMON = [
    "--sessions-created-per-address", "1000000",
    "--max-connections-per-address", "1000000",
    "--max-frame-bytes", "262144",
    "--worker-threads", "1",
]
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return int(rest[11]) + int(rest[12])


def start(binary, args, tmp):
    proc = subprocess.Popen(
        [binary, "--listen", "127.0.0.1:0", "--secret-file", os.path.join(tmp, "secret"), *COMMON, *args],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "RUST_LOG": "warn"},
    )
    url = proc.stdout.readline().strip().removeprefix("listening on ")
    metrics = proc.stdout.readline().strip().removeprefix("metrics on ") if "--metrics-listen" in args else None
    return proc, url + "/", metrics


def loadgen(url, flags):
    out = subprocess.run([LOADGEN, "-url", url, *flags.split()], capture_output=True, text=True, timeout=200)
    return json.loads(out.stdout)


def scraper(metrics_url, stop):
    while not stop.is_set():
        try:
            urllib.request.urlopen(metrics_url + "/metrics", timeout=2).read()
        except OSError:
            pass
        stop.wait(1.0)


def one_run(mode, binary, scenario, tmp, cert, key):
    args = []
    if mode == "wss":
        args = ["--tls-cert", cert, "--tls-key", key]
    if mode == "ws+scrape":
        args = ["--metrics-listen", "127.0.0.1:0"]
    proc, url, metrics = start(binary, args, tmp)
    try:
        loadgen(url, "-pairs 10 -msgs 1000 -size 64 -window 32 -timeout 60")  # warm-up
        time.sleep(0.5)
        stop = threading.Event()
        if metrics:
            threading.Thread(target=scraper, args=(metrics, stop), daemon=True).start()
        c0 = cpu_ticks(proc.pid)
        r = loadgen(url, SCENARIOS[scenario])
        c1 = cpu_ticks(proc.pid)
        stop.set()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    cpu = (c1 - c0) / TICKS
    got = r.get("msgs_received", 0)
    return {
        "throughput_msgs_per_s": r.get("throughput_msgs_per_s"),
        "p99_us": r.get("latency_us", {}).get("p99") if isinstance(r.get("latency_us"), dict) else r.get("latency_us.p99"),
        "relay_cpu_us_per_msg": cpu / got * 1e6 if got else None,
        "lost": r.get("lost"), "duplicated": r.get("duplicated"), "reordered": r.get("reordered"),
        "raw": r,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--old-relay")
    ap.add_argument("scenarios", nargs="*", default=["s1", "s2", "s4"])
    a = ap.parse_args()
    if not os.path.exists(LOADGEN):
        sys.exit("relay_tls.py: no load generator; run ../shared/bench/run.sh go s1 once to build it")
    subprocess.run(["cargo", "build", "--release", "--locked", "-p", "parley-relay"], cwd=ROOT, check=True)
    modes = [("ws", RELAY), ("wss", RELAY), ("ws+scrape", RELAY)]
    if a.old_relay:
        modes.append(("OLD", a.old_relay))
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                        "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-keyout", key, "-out", cert],
                       check=True, capture_output=True)
        results = {}
        for scenario in a.scenarios:
            for rep in range(a.reps):
                for mode, binary in modes:
                    r = one_run(mode, binary, scenario, tmp, cert, key)
                    results.setdefault((scenario, mode), []).append(r)
                    print(json.dumps({"scenario": scenario, "mode": mode, "rep": rep,
                                      **{k: v for k, v in r.items() if k != "raw"}}), file=sys.stderr)
    print(f"| scenario | mode | msgs/s | relay CPU µs/msg | vs ws | p99 µs | lost/dup/reordered |")
    print("|---|---|---|---|---|---|---|")
    for scenario in a.scenarios:
        base = statistics.median(r["relay_cpu_us_per_msg"] for r in results[(scenario, "ws")])
        for mode, _ in modes:
            rs = results[(scenario, mode)]
            med = lambda k: statistics.median(r[k] for r in rs if r[k] is not None)
            cpu = med("relay_cpu_us_per_msg")
            bad = sum((r["lost"] or 0) + (r["duplicated"] or 0) + (r["reordered"] or 0) for r in rs)
            print(f"| {scenario} | {mode} | {med('throughput_msgs_per_s'):,.0f} | {cpu:.2f} | "
                  f"{cpu / base:.2f} | {med('p99_us'):,.0f} | {bad} |")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""relay_cluster.py: what clustering costs the relay, in one sitting, against the Go baseline.

Runs the bench harness's load generator (../shared/bench/loadgen, built by its run.sh into
target/bench-harness/bin) in four modes, one fresh set of processes per run, interleaved
(every mode's run 1, then every mode's run 2, ...), and prints medians:

  single   one parley-relay, in memory (the reference)
  same     two parley-relay nodes on one redis-server (--redis), both sides of every pair on
           node A: what a cluster costs when members share a node
  cross    the same two nodes, the B side of every pair on node B (-url2): every message
           crosses nodes through Redis
  go       the harness's Go relay (the original stack), alone

CPU per message is utime+stime (/proc/PID/stat) over the measured run, after a warm-up run:
"relays" sums the relay processes (both nodes in a cluster), "redis" is redis-server's.
Redis runs as docs/deploy.md recommends (appendonly yes, appendfsync everysec).

`idle` (a separate command) holds N idle connections (CREATE_SESSION each) on two nodes,
half each, from two load generators, and reports each node's resident memory per connection
and Redis's memory per connection (INFO used_memory before and during the hold).

usage: benches/relay_cluster.py [--reps 3] [s1 s2 ...]
       benches/relay_cluster.py idle [--conns 30000]
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target/bench-harness/bin")
LOADGEN = os.path.join(BIN, "loadgen")
GO_RELAY = os.path.join(BIN, "relay-go")
RELAY = os.path.join(ROOT, "target/release/parley-relay")
SCENARIOS = {
    "s1": "-pairs 100 -msgs 1000 -size 64 -window 32 -timeout 120",
    "s2": "-pairs 10 -msgs 2000 -size 64 -rate 1000 -window 0 -timeout 60",
}
# As benches/relay_vs_go.sh: every connection comes from 127.0.0.1.
COMMON = [
    "--sessions-created-per-address", "1000000",
    "--max-connections-per-address", "1000000",
    "--max-pending-per-address", "1000000",
    "--max-frame-bytes", "262144",
    "--worker-threads", "1",
]
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return int(rest[11]) + int(rest[12])


def rss(pid):
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Redis:
    def __init__(self, tmp):
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "everysec", "--dir", tmp],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for line in self.proc.stdout:
            if "Ready to accept connections" in line:
                break
        self.url = f"redis://127.0.0.1:{self.port}"

    def used_memory(self):
        out = subprocess.run(["redis-cli", "-p", str(self.port), "INFO", "memory"],
                             capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("used_memory:"):
                return int(line.split(":")[1])
        return 0

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


def start_relay(args, tmp):
    proc = subprocess.Popen(
        [RELAY, "--listen", "127.0.0.1:0", "--secret-file", os.path.join(tmp, "secret"), *COMMON, *args],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "RUST_LOG": "warn"})
    url = proc.stdout.readline().strip().removeprefix("listening on ")
    return proc, url + "/"


def start_go():
    port = free_port()
    proc = subprocess.Popen([GO_RELAY, "-addr", f"127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, f"ws://127.0.0.1:{port}/"


def loadgen(url, flags, url2=None):
    args = [LOADGEN, "-url", url, *flags.split()]
    if url2:
        args += ["-url2", url2]
    out = subprocess.run(args, capture_output=True, text=True, timeout=200)
    return json.loads(out.stdout)


def setup(mode, tmp):
    """Processes for a mode: (relay procs, redis or None, url, url2)."""
    if mode == "go":
        proc, url = start_go()
        return [proc], None, url, None
    if mode == "single":
        proc, url = start_relay([], tmp)
        return [proc], None, url, None
    redis = Redis(tmp)
    a, url_a = start_relay(["--redis", redis.url], tmp)
    b, url_b = start_relay(["--redis", redis.url], tmp)
    return [a, b], redis, url_a, (url_b if mode == "cross" else None)


def one_run(mode, scenario, tmp):
    procs, redis, url, url2 = setup(mode, tmp)
    try:
        loadgen(url, "-pairs 10 -msgs 1000 -size 64 -window 32 -timeout 60", url2)  # warm-up
        time.sleep(0.5)
        c0 = [cpu_ticks(p.pid) for p in procs]
        r0 = cpu_ticks(redis.proc.pid) if redis else 0
        r = loadgen(url, SCENARIOS[scenario], url2)
        c1 = [cpu_ticks(p.pid) for p in procs]
        r1 = cpu_ticks(redis.proc.pid) if redis else 0
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=10)
        if redis:
            redis.stop()
    got = r.get("msgs_received", 0) or 0
    relays = sum(b - a for a, b in zip(c0, c1)) / TICKS
    store = (r1 - r0) / TICKS
    lat = r.get("latency_us") if isinstance(r.get("latency_us"), dict) else {}
    return {
        "throughput_msgs_per_s": r.get("throughput_msgs_per_s"),
        "p50_us": lat.get("p50"), "p99_us": lat.get("p99"),
        "relays_cpu_us_per_msg": relays / got * 1e6 if got else None,
        "redis_cpu_us_per_msg": store / got * 1e6 if got else None,
        "lost": r.get("lost"), "duplicated": r.get("duplicated"), "reordered": r.get("reordered"),
    }


def bench(a):
    modes = ["single", "same", "cross", "go"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for scenario in a.scenarios:
            for rep in range(a.reps):
                for mode in modes:
                    r = one_run(mode, scenario, tmp)
                    results.setdefault((scenario, mode), []).append(r)
                    print(json.dumps({"scenario": scenario, "mode": mode, "rep": rep, **r}), file=sys.stderr)
    print("| scenario | mode | msgs/s | vs go | relays CPU µs/msg | vs single | redis CPU µs/msg | p50 µs | p99 µs | lost/dup/reordered |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for scenario in a.scenarios:
        def med(mode, k):
            vals = [r[k] for r in results[(scenario, mode)] if r[k] is not None]
            return statistics.median(vals) if vals else float("nan")
        for mode in modes:
            rs = results[(scenario, mode)]
            bad = sum((r["lost"] or 0) + (r["duplicated"] or 0) + (r["reordered"] or 0) for r in rs)
            cpu = med(mode, "relays_cpu_us_per_msg")
            print(f"| {scenario} | {mode} | {med(mode, 'throughput_msgs_per_s'):,.0f} | "
                  f"{med(mode, 'throughput_msgs_per_s') / med('go', 'throughput_msgs_per_s'):.2f} | "
                  f"{cpu:.2f} | {cpu / med('single', 'relays_cpu_us_per_msg'):.2f} | "
                  f"{med(mode, 'redis_cpu_us_per_msg'):.2f} | {med(mode, 'p50_us'):,.0f} | "
                  f"{med(mode, 'p99_us'):,.0f} | {bad} |")


def idle(a):
    half = a.conns // 2
    with tempfile.TemporaryDirectory() as tmp:
        redis = Redis(tmp)
        nodes = [start_relay(["--redis", redis.url, "--max-connections", str(half + 100)], tmp) for _ in range(2)]
        time.sleep(1.5)  # heartbeats, reserved codes: the node's own baseline
        before = [rss(p.pid) for p, _ in nodes]
        redis_before = redis.used_memory()
        gens = []
        for i, (_, url) in enumerate(nodes):
            ready = os.path.join(tmp, f"ready{i}")
            gens.append((subprocess.Popen(
                [LOADGEN, "-url", url, "-idle", str(half), "-hold", str(a.hold), "-ready-file", ready,
                 "-timeout", "300"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True), ready))
        deadline = time.time() + 240
        while not all(os.path.exists(r) for _, r in gens) and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(a.hold / 2)
        during = [rss(p.pid) for p, _ in nodes]
        redis_during = redis.used_memory()
        outs = [json.loads(g.communicate(timeout=300)[0]) for g, _ in gens]
        for p, _ in nodes:
            p.terminate()
            p.wait(timeout=10)
        redis.stop()
    held = [o.get("established", o.get("connections", half)) for o in outs]
    print(json.dumps({"loadgen": outs}), file=sys.stderr)
    print(f"| node | connections held | relay RSS per connection (bytes) |")
    print("|---|---|---|")
    for i in range(2):
        print(f"| {i} | {held[i]:,} | {(during[i] - before[i]) / max(held[i], 1):,.0f} |")
    total = sum(held)
    print(f"\nRedis: {total:,} idle connections (sessions) add {redis_during - redis_before:,} bytes of "
          f"used_memory: {(redis_during - redis_before) / max(total, 1):,.0f} bytes per connection.")


def main():
    if not os.path.exists(LOADGEN) or not os.path.exists(GO_RELAY):
        sys.exit("relay_cluster.py: no load generator or Go relay; run ../shared/bench/run.sh go s1 once to build them")
    if not shutil.which("redis-server"):
        sys.exit("relay_cluster.py: needs redis-server (Debian: apt-get install redis-server)")
    subprocess.run(["cargo", "build", "--release", "--locked", "-p", "parley-relay"], cwd=ROOT, check=True,
                   env={**os.environ, "OPENSSL_NO_VENDOR": os.environ.get("OPENSSL_NO_VENDOR", "1")})
    if len(sys.argv) > 1 and sys.argv[1] == "idle":
        ap = argparse.ArgumentParser()
        ap.add_argument("--conns", type=int, default=30000)
        ap.add_argument("--hold", type=float, default=20)
        idle(ap.parse_args(sys.argv[2:]))
    else:
        ap = argparse.ArgumentParser()
        ap.add_argument("--reps", type=int, default=3)
        ap.add_argument("scenarios", nargs="*", default=["s1", "s2"])
        bench(ap.parse_args())


if __name__ == "__main__":
    main()

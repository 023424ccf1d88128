#!/usr/bin/env python3
"""End-to-end timings with the real binaries on loopback (BENCHMARKS.md, "End to end").

pair:   from starting `parley host` until both sides print `paired` (the guest is started as
        soon as the host prints its invite: a person reading the code out is not timed).
resume: from starting `parley resume` (the peer already resumed and waiting with a message
        queued for us) until the first `message` event is printed.

usage: python3 benches/e2e_timing.py [RUNS]   (needs target/release/{parley,parley-relay})
"""
import json, os, statistics, subprocess, sys, tempfile, time

BIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "release")
RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 10


def events(proc):
    for line in proc.stdout:
        try:
            yield json.loads(line)
        except ValueError:
            continue


def wait_for(proc, kind):
    for ev in events(proc):
        if ev.get("event") == kind:
            return ev
        if ev.get("event") == "error":
            raise RuntimeError(f"{kind}: {ev}")
    raise RuntimeError(f"{kind}: process ended")


def client(relay, state, name, *args, stdin=subprocess.PIPE):
    cmd = [f"{BIN}/parley", "--json", "--relay", relay, "--state-dir", state, "--name", name, *args]
    return subprocess.Popen(cmd, stdin=stdin, stdout=subprocess.PIPE, text=True, bufsize=1)


def main():
    relay = subprocess.Popen([f"{BIN}/parley-relay", "--listen", "127.0.0.1:0"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    url = relay.stdout.readline().split()[-1]
    pair_ms, resume_ms = [], []
    try:
        for i in range(RUNS):
            state = tempfile.mkdtemp(prefix="parley-e2e-")
            t0 = time.perf_counter()
            host = client(url, state, f"h{i}", "host")
            code = wait_for(host, "invite")["code"]
            guest = client(url, state, f"g{i}", "join", code)
            wait_for(host, "paired")
            wait_for(guest, "paired")
            pair_ms.append((time.perf_counter() - t0) * 1000)
            # Both quit with nothing typed.
            guest.stdin.close()
            host.stdin.close()
            host.wait(10); guest.wait(10)
            # The guest resumes and waits; the host resumes and is timed to its first message.
            g = client(url, state, f"g{i}", "resume", stdin=subprocess.PIPE)
            wait_for(g, "resumed")
            g.stdin.write("hello\n"); g.stdin.flush()
            wait_for(g, "sent")  # the relay holds it for the host, which is offline
            t0 = time.perf_counter()
            h = client(url, state, f"h{i}", "resume", "--exit-after", "1")
            wait_for(h, "message")
            resume_ms.append((time.perf_counter() - t0) * 1000)
            h.stdin.close(); g.stdin.close()
            for p in (h, g):
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
    finally:
        relay.terminate()
    for name, xs in (("pair", pair_ms), ("resume_to_first_message", resume_ms)):
        print(json.dumps({"what": name, "runs": len(xs), "median_ms": round(statistics.median(xs), 1),
                          "min_ms": round(min(xs), 1), "max_ms": round(max(xs), 1)}))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""A large file through a local relay on loopback: Parley against magic-wormhole, one sitting
(BENCHMARKS.md, "Files").

parley:   `parley-relay` on 127.0.0.1; Alice and Bob paired beforehand (not timed). Bob runs
          `parley resume --accept-files --exit-after-files 1`; Alice runs `parley send FILE`.
          Timed from starting the sender until both have exited (the sender exits once Bob has
          verified the whole file's SHA-256 and placed it). From Bob's first progress event
          until the file is his, Bob types a chat line every 50 ms; each one's latency is from
          writing it to Bob's stdin until Alice prints it.
wormhole: magic-wormhole 0.24 with a local mailbox server and a local transit relay, direct
          connections disabled (`--no-listen` on both sides, and no direct hints), so the data
          goes through the transit relay as Parley's goes through its relay. Timed from
          starting the sender until both have exited.

For every process: CPU seconds (user + system, from wait4) and peak RSS (VmHWM, read from
/proc every 20 ms until it exits). Files are written to a temporary directory on the same
disk for both.

usage: python3 benches/files.py [--mib 1024] [--reps 3] [parley] [wormhole]
needs: target/release/{parley,parley-relay};
       pip install magic-wormhole magic-wormhole-mailbox-server magic-wormhole-transit-relay
"""
import argparse, json, os, shutil, signal, socket, statistics, subprocess, sys, tempfile, threading, time

BIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "release")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PeakRss:
    """The peak resident set of a process, read from /proc (VmHWM) until it exits. (wait4's
    ru_maxrss is no good here: it counts the forked Python before exec.)"""

    def __init__(self, pid):
        self.pid, self.kib = pid, 0
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()

    def watch(self):
        while True:
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            self.kib = max(self.kib, int(line.split()[1]))
            except OSError:
                return
            time.sleep(0.02)


PEAKS = {}


def watch(proc):
    PEAKS[proc.pid] = PeakRss(proc.pid)
    return proc


def reap(proc, timeout):
    """Waits for `proc` (with a deadline) and returns (status, cpu seconds, peak RSS in MiB)."""
    deadline = time.monotonic() + timeout
    while True:
        peak = PEAKS.get(proc.pid)
        kib = peak.kib if peak else 0
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_utime + usage.ru_stime, kib / 1024
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{proc.args[0]} did not finish in {timeout} s")
        time.sleep(0.005)


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
        if ev.get("event") in ("error", "file_failed"):
            raise RuntimeError(f"waiting for {kind}: {ev}")
    raise RuntimeError(f"waiting for {kind}: process ended")


def parley_client(url, state, name, *args):
    cmd = [f"{BIN}/parley", "--json", "--relay", url, "--state-dir", state, "--name", name, *args]
    return watch(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True, bufsize=1))


def run_parley(source, work):
    relay = watch(subprocess.Popen([f"{BIN}/parley-relay", "--listen", "127.0.0.1:0",
                                    "--secret-file", os.path.join(work, "relay-secret")],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
    url = relay.stdout.readline().split()[-1]
    state = os.path.join(work, "state")
    downloads = os.path.join(work, "downloads")
    try:
        host = parley_client(url, state, "alice", "host")
        code = wait_for(host, "invite")["code"]
        guest = parley_client(url, state, "bob", "join", code)
        wait_for(host, "paired"), wait_for(guest, "paired")
        host.stdin.close(), guest.stdin.close()
        host.wait(10), guest.wait(10)

        bob = parley_client(url, state, "bob", "--download-dir", downloads, "--accept-files",
                            "--exit-after-files", "1", "--timeout", "900", "resume")
        wait_for(bob, "resumed")
        t0 = time.perf_counter()
        alice = parley_client(url, state, "alice", "--timeout", "900", "send", source)
        # Bob chats while the file moves; Alice's stdout is read for his lines (and the end).
        sent_at, latencies, done = {}, [], threading.Event()

        def chat():
            n = 0
            while not done.wait(0.05):
                sent_at[n] = time.perf_counter()
                try:
                    bob.stdin.write(f"ping {n}\n")
                    bob.stdin.flush()
                except (BrokenPipeError, ValueError):
                    break
                n += 1

        def read_alice():
            for ev in events(alice):
                if ev.get("event") == "message":
                    text = ev.get("text", "")
                    if text.startswith("ping "):
                        n = int(text.split()[1])
                        latencies.append((time.perf_counter() - sent_at[n]) * 1000)

        chatter = threading.Thread(target=chat)
        reader = threading.Thread(target=read_alice)
        reader.start()
        # Bob chats once the file is moving (lines typed before Alice is even online would
        # time her start-up, not the transfer).
        wait_for(bob, "file_offer")
        offered = time.perf_counter() - t0
        wait_for(bob, "file_progress")
        chatter.start()
        received = wait_for(bob, "file_received")
        elapsed = time.perf_counter() - t0
        done.set()
        chatter.join()
        threading.Thread(target=lambda: [None for _ in bob.stdout]).start()
        a = reap(alice, 900)
        # Bob's last chat lines may wait for a receipt from Alice, who has gone: he is
        # stopped (wait4 still reports his CPU time and peak RSS).
        bob.kill()
        b = reap(bob, 60)
        reader.join()
        relay.send_signal(signal.SIGTERM)
        r = reap(relay, 30)
        if a[0] != 0:
            raise RuntimeError(f"the sender exited with {a[0]}")
        return {"seconds": elapsed, "sender": a, "relay": r, "receiver": b,
                "placed": received["path"], "chat_ms": latencies, "offered": offered}
    finally:
        for p in (relay,):
            if p.poll() is None:
                p.kill()


def run_wormhole(source, work):
    mailbox_port, transit_port = free_port(), free_port()
    db = os.path.join(work, "mailbox.sqlite")
    mailbox = subprocess.Popen(["twistd", "-n", "--pidfile=", "wormhole-mailbox",
                                f"--port=tcp:{mailbox_port}:interface=127.0.0.1",
                                f"--channel-db={db}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=work)
    transit = watch(subprocess.Popen(["twistd", "-n", "--pidfile=", "transitrelay",
                                      f"--port=tcp:{transit_port}:interface=127.0.0.1"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     cwd=work))
    try:
        for port in (mailbox_port, transit_port):
            for _ in range(200):
                try:
                    socket.create_connection(("127.0.0.1", port), 0.1).close()
                    break
                except OSError:
                    time.sleep(0.05)
        common = ["wormhole", f"--relay-url=ws://127.0.0.1:{mailbox_port}/v1",
                  f"--transit-helper=tcp:127.0.0.1:{transit_port}"]
        downloads = os.path.join(work, "downloads")
        os.makedirs(downloads)
        t0 = time.perf_counter()
        sender = watch(subprocess.Popen([*common, "send", "--no-listen", "--hide-progress",
                                         "--code", "7-parley-bench", source],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        cwd=work))
        receiver = watch(subprocess.Popen([*common, "receive", "--no-listen", "--hide-progress",
                                           "--accept-file", "7-parley-bench"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          cwd=downloads))
        b = reap(receiver, 900)
        elapsed = time.perf_counter() - t0
        a = reap(sender, 60)
        transit.send_signal(signal.SIGTERM)
        r = reap(transit, 30)
        if a[0] != 0 or b[0] != 0:
            raise RuntimeError(f"wormhole exit codes: sender {a[0]}, receiver {b[0]}")
        return {"seconds": elapsed, "sender": a, "relay": r, "receiver": b,
                "placed": os.path.join(downloads, os.path.basename(source)), "chat_ms": []}
    finally:
        for p in (mailbox, transit):
            if p.poll() is None:
                p.kill()
                p.wait()


def same_file(a, b):
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as x, open(b, "rb") as y:
        while True:
            p, q = x.read(1 << 20), y.read(1 << 20)
            if p != q:
                return False
            if not p:
                return True


def percentile(values, p):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to put the file and the downloads")
    ap.add_argument("modes", nargs="*", default=["parley", "wormhole"])
    args = ap.parse_args()
    base = tempfile.mkdtemp(prefix="parley-files-bench-", dir=args.dir)
    source = os.path.join(base, "random.bin")
    with open(source, "wb") as f:
        for _ in range(args.mib):
            f.write(os.urandom(1 << 20))
    size_mib = os.path.getsize(source) / (1 << 20)
    results = {m: [] for m in args.modes}
    try:
        for rep in range(args.reps):
            for mode in args.modes:  # interleaved, so both see the same machine
                work = tempfile.mkdtemp(prefix=f"{mode}-", dir=base)
                run = (run_parley if mode == "parley" else run_wormhole)(source, work)
                if not same_file(source, run["placed"]):
                    raise RuntimeError(f"{mode}: the received file differs")
                results[mode].append(run)
                shutil.rmtree(work)
                print(f"{mode} rep {rep + 1}: {size_mib / run['seconds']:.1f} MiB/s", flush=True)
    finally:
        shutil.rmtree(base)
    print(f"\n{size_mib:.0f} MiB, medians of {args.reps}")
    print("| | MiB/s | CPU ms/MiB sender / relay / receiver | peak RSS MiB sender / relay / receiver | chat p50 / p99 ms |")
    print("|---|---|---|---|---|")
    for mode, runs in results.items():
        med = lambda f: statistics.median(f(r) for r in runs)
        rate = med(lambda r: size_mib / r["seconds"])
        cpu = [med(lambda r, k=k: r[k][1] * 1000 / size_mib) for k in ("sender", "relay", "receiver")]
        rss = [max(r[k][2] for r in runs) for k in ("sender", "relay", "receiver")]
        chat = [x for r in runs for x in r["chat_ms"]]
        chat_text = f"{percentile(chat, 50):.1f} / {percentile(chat, 99):.1f} ({len(chat)} lines)" if chat else "-"
        print(f"| {mode} | {rate:.1f} | {cpu[0]:.2f} / {cpu[1]:.2f} / {cpu[2]:.2f} "
              f"| {rss[0]:.1f} / {rss[1]:.1f} / {rss[2]:.1f} | {chat_text} |")
        if all("offered" in r for r in runs):
            print(f"  {mode}: the offer reached the receiver after "
                  f"{med(lambda r: r['offered']):.2f} s of {med(lambda r: r['seconds']):.2f} s "
                  f"(the sender hashes the file first: the offer carries its SHA-256)")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Soak: minutes of traffic through a real `fulcrum run`, with a reload every
second and a backend killed and restarted, reporting failed connections,
RSS and descriptors over time (issue 11, R1-R8). Not run in CI.

    cargo build --release
    python3 bench/soak.py --minutes 10            # target/release/fulcrum

Traffic (all on loopback):
- new TCP connections, back to back: connect, send a line, read the echo;
- long TCP streams: a few connections that echo data for the whole run
  (reopened if the backend they are on is killed: counted apart);
- UDP: queries from fresh source ports, each answered or counted lost.
Every second: SIGHUP (a reload that changes nothing). Every 30 s: one of the
three backends is killed (SIGKILL) and restarted 5 s later.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

BACKEND = r"""
import socket, sys, threading
port = int(sys.argv[1])
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("127.0.0.1", port)); t.listen(1024)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("127.0.0.1", port))
def echo(c):
    try:
        while True:
            d = c.recv(65536)
            if not d: break
            c.sendall(d)
    except OSError: pass
    c.close()
def udp():
    while True:
        d, a = u.recvfrom(65536); u.sendto(d, a)
threading.Thread(target=udp, daemon=True).start()
while True:
    c, _ = t.accept(); threading.Thread(target=echo, args=(c,), daemon=True).start()
"""


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.c = {}

    def add(self, key, n=1):
        with self.lock:
            self.c[key] = self.c.get(key, 0) + n

    def snap(self):
        with self.lock:
            return dict(self.c)


def short_connections(stop, addr, stats):
    while not stop.is_set():
        stats.add("tcp_attempted")
        try:
            s = socket.create_connection(addr, timeout=5)
        except OSError:
            stats.add("tcp_refused")  # the balancer refused or did not answer: a failure
            continue
        try:
            with s:
                s.sendall(b"ping\n")
                got = b""
                while len(got) < 5:
                    d = s.recv(64)
                    if not d:
                        break
                    got += d
                stats.add("tcp_ok" if got == b"ping\n" else "tcp_cut")
        except OSError:
            # Accepted, then cut: its backend was killed mid-flow (expected
            # for the flows on it at that instant), or a failure.
            stats.add("tcp_cut")


def long_stream(stop, addr, stats):
    chunk = os.urandom(16384)
    while not stop.is_set():
        try:
            with socket.create_connection(addr, timeout=5) as s:
                stats.add("streams_opened")
                while not stop.is_set():
                    s.sendall(chunk)
                    got = 0
                    while got < len(chunk):
                        d = s.recv(len(chunk) - got)
                        if not d:
                            raise OSError("eof")
                        got += len(d)
                    stats.add("stream_bytes", 2 * len(chunk))
        except OSError:
            if not stop.is_set():
                stats.add("streams_cut")  # its backend was killed (expected) or a failure
            time.sleep(0.05)


def udp_queries(stop, addr, stats):
    while not stop.is_set():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.settimeout(1)
            stats.add("udp_sent")
            try:
                u.sendto(b"q", addr)
                d, _ = u.recvfrom(64)
                stats.add("udp_answered" if d == b"q" else "udp_lost")
            except OSError:
                stats.add("udp_lost")
        time.sleep(0.01)


def proc_sample(pid):
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) // 1024
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return rss, fds


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--fulcrum", default="target/release/fulcrum")
    p.add_argument("--clients", type=int, default=4, help="threads making new TCP connections")
    p.add_argument("--streams", type=int, default=4)
    args = p.parse_args()

    ports = [free_port() for _ in range(3)]
    backends = {port: subprocess.Popen([sys.executable, "-c", BACKEND, str(port)]) for port in ports}
    front_tcp, front_udp, admin = free_port(), free_port(), free_port()
    listed = ", ".join(f'{{ address = "127.0.0.1:{p}" }}' for p in ports)
    conf = f"""
[admin]
listen = "127.0.0.1:{admin}"

[[frontend]]
name = "tcp"
listen = "127.0.0.1:{front_tcp}"
pool = "app"

[[frontend]]
name = "udp"
listen = "127.0.0.1:{front_udp}"
protocol = "udp"
pool = "app"
udp_idle_timeout = "5s"

[[pool]]
name = "app"
balancer = "stock:round-robin"
backends = [ {listed} ]

[pool.probe]
protocol = "tcp"
interval = "1s"
threshold = 2
"""
    tmp = tempfile.mkdtemp(prefix="fulcrum-soak-")
    path = os.path.join(tmp, "fulcrum.toml")
    with open(path, "w") as f:
        f.write(conf)
    log = open(os.path.join(tmp, "fulcrum.log"), "w")
    lb = subprocess.Popen([args.fulcrum, "run", "-c", path], stderr=log, env={**os.environ, "FULCRUM_LOG": "warn"})
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", front_tcp), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)

    stats, stop = Stats(), threading.Event()
    threads = [threading.Thread(target=short_connections, args=(stop, ("127.0.0.1", front_tcp), stats)) for _ in range(args.clients)]
    threads += [threading.Thread(target=long_stream, args=(stop, ("127.0.0.1", front_tcp), stats)) for _ in range(args.streams)]
    threads += [threading.Thread(target=udp_queries, args=(stop, ("127.0.0.1", front_udp), stats))]
    for t in threads:
        t.start()

    start = time.time()
    end = start + args.minutes * 60
    samples = []
    killed_at, victim, reloads, kills = None, 0, 0, 0
    next_kill = start + 30
    next_sample = start
    while time.time() < end:
        time.sleep(1)
        lb.send_signal(signal.SIGHUP)
        reloads += 1
        now = time.time()
        if killed_at is None and now >= next_kill:
            port = ports[victim % 3]
            backends[port].kill()
            backends[port].wait()
            killed_at, kills = (now, port), kills + 1
        elif killed_at is not None and now >= killed_at[0] + 5:
            port = killed_at[1]
            backends[port] = subprocess.Popen([sys.executable, "-c", BACKEND, str(port)])
            killed_at, victim, next_kill = None, victim + 1, now + 25
        if now >= next_sample:
            rss, fds = proc_sample(lb.pid)
            s = stats.snap()
            samples.append({"t": round(now - start), "rss_mib": rss, "fds": fds, **s})
            print(json.dumps(samples[-1]), flush=True)
            next_sample = now + 10
    stop.set()
    for t in threads:
        t.join()
    rss, fds = proc_sample(lb.pid)
    s = stats.snap()
    status = None
    try:
        import urllib.request
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
            status = r.read().decode()
    except OSError:
        pass
    alive = lb.poll() is None
    lb.terminate()
    lb.wait()
    for b in backends.values():
        b.kill()
    summary = {
        "minutes": args.minutes,
        "reloads_sent": reloads,
        "backend_kills": kills,
        "tcp_attempted": s.get("tcp_attempted", 0),
        "tcp_refused": s.get("tcp_refused", 0),
        "tcp_cut": s.get("tcp_cut", 0),
        "streams_opened": s.get("streams_opened", 0),
        "streams_cut": s.get("streams_cut", 0),
        "stream_mib": s.get("stream_bytes", 0) // (1 << 20),
        "udp_sent": s.get("udp_sent", 0),
        "udp_lost": s.get("udp_lost", 0),
        "rss_mib_start": samples[0]["rss_mib"] if samples else None,
        "rss_mib_end": rss,
        "fds_start": samples[0]["fds"] if samples else None,
        "fds_end": fds,
        "process_alive_at_end": alive,
    }
    if status:
        for line in status.splitlines():
            if line.startswith(("fulcrum_reloads_total", "fulcrum_panics_total")):
                summary[line.split(" ")[0]] = line.split(" ")[-1]
    print("SUMMARY " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Content scanners for the benchmark (issue 8), loopback only. Not collected by pytest.

    # clamd and rspamd as private daemons, with the [scanners.*] tables for bench.py
    .venv/bin/python tests/bench/scanners.py serve --toml /tmp/scanners.toml &
    .venv/bin/python tests/bench/bench.py --workloads a --reps 3 --scanners /tmp/scanners.toml \\
        --variant 'scanners={python} -m relayproxy run -c {config_scanners}'

    # does clamd's time overlap the stream? one 1 MiB message, N times each way
    .venv/bin/python tests/bench/scanners.py overlap --reps 20

`serve` starts clamd (one test signature, no freshclam) and rspamd (stock rules; every action
threshold moved out of reach, so each message is scanned in full and none is refused: the
benchmark's smtp-source messages would otherwise be greylisted), writes the TOML, and runs
until SIGTERM or SIGINT; it stops both daemons by PID.

`overlap` measures, for the same 1 MiB message (medians of --reps):
  down   through the proxy without scanners, to smtp-sink: from the first body byte to the 250
         (the proxy reading, checking and forwarding the body: its own CPU, about 6 ms here;
         smtp-sink taking the rest of it and answering the dot)
  clamd  clamd alone: INSTREAM of the message in 64 KiB parts, from the first byte to the verdict
         (the transfer, clamd storing the stream, and its scan, which starts at the zero-length
         end: INSTREAM is scanned whole)
  both   through the proxy with [scanners.clamd], to smtp-sink: first body byte to the 250
and says whether both < down + clamd (the scan overlaps the stream instead of following it).
Each rep runs the three back to back, in an order that rotates from rep to rep, so the machine's
load hits them alike. Two more rows tell the parts apart: `scan` is clamd alone again, but its
zero-length end sent only once clamd had taken the whole stream (50 ms later): clamd's time that
no client can overlap with anything; and each proxy's own mean of the downstream's answer to the
dot (its histogram), the part of `down` that `both` overlaps with the scan.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from support.ports import LOOPBACK, free_port  # noqa: E402 (after the path)
from support.scanners import Clamd, Daemon, Rspamd  # noqa: E402

BENCH_ACTIONS = "reject = 100000;\nadd_header = 99999;\ngreylist = 99998;\n"
PART = 64 * 1024


@contextlib.contextmanager
def daemons(*items: Daemon) -> Iterator[None]:
    try:
        for d in items:
            d.start()
        for d in items:
            d.wait_ready(180)
        yield
    finally:
        for d in items:
            d.stop()


def serve(toml: Path) -> int:
    clamd, rspamd = Clamd(), Rspamd(actions=BENCH_ACTIONS)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    with daemons(clamd, rspamd):
        toml.write_text(
            f'[scanners.clamd]\naddress = "{clamd.host}:{clamd.port}"\n\n'
            f'[scanners.rspamd]\nurl = "http://{rspamd.host}:{rspamd.port}"\n')
        print(f"clamd pid {clamd.process.pid if clamd.process else '?'}, rspamd pid "
              f"{rspamd.process.pid if rspamd.process else '?'}; wrote {toml}", flush=True)
        done.wait()
    return 0


# ---------------------------------------------------------------------- overlap


def message(size: int) -> bytes:
    line = b"o" * 78 + b"\r\n"
    head = b"From: s@bench.test\r\nTo: r@bench.test\r\nSubject: overlap\r\n\r\n"
    return head + line * ((size - len(head)) // len(line))


def _reply(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n") or data.split(b"\r\n")[-2][3:4] == b"-":
        chunk = sock.recv(4096)
        if not chunk:
            raise RuntimeError(f"connection closed after {data!r}")
        data += chunk
    return data


def through(port: int, data: bytes) -> float:
    """One SMTP transaction (data: the body with its final dot); seconds from the first body
    byte to the reply after the dot."""
    with socket.create_connection((LOOPBACK, port), timeout=60) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _reply(sock)
        for cmd in (b"EHLO bench.test", b"MAIL FROM:<s@bench.test>", b"RCPT TO:<r@bench.test>",
                    b"DATA"):
            sock.sendall(cmd + b"\r\n")
            reply = _reply(sock)
            if reply[:1] not in (b"2", b"3"):
                raise RuntimeError(f"{cmd!r}: {reply!r}")
        started = time.perf_counter()
        sock.sendall(data)
        reply = _reply(sock)
        elapsed = time.perf_counter() - started
        if not reply.startswith(b"250"):
            raise RuntimeError(f"end of data: {reply!r}")
        sock.sendall(b"QUIT\r\n")
    return elapsed


def clamd_alone(clamd: Clamd, parts: list[bytes], pause: float = 0.0) -> float:
    """INSTREAM; seconds from the first byte to the verdict, or with a pause, from the
    zero-length end (sent after the pause) to the verdict."""
    with socket.create_connection((clamd.host, clamd.port), timeout=60) as sock:
        started = time.perf_counter()
        sock.sendall(b"zINSTREAM\0")
        for part in parts:
            sock.sendall(part)
        if pause:
            time.sleep(pause)  # clamd takes the whole stream meanwhile
            started = time.perf_counter()
        sock.sendall(b"\0\0\0\0")
        reply = b""
        while not reply.endswith(b"\0"):
            chunk = sock.recv(4096)
            if not chunk:
                raise RuntimeError(f"clamd closed after {reply!r}")
            reply += chunk
        elapsed = time.perf_counter() - started
    if reply != b"stream: OK\0":
        raise RuntimeError(f"clamd: {reply!r}")
    return elapsed


def proxy(workdir: Path, name: str, sink_port: int, extra: str, metrics: str = ""
          ) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    config = workdir / f"{name}.toml"
    config.write_text(
        f'[server]\nlisten = ["{LOOPBACK}:{port}"]\nhostname = "relayproxy.bench.test"\n'
        'accept_domains = ["bench.test"]\nreverse_dns = false\n\n'
        f'[downstream]\nservers = ["{LOOPBACK}:{sink_port}"]\n\n'
        f'[metrics]\nlisten = "{metrics}"\n\n[log]\nlevel = "warning"\n\n{extra}')
    with open(workdir / f"{name}.log", "wb") as log:
        child = subprocess.Popen([sys.executable, "-m", "relayproxy", "run", "-c", str(config)],
                                 cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), 1) as s:
            if s.recv(100).startswith(b"220"):
                return child, port
        time.sleep(0.1)
    child.terminate()
    raise RuntimeError(f"{name} did not start: {(workdir / f'{name}.log').read_text()[-2000:]}")


def histogram_mean(metrics: str, name: str, label: str) -> float:
    """A proxy's mean of one of its histograms, e.g. the time from the end of data to clamd's
    verdict, or the downstream's answer to the dot."""
    text = urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10).read().decode()
    found = dict(re.findall(
        rf'^{name}_(sum|count)\{{{label}\}} (\S+)$', text, re.M))
    return float(found["sum"]) / max(float(found["count"]), 1.0)


def overlap(reps: int, size: int) -> int:
    body = message(size)
    data = body + b".\r\n"
    parts = [struct.pack(">I", len(body[o : o + PART])) + body[o : o + PART]
             for o in range(0, len(body), PART)]
    workdir = Path(tempfile.mkdtemp(prefix="relayproxy-overlap-"))
    sink_port = free_port()
    sink = subprocess.Popen(["/usr/sbin/smtp-sink", "-u", "nobody", f"{LOOPBACK}:{sink_port}",
                             "1024"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    clamd = Clamd()
    children: list[subprocess.Popen[bytes]] = [sink]
    means: dict[str, float] = {}
    try:
        with daemons(clamd):
            plain_metrics = f"{LOOPBACK}:{free_port()}"
            plain, plain_port = proxy(workdir, "plain", sink_port, "", plain_metrics)
            children.append(plain)
            metrics = f"{LOOPBACK}:{free_port()}"
            scanned, scanned_port = proxy(
                workdir, "clamd", sink_port,
                f'[scanners.clamd]\naddress = "{clamd.host}:{clamd.port}"\n', metrics)
            children.append(scanned)
            runs = {"down": lambda: through(plain_port, data),
                    "clamd": lambda: clamd_alone(clamd, parts),
                    "both": lambda: through(scanned_port, data)}
            order = list(runs)
            times: dict[str, list[float]] = {k: [] for k in (*order, "scan")}
            for _ in range(2):  # warm-up
                for run in runs.values():
                    run()
            for rep in range(reps):
                # back to back, in a rotating order: the machine's noise hits all three alike
                for key in order[rep % 3:] + order[: rep % 3]:
                    times[key].append(runs[key]())
                times["scan"].append(clamd_alone(clamd, parts, pause=0.05))
            dot = 'relayproxy_downstream_latency_seconds', 'command="dot"'
            means = {
                "verdict": histogram_mean(metrics, "relayproxy_scanner_latency_seconds",
                                          'scanner="clamd"'),
                "dot_down": histogram_mean(plain_metrics, *dot),
                "dot_both": histogram_mean(metrics, *dot),
            }
    finally:
        for child in children:
            child.terminate()
            child.wait(20)
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    total = med["down"] + med["clamd"]
    print(f"message: {len(body)} octets, {reps} reps each, medians (ms); min..max in brackets")
    for key, label in (("down", "proxy -> smtp-sink, no scanner"),
                       ("clamd", "clamd alone (INSTREAM, 64 KiB parts)"),
                       ("both", "proxy with clamd -> smtp-sink"),
                       ("scan", "clamd: zero-length end to verdict")):
        print(f"  {label:40} {med[key]:8.1f}  [{min(times[key]) * 1000:.1f}.."
              f"{max(times[key]) * 1000:.1f}]")
    print(f"  {'down + clamd':40} {total:8.1f}")
    for key, label in (("verdict", "in both: end of data to clamd verdict"),
                       ("dot_down", "in down: downstream's answer to the dot"),
                       ("dot_both", "in both: downstream's answer to the dot")):
        print(f"  {label:40} {means[key] * 1000:8.1f}  (mean)")
    # per rep (the runs of a rep are back to back): slow drift of the load cancels out
    per_rep = statistics.median(b / (d + c) for d, c, b in zip(
        times["down"], times["clamd"], times["both"], strict=True))
    verdict = "overlaps" if med["both"] < total else "does NOT overlap"
    print(f"with clamd / (down + clamd): {med['both'] / total:.2f} (medians), "
          f"{per_rep:.2f} (median of per-rep ratios): the scan {verdict} the stream")
    return 0 if med["both"] < total else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run clamd and rspamd, write their [scanners.*] TOML")
    s.add_argument("--toml", type=Path, required=True)
    o = sub.add_parser("overlap", help="1 MiB through clamd vs. downstream + clamd alone")
    o.add_argument("--reps", type=int, default=20)
    o.add_argument("--size", type=int, default=1024 * 1024)
    args = ap.parse_args()
    return serve(args.toml) if args.cmd == "serve" else overlap(args.reps, args.size)


if __name__ == "__main__":
    sys.exit(main())

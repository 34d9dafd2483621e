"""Instructions the proxy executes per message, counted by valgrind (callgrind): a CPU figure
that load on the machine does not move, unlike msg/s and CPU seconds on a shared 2-core VM.

    .venv/bin/python tests/bench/instructions.py [--config plain|rules|observer] [--src DIR]

Runs `smtp-source` (4 KB messages, 5 sessions) through the proxy, started under callgrind with
bench.py's generated config, into `smtp-sink`, twice (100 and 400 messages), and prints the
difference per message: start-up and shutdown cancel out. User-space instructions only: the
kernel's share (socket I/O, about 40% of the proxy's CPU) is not counted, so a ratio of two
counts overstates the difference in CPU time. --src runs another checkout (a `git worktree`).
Not collected by pytest; needs valgrind (Debian package).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import (  # bench.py is a script beside this one
    HELO,
    HOST,
    NOOP_OBSERVER,
    PROJECT_ROOT,
    RCPT,
    SENDER,
    bench_rules,
    find_tool,
    free_port,
    proxy_toml,
)


def wait_greeting(port: int, proxy: subprocess.Popen[bytes], timeout: float) -> None:
    """Until the proxy (slow under valgrind) answers 220; bounded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proxy.poll() is not None:
            raise SystemExit(f"the proxy exited with rc={proxy.returncode}")
        try:
            with socket.create_connection((HOST, port), timeout=5) as s:
                s.settimeout(5)
                if s.recv(512).startswith(b"220 "):
                    s.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"no 220 greeting on port {port} within {timeout:.0f} s")


def count(config: Path, src: Path, messages: int, port: int, sink_port: int,
          rcpts: int = 1) -> int:
    sink = subprocess.Popen([find_tool("smtp-sink"), "-u", "nobody", f"{HOST}:{sink_port}",
                             "100"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = config.with_suffix(f".{messages}.log")
    env = {**os.environ, "PYTHONPATH": str(src)}
    with log.open("w") as out:
        proxy = subprocess.Popen(
            ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
             "-m", "relayproxy", "run", "-c", str(config)],
            cwd=src, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_greeting(port, proxy, 120)
        subprocess.run([find_tool("smtp-source"), "-4", "-s", "5", "-m", str(messages), "-l",
                        "4096", "-r", str(rcpts), "-f", SENDER, "-t", RCPT, "-M", HELO,
                        f"{HOST}:{port}"],
                       check=True, stdout=subprocess.DEVNULL, timeout=600)
    finally:
        proxy.send_signal(signal.SIGTERM)
        proxy.wait(120)
        sink.terminate()
        sink.wait(10)
    found = re.search(r"Collected : (\d+)", log.read_text())
    if found is None:
        raise SystemExit(f"no instruction count in {log}")
    return int(found.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=("plain", "rules", "observer"), default="plain")
    ap.add_argument("--src", default=str(PROJECT_ROOT), help="the checkout to run")
    ap.add_argument("--rcpts", type=int, default=1, help="recipients per message (w4: 5)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="relayproxy-instr-") as tmp:
        work = Path(tmp)
        port, sink_port = free_port(), free_port()
        rules: tuple[str, ...] = ()
        if args.config == "rules":
            (work / "bench-rules.toml").write_text(bench_rules())
            rules = (str(PROJECT_ROOT / "rules" / "default.toml"), str(work / "bench-rules.toml"))
        checks = (NOOP_OBSERVER,) if args.config == "observer" else ()
        config = work / "relayproxy.toml"
        config.write_text(proxy_toml(port, sink_port, checks, rules))
        low, high = (count(config, Path(args.src), n, port, sink_port, args.rcpts)
                     for n in (100, 400))
    print(f"{args.config}, {args.rcpts} rcpt: {(high - low) / 300:,.0f} instructions per "
          f"message ({args.src})")


if __name__ == "__main__":
    main()

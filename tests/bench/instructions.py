"""Instructions the proxy executes per message, counted by valgrind (callgrind): a CPU figure
that load on the machine does not move, unlike msg/s and CPU seconds on a shared 2-core VM.

    .venv/bin/python tests/bench/instructions.py [--config plain|rules|observer|auth|auth_bare]
        [--signed] [--src DIR]

Runs `smtp-source` (4 KB messages, 5 sessions) through the proxy, started under callgrind with
bench.py's generated config, into `smtp-sink`, twice (100 and 400 messages), and prints the
difference per message: start-up and shutdown cancel out. --config auth sends bench.py's w1s
message instead (4 KB, DKIM-signed with rsa-2048, one per session, 5 sessions at a time) with
SPF, DKIM and DMARC answered by bench.py's dnsmasq; auth_bare is the same with the four methods
off; --signed sends that message to the other configs too (plain --signed is auth's baseline).
User-space instructions only: the kernel's share (socket I/O, about 40% of the proxy's CPU) is
not counted, so a ratio of two counts overstates the difference in CPU time. --src runs another
checkout (a `git worktree`). Not collected by pytest; needs valgrind (Debian package).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import (  # bench.py is a script beside this one
    HELO,
    HOST,
    NOOP_OBSERVER,
    PROJECT_ROOT,
    RCPT,
    SENDER,
    WORKLOADS,
    Child,
    RunResult,
    auth_dns,
    bench_rules,
    find_tool,
    free_port,
    proxy_toml,
    run_signed,
    signed_message,
    wait_greeting,
)


def send_signed(port: int, messages: int, body: bytes) -> None:
    # 5 at a time, like smtp-source -s 5; no deadline that a slow valgrind run could hit
    workload = dataclasses.replace(WORKLOADS["w1s"], conc=5)
    res = RunResult(workload="w1s", target="proxy", rep=0, msgs=messages)
    run_signed(port, workload, messages, 3600.0, body, res)
    if not res.ok:
        raise SystemExit(f"signed messages: {res.error}")


def count(config: Path, src: Path, messages: int, port: int, sink_port: int,
          rcpts: int = 1, signed: bytes = b"") -> int:
    work = config.parent
    sink = Child("smtp-sink", [find_tool("smtp-sink"), "-u", "nobody", f"{HOST}:{sink_port}",
                               "100"], work / "sink.log")
    log = config.with_suffix(f".{messages}.log")
    # run from the checkout: `python -m` imports relayproxy from its working directory
    proxy = Child("proxy", ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                            sys.executable, "-m", "relayproxy", "run", "-c", str(config)],
                  log, cwd=src)
    try:
        if error := wait_greeting(port, proxy, timeout=120):  # slow to start under valgrind
            raise SystemExit(error)
        if signed:
            send_signed(port, messages, signed)
        else:
            subprocess.run([find_tool("smtp-source"), "-4", "-s", "5", "-m", str(messages),
                            "-l", "4096", "-r", str(rcpts), "-f", SENDER, "-t", RCPT, "-M",
                            HELO, f"{HOST}:{port}"],
                           check=True, stdout=subprocess.DEVNULL, timeout=600)
    finally:
        proxy.stop()  # SIGTERM: the proxy drains and exits, and callgrind writes its count
        sink.stop()
    found = re.search(r"Collected : (\d+)", log.read_text())
    if found is None:
        raise SystemExit(f"no instruction count in {log}")
    return int(found.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=("plain", "rules", "observer", "auth", "auth_bare"),
                    default="plain")
    ap.add_argument("--signed", action="store_true",
                    help="send the DKIM-signed message (implied by auth and auth_bare)")
    ap.add_argument("--src", default=str(PROJECT_ROOT), help="the checkout to run")
    ap.add_argument("--rcpts", type=int, default=1, help="recipients per message (w4: 5)")
    args = ap.parse_args()
    auth = args.config in ("auth", "auth_bare")
    signed, record = signed_message(WORKLOADS["w1s"].size) if auth or args.signed else (b"", "")
    with tempfile.TemporaryDirectory(prefix="relayproxy-instr-") as tmp, \
            contextlib.ExitStack() as stack:
        work = Path(tmp)
        dns_port = stack.enter_context(auth_dns(work, record)) if auth else 0
        port, sink_port = free_port(), free_port()
        rules: tuple[str, ...] = ()
        if args.config == "rules":
            (work / "bench-rules.toml").write_text(bench_rules())
            rules = (str(PROJECT_ROOT / "rules" / "default.toml"), str(work / "bench-rules.toml"))
        checks = (NOOP_OBSERVER,) if args.config == "observer" else ()
        config = work / "relayproxy.toml"
        config.write_text(proxy_toml(port, sink_port, checks, rules, auth_dns=dns_port,
                                     auth_bare=args.config == "auth_bare"))
        low, high = (count(config, Path(args.src), n, port, sink_port, args.rcpts, signed)
                     for n in (100, 400))
    what = "signed" if signed else f"{args.rcpts} rcpt"
    print(f"{args.config}, {what}: {(high - low) / 300:,.0f} instructions per "
          f"message ({args.src})")


if __name__ == "__main__":
    main()

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
    Child,
    bench_rules,
    find_tool,
    free_port,
    proxy_toml,
    wait_greeting,
)


def count(config: Path, src: Path, messages: int, port: int, sink_port: int,
          rcpts: int = 1) -> int:
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
        subprocess.run([find_tool("smtp-source"), "-4", "-s", "5", "-m", str(messages), "-l",
                        "4096", "-r", str(rcpts), "-f", SENDER, "-t", RCPT, "-M", HELO,
                        f"{HOST}:{port}"],
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

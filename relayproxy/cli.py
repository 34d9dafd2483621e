"""Command line: `relayproxy run -c FILE`, `relayproxy check-config -c FILE`, `relayproxy demo`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from . import __version__, metrics
from .config import Config, ConfigError, load, with_overrides
from .logformat import setup_logging
from .probe import DownstreamProbe
from .runtime import build_runtime


def _event_loop_policy() -> None:
    """uvloop when it is importable; RELAYPROXY_EVENT_LOOP=asyncio|uvloop decides instead.

    The stdlib loop stays selectable because the two differ in timing (e.g. when TLS data
    reaches the protocol): tests run both, and an admin can rule uvloop out of a problem.
    """
    choice = os.environ.get("RELAYPROXY_EVENT_LOOP", "").strip().lower()
    if choice not in ("", "uvloop", "asyncio"):
        print(f"relayproxy: RELAYPROXY_EVENT_LOOP={choice!r}: expected uvloop or asyncio",
              file=sys.stderr)
        raise SystemExit(2)
    loop = "asyncio"
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":  # asked for by name: falling back would hide the mistake
                print("relayproxy: RELAYPROXY_EVENT_LOOP=uvloop but uvloop is not installed",
                      file=sys.stderr)
                raise SystemExit(2) from None
        else:
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
            loop = "uvloop"
    logging.getLogger("relayproxy.cli").info("event loop: %s", loop)


async def _serve(config: Config, path: str | None, banner: str = "") -> int:
    from .server import Server

    server = Server(config, path)
    probe = DownstreamProbe(lambda: server.config, lambda: server.runtime.pool)

    def unready_reason() -> str | None:
        if not server.accepting:
            return "not accepting connections"
        return probe.unready_reason()

    # the endpoint first: whoever sees the SMTP banner can scrape (and /readyz says 503 until
    # the listener is up)
    endpoint = None
    if config.metrics.listen is not None:
        endpoint = await metrics.serve(
            config.metrics.listen.host, config.metrics.listen.port, unready_reason)
    await server.start()
    probe.start()
    server.install_signal_handlers()
    if banner:
        print(banner, flush=True)
    try:
        await server.serve()
    finally:
        await probe.stop()
        if endpoint is not None:
            endpoint.close()
    return 0


def _load(args: argparse.Namespace) -> Config:
    config = load(args.config) if args.config else Config()
    return with_overrides(config, args.listen, args.downstream, args.accept_domain)


def cmd_run(args: argparse.Namespace) -> int:
    try:
        config = _load(args)
    except ConfigError as exc:
        print(f"relayproxy: invalid configuration: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log.level, config.log.format)
    _event_loop_policy()
    try:
        return asyncio.run(_serve(config, args.config))
    except OSError as exc:
        print(f"relayproxy: cannot start: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"relayproxy: invalid configuration: {exc}", file=sys.stderr)
        return 2


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config = _load(args)
        build_runtime(config)  # certificates and plugins load, or the error names them
    except ConfigError as exc:
        print(f"relayproxy: invalid configuration: {exc}", file=sys.stderr)
        return 2
    print(f"{args.config or '(defaults)'}: OK")
    return 0


def cmd_test_message(args: argparse.Namespace) -> int:
    """Run the whole policy offline on one message; exit 0 accept, 1 reject, 2 tempfail."""
    from .offline import EXIT_CODES, run_sync

    try:
        config = load(args.config) if args.config else Config()
        with open(args.message, "rb") as f:
            message = f.read()
        result = run_sync(config, args.client_ip, args.helo, args.sender, args.to, message)
    except ConfigError as exc:
        print(f"relayproxy: invalid configuration: {exc}", file=sys.stderr)
        return 3
    except OSError as exc:
        print(f"relayproxy: cannot read {args.message}: {exc.strerror}", file=sys.stderr)
        return 3
    print(result.to_json() if args.json else result.to_text())
    return EXIT_CODES[result.verdict]


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoMailbox, demo_config, instructions, start_mailbox

    setup_logging("info", "logfmt")
    _event_loop_policy()

    async def main() -> int:
        mailbox, port = await start_mailbox(DemoMailbox())
        config = demo_config(port, args.port, args.metrics_port)
        try:
            return await _serve(config, None, instructions(config))
        finally:
            mailbox.close()

    try:
        return asyncio.run(main())
    except OSError as exc:
        print(f"relayproxy demo: cannot start: {exc}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relayproxy", description=__doc__)
    parser.add_argument("--version", action="version", version=f"relayproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, helptext in (
        ("run", cmd_run, "run the proxy"),
        ("check-config", cmd_check_config, "validate a configuration file"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("-c", "--config", help="TOML configuration file")
        p.add_argument("--listen", action="append", metavar="HOST:PORT",
                       help="override server.listen (repeatable)")
        p.add_argument("--downstream", action="append", metavar="HOST:PORT",
                       help="override downstream.servers (repeatable)")
        p.add_argument("--accept-domain", action="append", metavar="DOMAIN",
                       help="override server.accept_domains (repeatable)")
        p.set_defaults(func=func)
    p = sub.add_parser("test-message", help="run the policy on a message offline (no downstream)",
                       description=cmd_test_message.__doc__)
    p.add_argument("-c", "--config", help="TOML configuration file")
    p.add_argument("--client-ip", required=True, help="the client address to assume")
    p.add_argument("--helo", required=True, help="the HELO name to assume")
    p.add_argument("--from", dest="sender", required=True, metavar="ADDR",
                   help="envelope sender (\"\" for the null sender)")
    p.add_argument("--to", action="append", required=True, metavar="ADDR",
                   help="envelope recipient (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("message", help="the message file (.eml)")
    p.set_defaults(func=cmd_test_message)
    p = sub.add_parser("demo", help="run the proxy in front of a built-in demo mailbox")
    p.add_argument("--port", type=int, default=2525, help="proxy port (default 2525)")
    p.add_argument("--metrics-port", type=int, default=9325,
                   help="metrics port (default 9325; 0 disables)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))

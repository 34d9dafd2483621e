"""Run the real relayproxy as a subprocess with a generated TOML config."""

from __future__ import annotations

import copy
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import tomllib
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from .ports import LOOPBACK, free_port
from .wait import wait_until

PROJECT_ROOT = Path(__file__).resolve().parents[2]
_POLL_INTERVAL = 0.05


class ProxyStartError(RuntimeError):
    """The proxy exited or did not answer 220 in time."""


# ---------------------------------------------------------------------- TOML writing

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f",
            "\r": "\\r"}


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _toml_string(key)


def _toml_string(value: str) -> str:
    out = []
    for char in value:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _toml_value(value: Any) -> str:
    # bool first: it is a subclass of int.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML: {value!r}")


def _toml_table(table: Mapping[str, Any], path: list[str], out: list[str]) -> None:
    scalars = {k: v for k, v in table.items() if not isinstance(v, Mapping)}
    tables = {k: v for k, v in table.items() if isinstance(v, Mapping)}
    if path and (scalars or not tables):
        out.append("[" + ".".join(_toml_key(p) for p in path) + "]")
    for key, value in scalars.items():
        out.append(f"{_toml_key(key)} = {_toml_value(value)}")
    if scalars:
        out.append("")
    for key, value in tables.items():
        _toml_table(value, [*path, key], out)


def toml_dumps(data: Mapping[str, Any]) -> str:
    """Serialize nested dicts of str/int/float/bool/lists to TOML (tomllib only reads)."""
    out: list[str] = []
    _toml_table(data, [], out)
    text = "\n".join(out).rstrip("\n") + "\n"
    # A serializer bug would otherwise surface as a confusing proxy config error.
    if tomllib.loads(text) != _plain(data):
        raise ValueError(f"TOML round trip mismatch for {data!r}:\n{text}")
    return text


def _plain(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {k: _plain(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_plain(v) for v in data]
    return data


# ---------------------------------------------------------------------- config helpers


def deep_merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``overrides`` merged in, table by table."""
    merged = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def base_config(downstream_port: int | Sequence[int], **overrides: Any) -> dict[str, Any]:
    """A test config: loopback ports, relay.test accepted, no DNS, short timeouts.

    ``overrides`` are per-section tables merged over the defaults, e.g.
    ``base_config(port, server={"max_recipients": 2}, downstream={"xclient": False})``.
    """
    ports = [downstream_port] if isinstance(downstream_port, int) else list(downstream_port)
    config: dict[str, Any] = {
        "server": {
            "listen": [f"{LOOPBACK}:{free_port()}"],
            "hostname": "proxy.test",
            "accept_domains": ["relay.test"],
            "reverse_dns": False,
            "drain_timeout": 5,
        },
        "downstream": {
            "servers": [f"{LOOPBACK}:{port}" for port in ports],
            "connect_timeout": 3,
            "command_timeout": 5,
            "data_timeout": 10,
            # No health probes unless a test asks: their connections would show up in what
            # scripted downstreams and Postfix count, at times no test controls.
            "probe_interval": 0,
        },
        "metrics": {"listen": f"{LOOPBACK}:{free_port()}"},
    }
    return deep_merge(config, overrides)


def split_hostport(value: str) -> tuple[str, int]:
    """ "127.0.0.1:25" -> ("127.0.0.1", 25); "[::1]:25" -> ("::1", 25)."""
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def parse_logfmt(line: str) -> dict[str, str]:
    """Parse one logfmt line (key=value, key="quoted \\" value")."""
    fields: dict[str, str] = {}
    for match in re.finditer(r'([^\s=]+)=("(?:[^"\\]|\\.)*"|\S*)', line):
        key, value = match.group(1), match.group(2)
        if value.startswith('"') and value.endswith('"') and len(value) >= 2:
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        fields[key] = value
    return fields


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run ``python -m relayproxy ARGS`` to completion from the project root."""
    return subprocess.run(
        [sys.executable, "-m", "relayproxy", *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def check_config(config: Mapping[str, Any] | str) -> subprocess.CompletedProcess[str]:
    """Run ``relayproxy check-config`` on a config dict (or raw TOML text)."""
    with tempfile.TemporaryDirectory(prefix="relayproxy-check-") as tmp:
        path = Path(tmp) / "relayproxy.toml"
        path.write_text(config if isinstance(config, str) else toml_dumps(config))
        return run_cli("check-config", "-c", str(path))


# ---------------------------------------------------------------------- the process


class ProxyProcess:
    """``python -m relayproxy run -c <generated config>`` with its output in a log file."""

    def __init__(
        self,
        config: Mapping[str, Any] | str,
        *,
        workdir: Path | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="relayproxy-proxy-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "relayproxy.toml"
        self.log_path = self.workdir / "proxy.log"
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.process: subprocess.Popen[bytes] | None = None
        self.killed = False
        self._write_config(config)

    # ------------------------------------------------------------------ config

    def _write_config(self, config: Mapping[str, Any] | str) -> None:
        text = config if isinstance(config, str) else toml_dumps(config)
        self.config: dict[str, Any] = tomllib.loads(text)
        # Write then rename so a SIGHUP never catches a half-written file.
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config_path)

    def _listen(self) -> str:
        if "--listen" in self.extra_args:
            return self.extra_args[self.extra_args.index("--listen") + 1]
        listen = self.config.get("server", {}).get("listen")
        if not listen:
            raise ValueError("config has no server.listen and no --listen argument")
        return str(listen[0])

    @property
    def host(self) -> str:
        return split_hostport(self._listen())[0]

    @property
    def port(self) -> int:
        return split_hostport(self._listen())[1]

    @property
    def metrics_url(self) -> str:
        listen = self.config.get("metrics", {}).get("listen", "")
        if not listen:
            raise ValueError("metrics are disabled in this config (metrics.listen empty)")
        return f"http://{listen}/metrics"

    # ------------------------------------------------------------------ life cycle

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("proxy not started")
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def start(self, timeout: float = 15, wait_ready: bool = True) -> ProxyProcess:
        """Start the proxy; by default wait until the first listen address answers 220.

        The readiness probe is one SMTP connection (greeting + QUIT), so connection counters
        start at 1: assert on metric deltas, not absolute values.
        """
        argv = [sys.executable, "-m", "relayproxy", "run", "-c", str(self.config_path)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [*argv, *self.extra_args],
                cwd=PROJECT_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 15) -> None:
        """Wait until the first listen address answers 220; ProxyStartError if the proxy
        exits first or does not answer in time."""
        last = "no attempt made"

        def greets() -> bool:
            nonlocal last
            if self.returncode is not None:
                return False  # do not probe a port the dead proxy no longer holds
            try:
                with socket.create_connection((self.host, self.port), timeout=2) as sock:
                    sock.settimeout(2)
                    greeting = sock.makefile("rb").readline()
                    if greeting.startswith(b"220 "):
                        sock.sendall(b"QUIT\r\n")
                        return True
                    last = f"greeting {greeting!r}"
            except OSError as exc:
                last = repr(exc)
            return False

        wait_until(
            greets,
            f"the proxy to answer 220 on {self._listen()}",
            timeout,
            interval=_POLL_INTERVAL,
            describe=lambda: f"last: {last}\n--- proxy log tail ---\n{self.log_tail()}",
            abort=self._exit_reason,
            error=ProxyStartError,
        )

    def _exit_reason(self) -> str | None:
        """For ``wait_until(abort=...)``: why waiting on this proxy is pointless, if it is."""
        code = self.returncode
        return None if code is None else f"proxy exited with code {code}"

    def send_signal(self, sig: int) -> None:
        if self.process is None:
            raise RuntimeError("proxy not started")
        self.process.send_signal(sig)

    def wait_exit(self, timeout: float = 20) -> int:
        """Wait for the process to exit by itself; return its exit code."""
        if self.process is None:
            raise RuntimeError("proxy not started")
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"proxy (pid {self.process.pid}) still running after {timeout}s\n"
                f"--- proxy log tail ---\n{self.log_tail()}"
            ) from None

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM and wait; SIGKILL only if it does not exit in time. Returns the exit code
        (negative signal number when killed by a signal; ``self.killed`` tells SIGKILL)."""
        if self.process is None:
            raise RuntimeError("proxy not started")
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.killed = True
                self.process.kill()
                self.process.wait(timeout)
        code = self.process.returncode
        assert code is not None
        return code

    def reload(self, new_config: Mapping[str, Any] | str) -> None:
        """Rewrite the config file and send SIGHUP."""
        self._write_config(new_config)
        self.send_signal(signal.SIGHUP)

    def __enter__(self) -> ProxyProcess:
        """Start the proxy (unless started already); one that fails to become ready is
        stopped here, since ``__exit__`` is not called then."""
        if self.process is None:
            try:
                self.start()
            except BaseException:
                if self.process is not None:
                    self.stop()
                raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None:
            self.stop()

    # ------------------------------------------------------------------ logs

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_for_log(self, substring: str, timeout: float = 10, count: int = 1) -> str:
        """Wait until ``substring`` occurs ``count`` times in the log; return the log.

        Fails at once if the proxy has exited and its log does not have them."""

        def logged() -> str | None:
            text = self.log_text()
            return text if text.count(substring) >= count else None

        return wait_until(
            logged,
            f"{substring!r} x{count} in the proxy log",
            timeout,
            interval=_POLL_INTERVAL,
            describe=lambda: (
                f"proxy {self._exit_reason() or 'still running'}; "
                f"{substring!r} found x{self.log_text().count(substring)}\n"
                f"--- proxy log tail ---\n{self.log_tail()}"
            ),
            abort=self._exit_reason,
        )

    def transactions(self) -> list[dict[str, str]]:
        """The parsed ``event=transaction`` log lines, in order."""
        return [
            parse_logfmt(line)
            for line in self.log_text().splitlines()
            if "event=transaction" in line
        ]

    def wait_for_transactions(self, n: int, timeout: float = 10) -> list[dict[str, str]]:
        self.wait_for_log("event=transaction", timeout, count=n)
        return self.transactions()

    # ------------------------------------------------------------------ metrics

    def metrics_text(self, timeout: float = 5) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=timeout) as response:
            body: bytes = response.read()
        return body.decode("utf-8")

    def metric(self, name: str, labels: Mapping[str, str] | None = None) -> float:
        """Sum of the samples named ``name`` whose labels include ``labels``.

        A metric that is declared but has no matching sample yet counts as 0.0; a name
        that does not appear at all raises KeyError (catches typos).
        """
        wanted = dict(labels or {})
        known: set[str] = set()
        total = 0.0
        matched = False
        for family in text_string_to_metric_families(self.metrics_text()):
            known.add(family.name)
            if family.type == "counter":
                known.add(f"{family.name}_total")
            elif family.type in ("histogram", "summary"):
                known.update(f"{family.name}{s}" for s in ("_count", "_sum", "_bucket"))
            for sample in family.samples:
                known.add(sample.name)
                if sample.name == name and wanted.items() <= sample.labels.items():
                    total += sample.value
                    matched = True
        if not matched and name not in known:
            raise KeyError(f"metric {name!r} not exported; have: {sorted(known)}")
        return total

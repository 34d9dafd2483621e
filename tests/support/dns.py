"""A real DNS server (dnsmasq) on loopback, with records chosen by the test."""

from __future__ import annotations

import ipaddress
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import dns.exception
import dns.message
import dns.query

from .daemon import ManagedProcess
from .ports import LOOPBACK, free_port
from .wait import wait_until

DNSMASQ = "/usr/sbin/dnsmasq"
_POLL_INTERVAL = 0.05


class DnsServerError(RuntimeError):
    """dnsmasq could not be started or stopped."""


class DnsServer(ManagedProcess):
    """dnsmasq serving only the given records on 127.0.0.1:<free port> (UDP and TCP).

    ``ptr`` maps IP addresses to names, ``a`` maps names to IPv4 (or IPv6) addresses, ``txt``
    maps names to a text string (or a list of strings, one TXT record each), ``mx`` maps a
    name to its mail exchanger (one MX record, preference 10). Any other name
    gets NXDOMAIN (never forwarded anywhere), like a zone that simply lacks the record.
    ``ttl`` is the TTL of every record (dnsmasq's default, 0, keeps resolvers from caching);
    names in the ``refused`` domains are answered REFUSED, like a server that will not serve
    them.
    """

    def __init__(
        self,
        ptr: Mapping[str, str] | None = None,
        a: Mapping[str, str | list[str]] | None = None,
        txt: Mapping[str, str | list[str]] | None = None,
        workdir: Path | None = None,
        ttl: int = 0,
        refused: Iterable[str] = (),
        mx: Mapping[str, str] | None = None,
    ) -> None:
        self.host = LOOPBACK
        self.port = 0
        self.ptr = dict(ptr or {})
        self.a = dict(a or {})
        self.txt = dict(txt or {})
        self.mx = dict(mx or {})
        self.ttl = ttl
        self.refused = tuple(refused)
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="relayproxy-dns-"))
        self.log_path = self.workdir / "dnsmasq.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def nameserver(self) -> str:
        """The "host:port" form the proxy's [dns] nameservers setting takes."""
        return f"{self.host}:{self.port}"

    def _record_args(self) -> list[str]:
        args: list[str] = []
        for ip, name in self.ptr.items():
            reverse = ipaddress.ip_address(ip).reverse_pointer
            args.append(f"--ptr-record={reverse},{name}")
        for name, addresses in self.a.items():
            for address in [addresses] if isinstance(addresses, str) else addresses:
                # --dns-rr serves exactly this record; --host-record would also invent a
                # PTR for the address, which would break tests of mismatched reverse DNS.
                parsed = ipaddress.ip_address(address)
                rr_type = 1 if parsed.version == 4 else 28
                args.append(f"--dns-rr={name},{rr_type},{parsed.packed.hex()}")
        for name, texts in self.txt.items():
            for text in [texts] if isinstance(texts, str) else texts:
                if "," in text:
                    raise ValueError(f"TXT text may not contain ',' (dnsmasq syntax): {text!r}")
                args.append(f"--txt-record={name},{text}")
        for name, exchange in self.mx.items():
            args.append(f"--mx-host={name},{exchange},10")
        # "#": the standard upstream servers, of which there are none, so dnsmasq refuses
        args.extend(f"--server=/{domain}/#" for domain in self.refused)
        if self.ttl:
            args.append(f"--local-ttl={self.ttl}")
        return args

    def start(self, timeout: float = 10) -> DnsServer:
        # The port is only known free for TCP; if UDP happens to be taken dnsmasq exits,
        # and a fresh port is tried.
        for _attempt in range(3):
            self.port = free_port()
            if self._start_once(timeout):
                return self
        raise DnsServerError(f"dnsmasq failed to start:\n{self.log_text()}")

    def _start_once(self, timeout: float) -> bool:
        argv = [
            DNSMASQ,
            "--keep-in-foreground",
            "--log-facility=-",
            "--log-queries",
            "--pid-file=",
            f"--port={self.port}",
            f"--listen-address={self.host}",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            "--conf-file=/dev/null",
            # Answer NXDOMAIN for every name not configured instead of REFUSED (no upstream).
            "--local=/#/",
            *self._record_args(),
        ]
        with self.log_path.open("ab") as log:
            process = self.process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT
            )
        probe = dns.message.make_query("readiness-probe.invalid", "A")

        def state() -> str | None:
            # An exit is an outcome, not a failure: the caller retries on another port.
            if process.poll() is not None:
                return "exited"
            try:
                dns.query.udp(probe, self.host, port=self.port, timeout=0.5)
            except (dns.exception.Timeout, OSError):
                return None
            return "answering"

        try:
            outcome = wait_until(
                state,
                f"dnsmasq on {self.nameserver} to answer",
                timeout,
                interval=_POLL_INTERVAL,
                describe=self.log_text,
                error=DnsServerError,
            )
        except DnsServerError:
            self.stop()
            raise
        if outcome == "exited":
            self.process = None
            return False
        return True

    def queries(self, name: str, rdtype: str = "A") -> int:
        """How many queries for name and rdtype reached this server (from its query log)."""
        return self.log_text().count(f"query[{rdtype}] {name} from ")

    def query(self, name: str, rdtype: str) -> dns.message.Message:
        """Ask this server directly (for tests of the test infrastructure)."""
        return dns.query.udp(
            dns.message.make_query(name, rdtype), self.host, port=self.port, timeout=2
        )

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


__all__ = ["DnsServer", "DnsServerError"]

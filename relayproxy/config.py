"""The TOML configuration, parsed once into frozen dataclasses.

Every key, its default and its meaning is listed in README.md ("Configuration"). A bad file
raises ConfigError whose message names the key, so `relayproxy check-config` and a SIGHUP reload
can both report it in one line.
"""

from __future__ import annotations

import ipaddress
import socket
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

BareNewline = Literal["reject", "normalize"]
DownstreamTLS = Literal["none", "opportunistic", "required"]


class ConfigError(ValueError):
    """An invalid configuration; the message starts with the offending key."""


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: tuple[HostPort, ...] = (HostPort("127.0.0.1", 25),)
    hostname: str = field(default_factory=socket.gethostname)
    accept_domains: tuple[str, ...] = ()
    max_message_size: int = 26_214_400
    max_recipients: int = 100
    max_line_length: int = 998
    max_errors: int = 20
    max_connections: int = 1000
    max_connections_per_ip: int = 20
    bare_newline: BareNewline = "reject"
    max_header_size: int = 262_144
    hold_bytes: int = 131_072
    idle_timeout: float = 300.0
    command_timeout: float = 300.0
    data_timeout: float = 180.0
    drain_timeout: float = 30.0
    reverse_dns: bool = True


@dataclass(frozen=True, slots=True)
class TLSConfig:
    cert: str = ""
    key: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.cert)


@dataclass(frozen=True, slots=True)
class DownstreamConfig:
    servers: tuple[HostPort, ...] = (HostPort("127.0.0.1", 10025),)
    helo_name: str = ""
    tls: DownstreamTLS = "opportunistic"
    tls_verify: bool = False
    xclient: bool = True
    max_connections: int = 50
    connect_timeout: float = 10.0
    command_timeout: float = 60.0
    data_timeout: float = 300.0
    down_time: float = 30.0
    reuse_connections: bool = True
    idle_timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class DNSConfig:
    nameservers: tuple[HostPort, ...] = ()
    timeout: float = 3.0


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    listen: HostPort | None = HostPort("127.0.0.1", 9325)


@dataclass(frozen=True, slots=True)
class PluginsConfig:
    checks: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
    dns: DNSConfig = field(default_factory=DNSConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    plugins: PluginsConfig = field(default_factory=PluginsConfig)

    @property
    def downstream_helo(self) -> str:
        return self.downstream.helo_name or self.server.hostname


def parse_hostport(value: str, key: str, default_port: int | None = None) -> HostPort:
    """Parse "host:port", "[v6]:port", or a bare host when a default port is given."""
    host, sep, port_text = value.rpartition(":")
    if value.startswith("[") and "]" in value:
        bracket = value.index("]")
        host, rest = value[1:bracket], value[bracket + 1 :]
        if rest and not rest.startswith(":"):
            raise ConfigError(f"{key}: {value!r} is not host:port")
        port_text = rest[1:]
    elif not sep or ":" in host:
        # a bare name or a bare IPv6 address: no port given
        host, port_text = value, ""
    if not port_text:
        if default_port is None:
            raise ConfigError(f"{key}: {value!r} needs a port (host:port)")
        port_text = str(default_port)
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"{key}: {value!r} is not host:port")
    return HostPort(host, int(port_text))


# Each section's keys and how a TOML value becomes a field value.
_Converter = Callable[[Any, str], Any]


def _positive(kind: type) -> _Converter:
    def convert(value: Any, key: str) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if kind is int and not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if value <= 0:
            raise ConfigError(f"{key}: must be greater than 0, got {value!r}")
        return kind(value)

    return convert


def _string(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _boolean(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    return value


def _choice(*choices: str) -> _Converter:
    def convert(value: Any, key: str) -> str:
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {', '.join(choices)}, got {value!r}")
        return str(value)

    return convert


def _string_list(value: Any, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
    return tuple(value)


def _hostport_list(value: Any, key: str, default_port: int | None) -> tuple[HostPort, ...]:
    return tuple(parse_hostport(v, key, default_port) for v in _string_list(value, key))


def _nameservers(value: Any, key: str) -> tuple[HostPort, ...]:
    return _hostport_list(value, key, 53)


def _nonempty_hostports(value: Any, key: str) -> tuple[HostPort, ...]:
    result = _hostport_list(value, key, None)
    if not result:
        raise ConfigError(f"{key}: needs at least one host:port")
    return result


def _domains(value: Any, key: str) -> tuple[str, ...]:
    domains = []
    for item in _string_list(value, key):
        name = item.strip().lower().rstrip(".")
        if not name.lstrip(".") or " " in name:
            raise ConfigError(f"{key}: {item!r} is not a domain name")
        domains.append(name)
    return tuple(domains)


def _hostname(value: Any, key: str) -> str:
    name = _string(value, key)
    if not name or any(c.isspace() or ord(c) < 33 for c in name):
        raise ConfigError(f"{key}: {value!r} is not a host name")
    return name


def _optional_hostport(value: Any, key: str) -> HostPort | None:
    text = _string(value, key)
    return parse_hostport(text, key) if text else None


def _nonnegative_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{key}: expected an integer >= 0, got {value!r}")
    return value


_SECTIONS: dict[str, tuple[type, dict[str, _Converter]]] = {
    "server": (
        ServerConfig,
        {
            "listen": _nonempty_hostports,
            "hostname": _hostname,
            "accept_domains": _domains,
            "max_message_size": _positive(int),
            "max_recipients": _positive(int),
            "max_line_length": _positive(int),
            "max_errors": _positive(int),
            "max_connections": _positive(int),
            "max_connections_per_ip": _positive(int),
            "bare_newline": _choice("reject", "normalize"),
            "max_header_size": _positive(int),
            "hold_bytes": _nonnegative_int,
            "idle_timeout": _positive(float),
            "command_timeout": _positive(float),
            "data_timeout": _positive(float),
            "drain_timeout": _positive(float),
            "reverse_dns": _boolean,
        },
    ),
    "tls": (TLSConfig, {"cert": _string, "key": _string}),
    "downstream": (
        DownstreamConfig,
        {
            "servers": _nonempty_hostports,
            "helo_name": _string,
            "tls": _choice("none", "opportunistic", "required"),
            "tls_verify": _boolean,
            "xclient": _boolean,
            "max_connections": _positive(int),
            "connect_timeout": _positive(float),
            "command_timeout": _positive(float),
            "data_timeout": _positive(float),
            "down_time": _positive(float),
            "reuse_connections": _boolean,
            "idle_timeout": _positive(float),
        },
    ),
    "dns": (DNSConfig, {"nameservers": _nameservers, "timeout": _positive(float)}),
    "metrics": (MetricsConfig, {"listen": _optional_hostport}),
    "log": (LogConfig, {"level": _choice("debug", "info", "warning", "error")}),
    "plugins": (PluginsConfig, {"checks": _string_list}),
}


def from_dict(data: dict[str, Any]) -> Config:
    sections: dict[str, Any] = {}
    for name, table in data.items():
        if name not in _SECTIONS:
            raise ConfigError(f"{name}: unknown section (known: {', '.join(_SECTIONS)})")
        if not isinstance(table, dict):
            raise ConfigError(f"{name}: expected a table")
        cls, converters = _SECTIONS[name]
        values = {}
        for key, value in table.items():
            if key not in converters:
                raise ConfigError(f"{name}.{key}: unknown key")
            values[key] = converters[key](value, f"{name}.{key}")
        sections[name] = cls(**values)
    config = Config(**sections)
    _check_consistency(config)
    return config


def _check_consistency(config: Config) -> None:
    tls = config.tls
    if bool(tls.cert) != bool(tls.key):
        raise ConfigError("tls.key: tls.cert and tls.key must be set together")
    for key, path in (("tls.cert", tls.cert), ("tls.key", tls.key)):
        if path and not Path(path).is_file():
            raise ConfigError(f"{key}: no such file {path!r}")
    for hp in config.server.listen:
        try:
            ipaddress.ip_address(hp.host)
        except ValueError:
            if hp.host != "localhost":
                raise ConfigError(
                    f"server.listen: {hp} must be an IP address (or localhost)"
                ) from None


def load(path: str | Path) -> Config:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"config: cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {path} is not valid TOML: {exc}") from None
    return from_dict(data)


def with_overrides(
    config: Config,
    listen: list[str] | None = None,
    downstream: list[str] | None = None,
    accept_domains: list[str] | None = None,
) -> Config:
    """Apply command-line overrides (used by benchmarks and quick trials)."""
    server, down = config.server, config.downstream
    if listen:
        server = replace(server, listen=_nonempty_hostports(listen, "--listen"))
    if accept_domains:
        server = replace(server, accept_domains=_domains(accept_domains, "--accept-domain"))
    if downstream:
        down = replace(down, servers=_nonempty_hostports(downstream, "--downstream"))
    return replace(config, server=server, downstream=down)


def defaults_table() -> dict[str, dict[str, Any]]:
    """The default value of every key, for documentation and tests."""
    result: dict[str, dict[str, Any]] = {}
    for name, (cls, _) in _SECTIONS.items():
        instance = cls()
        result[name] = {f.name: getattr(instance, f.name) for f in fields(cls)}
    return result

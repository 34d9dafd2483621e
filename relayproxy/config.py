"""The TOML configuration, validated with msgspec into frozen dataclasses.

Every key, its default and its meaning is listed in README.md ("Configuration"). The dataclasses
are the schema: each field's type carries its constraints (msgspec.Meta through Annotated, which
type checkers see through). A bad file raises ConfigError whose message names the key, so
`relayproxy check-config` and a SIGHUP reload can both report it in one line.
"""

from __future__ import annotations

import difflib
import ipaddress
import socket
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints

import msgspec

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


# The value types of the keys, constraints included. Error messages describe a key by its
# description, else by its type and bounds; `default_port` lets a host:port list name bare hosts.
Positive = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]
Strings = Annotated[tuple[str, ...], msgspec.Meta(description="a string or a list of strings")]
HostPorts = Annotated[
    tuple[HostPort, ...], msgspec.Meta(min_length=1, description="one or more host:port")]
Nameservers = Annotated[tuple[HostPort, ...], msgspec.Meta(
    description="a list of host or host:port", extra={"default_port": 53})]
OptionalHostPort = Annotated[
    HostPort | None, msgspec.Meta(description='host:port, or "" for none')]
Networks = Annotated[tuple[str, ...], msgspec.Meta(
    description="a network (CIDR) or a list of networks")]
StateOnError = Literal["tempfail", "open"]
# no whitespace or control characters: it goes into the banner, EHLO and Received
HostName = Annotated[str, msgspec.Meta(pattern=r"\A[^\s\x00-\x20]+\Z", description="a host name")]


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: HostPorts = (HostPort("127.0.0.1", 25),)
    hostname: HostName = field(default_factory=socket.gethostname)
    accept_domains: Strings = ()
    max_message_size: Positive = 26_214_400
    max_recipients: Positive = 100
    max_line_length: Positive = 998
    max_errors: Positive = 20
    max_connections: Positive = 1000
    max_connections_per_ip: Positive = 20
    bare_newline: BareNewline = "reject"
    max_header_size: Positive = 262_144
    hold_bytes: NonNegativeInt = 131_072
    idle_timeout: Seconds = 300.0
    command_timeout: Seconds = 300.0
    data_timeout: Seconds = 180.0
    drain_timeout: Seconds = 30.0
    reverse_dns: bool = True
    greet_delay: NonNegative = 0.0
    proxy_protocol: bool = False
    proxy_trusted: Networks = ("127.0.0.0/8", "::1/128")
    proxy_timeout: Seconds = 5.0


@dataclass(frozen=True, slots=True)
class TLSConfig:
    cert: str = ""
    key: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.cert)


@dataclass(frozen=True, slots=True)
class DownstreamConfig:
    servers: HostPorts = (HostPort("127.0.0.1", 10025),)
    helo_name: str = ""
    tls: DownstreamTLS = "opportunistic"
    tls_verify: bool = False
    xclient: bool = True
    max_connections: Positive = 50
    connect_timeout: Seconds = 10.0
    command_timeout: Seconds = 60.0
    data_timeout: Seconds = 300.0
    down_time: Seconds = 30.0
    reuse_connections: bool = True
    idle_timeout: Seconds = 10.0
    # active health checking (relayproxy.probe); 0 turns it off
    probe_interval: NonNegative = 10.0


@dataclass(frozen=True, slots=True)
class DNSConfig:
    nameservers: Nameservers = ()
    timeout: Seconds = 3.0


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    listen: OptionalHostPort = HostPort("127.0.0.1", 9325)


@dataclass(frozen=True, slots=True)
class RulesConfig:
    files: Strings = ()
    mode: Literal["enforce", "monitor"] = "enforce"
    reject_score: NonNegative = 10.0
    tempfail_score: NonNegative = 0.0
    exempt_recipients: Strings = ("postmaster", "abuse")
    body_scan_bytes: Positive = 262_144
    check_timeout: Seconds = 10.0
    country_db: str = ""
    greylist_delay: NonNegative = 0.0


@dataclass(frozen=True, slots=True)
class PluginsConfig:
    checks: Strings = ()


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["logfmt", "json"] = "logfmt"


@dataclass(frozen=True, slots=True)
class StateConfig:
    """Where limit counters, blocks, the recipient cache and greylisting live: in this process,
    or in Redis when redis_url is set (shared by several proxies)."""

    redis_url: str = ""
    on_error: StateOnError = "tempfail"
    timeout: Seconds = 1.0
    key_prefix: str = "relayproxy:"
    max_connections: Positive = 20
    down_time: NonNegative = 2.0


ScannerOnError = Literal["tempfail", "accept"]
# a TCP host:port, or the path of a unix socket (starting with "/"); "" leaves it off
ScannerAddress = Annotated[str, msgspec.Meta(
    pattern=r"\A(|/\S+|\S+:\d+)\Z", description='host:port, a socket path, or "" for off')]


@dataclass(frozen=True, slots=True)
class ClamdConfig:
    address: ScannerAddress = ""
    timeout: Seconds = 30.0
    on_error: ScannerOnError = "tempfail"
    max_bytes: Positive = 26_214_400  # within clamd's StreamMaxLength (25M by default)


@dataclass(frozen=True, slots=True)
class RspamdConfig:
    url: Annotated[str, msgspec.Meta(pattern=r"\A(|https?://\S+)\Z",
                                     description='an http:// URL, or "" for off')] = ""
    timeout: Seconds = 30.0
    on_error: ScannerOnError = "tempfail"
    max_bytes: Positive = 52_428_800  # rspamd's own max_message: 50 MiB


@dataclass(frozen=True, slots=True)
class SpamdConfig:
    address: ScannerAddress = ""
    timeout: Seconds = 30.0
    on_error: ScannerOnError = "tempfail"
    max_bytes: Positive = 512_000  # spamc's default (-s 500 KB)
    action: Literal["reject", "tag"] = "reject"


@dataclass(frozen=True, slots=True)
class ScannersConfig:
    """[scanners.clamd], [scanners.rspamd], [scanners.spamd]: tables of tables."""

    clamd: ClamdConfig = field(default_factory=ClamdConfig)
    rspamd: RspamdConfig = field(default_factory=RspamdConfig)
    spamd: SpamdConfig = field(default_factory=SpamdConfig)


AuthAction = Literal["reject", "tempfail", "tag", "ignore"]


@dataclass(frozen=True, slots=True)
class AuthSPFConfig:
    enabled: bool = True
    fail: AuthAction = "reject"
    softfail: AuthAction = "ignore"
    neutral: AuthAction = "ignore"
    none: AuthAction = "ignore"
    permerror: AuthAction = "ignore"
    temperror: AuthAction = "tempfail"


@dataclass(frozen=True, slots=True)
class AuthDKIMConfig:
    enabled: bool = True
    max_signatures: Positive = 5
    min_key_bits: Positive = 1024


@dataclass(frozen=True, slots=True)
class AuthDMARCConfig:
    enabled: bool = True
    reject: AuthAction = "reject"
    quarantine: AuthAction = "tag"
    temperror: AuthAction = "tempfail"
    trusted_forwarders: Networks = ()


@dataclass(frozen=True, slots=True)
class AuthARCConfig:
    enabled: bool = True
    trusted_sealers: Strings = ()


@dataclass(frozen=True, slots=True)
class AuthConfig:
    enabled: bool = False
    timeout: Seconds = 10.0
    tag_header: HostName = "X-Relayproxy-Auth-Warning"
    spf: AuthSPFConfig = field(default_factory=AuthSPFConfig)
    dkim: AuthDKIMConfig = field(default_factory=AuthDKIMConfig)
    dmarc: AuthDMARCConfig = field(default_factory=AuthDMARCConfig)
    arc: AuthARCConfig = field(default_factory=AuthARCConfig)


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
    dns: DNSConfig = field(default_factory=DNSConfig)
    state: StateConfig = field(default_factory=StateConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    plugins: PluginsConfig = field(default_factory=PluginsConfig)
    rules: RulesConfig = field(default_factory=RulesConfig)
    scanners: ScannersConfig = field(default_factory=ScannersConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    # the folder of the file it was read from: rule files are relative to it
    base_dir: str = field(default=".", compare=False)

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


def _key_types(cls: type[Any]) -> dict[str, tuple[Any, msgspec.Meta]]:
    """Each key's type, without Annotated, and its msgspec.Meta (an empty one if it has none)."""
    result = {}
    for key, hint in get_type_hints(cls, include_extras=True).items():
        extras: list[Any] = []
        if get_origin(hint) is Annotated:
            hint, *extras = get_args(hint)
        metas = [m for m in extras if isinstance(m, msgspec.Meta)]
        result[key] = (hint, metas[0] if metas else msgspec.Meta())
    return result


def _sections(cls: type[Any], prefix: str = "") -> dict[str, type[Any]]:
    """The sections of cls by dotted name: a section's dataclass-typed keys are subsections
    (TOML's [auth.spf] is the table spf inside the table auth)."""
    found: dict[str, type[Any]] = {}
    for name, hint in get_type_hints(cls).items():
        if isinstance(hint, type) and is_dataclass(hint):
            found[prefix + name] = hint
            found.update(_sections(hint, f"{prefix}{name}."))
    return found


# Read off the dataclasses: the sections of Config, and each section's keys.
_SECTIONS: dict[str, type[Any]] = _sections(Config)
_KEYS = {name: {key: kind for key, kind in _key_types(cls).items()
                if f"{name}.{key}" not in _SECTIONS}
         for name, cls in _SECTIONS.items()}
_KINDS: dict[Any, str] = {int: "an integer", float: "a number", str: "a string",
                          bool: "true or false"}


def _expected(kind: Any, meta: msgspec.Meta) -> str:
    """What a key takes, in words, from its type rather than from msgspec's wording."""
    if get_origin(kind) is Literal:
        return "one of " + ", ".join(get_args(kind))
    if meta.description:
        return meta.description
    bounds = ((">=", meta.ge), (">", meta.gt), ("<=", meta.le), ("<", meta.lt))
    return _KINDS[kind] + "".join(f" {op} {limit:g}" for op, limit in bounds if limit is not None)


def _written_form(value: Any, key: str, kind: Any, meta: msgspec.Meta) -> Any:
    """A value in the form its type takes: one string stands for a list of one, and host:port
    text is parsed here because msgspec reads a dataclass such as HostPort only from a table
    (it never hands one to a dec_hook)."""
    if get_origin(kind) is tuple and isinstance(value, str):
        value = [value]
    if HostPort not in get_args(kind):
        return value
    default_port = (meta.extra or {}).get("default_port")
    if value == "" and type(None) in get_args(kind):
        return None
    if isinstance(value, str):
        return parse_hostport(value, key, default_port)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [parse_hostport(v, key, default_port) for v in value]
    raise ConfigError(f"{key}: expected {_expected(kind, meta)}, got {value!r}")


def _written_forms(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    # msgspec takes unknown keys silently when decoding into a dataclass: they are checked here
    result = {}
    for name, table in data.items():
        section = prefix + name
        # a subsection only inside its table: a quoted ["scanners.clamd"] is no section
        keys = None if "." in name else _KEYS.get(section)
        if keys is None:
            known = ", ".join(k for k in _KEYS if k.count(".") == prefix.count("."))
            raise ConfigError(f"{section}: unknown section (known: {known})")
        if not isinstance(table, dict):
            raise ConfigError(f"{section}: expected a table, got {table!r}")
        subsections = {key: value for key, value in table.items()
                       if f"{section}.{key}" in _SECTIONS}
        unknown = next((key for key in table if key not in keys and key not in subsections),
                       None)
        if unknown is not None:
            close = difflib.get_close_matches(unknown, keys, n=1)
            raise ConfigError(f"{section}.{unknown}: unknown key"
                              + (f" (did you mean {close[0]}?)" if close else ""))
        result[name] = {key: _written_form(value, f"{section}.{key}", *keys[key])
                        for key, value in table.items() if key not in subsections}
        result[name].update(_written_forms(subsections, f"{section}."))
    return result


def _config_error(exc: msgspec.ValidationError, data: dict[str, Any]) -> ConfigError:
    # "... - at `$.server.listen[0]`" is about the key server.listen: show it as written
    where = str(exc).rpartition(" - at `$.")[2]
    *path, key = where.rstrip("`").split("[")[0].split(".")
    section = ".".join(path)
    while section not in _KEYS or key not in _KEYS[section]:
        # a path into a key's value ($.auth.spf.fail): the key is the last known prefix
        path, key = path[:-1], path[-1]
        section = ".".join(path)
    table: Any = data
    for part in path:
        table = table[part]
    expected = _expected(*_KEYS[section][key])
    return ConfigError(f"{section}.{key}: expected {expected}, got {table[key]!r}")


def _nested(data: dict[str, Any]) -> dict[str, Any]:
    """{"auth.spf": {...}} as {"auth": {"spf": {...}}}: a subsection may be named whole."""
    result: dict[str, Any] = {}
    for name, table in data.items():
        if "." in name and name in _SECTIONS:
            parent, _, child = name.rpartition(".")
            holder: dict[str, Any] = result
            for part in parent.split("."):
                holder = holder.setdefault(part, {})
            holder[child] = table
        elif isinstance(table, dict):
            result.setdefault(name, {}).update(table)
        else:
            result[name] = table
    return result


def from_dict(data: dict[str, Any]) -> Config:
    data = _nested(data)
    try:
        config = msgspec.convert(_written_forms(data), Config)
    except msgspec.ValidationError as exc:
        raise _config_error(exc, data) from None
    server = config.server
    accept = _domains(server.accept_domains, "server.accept_domains")
    config = replace(config, server=replace(server, accept_domains=accept))
    _check_consistency(config)
    _check_auth(config.auth)
    return config


def _check_auth(auth: AuthConfig) -> None:
    for item in auth.dmarc.trusted_forwarders:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ConfigError(f"auth.dmarc.trusted_forwarders: {item!r} is not an address "
                              "or network") from None
    _domains(auth.arc.trusted_sealers, "auth.arc.trusted_sealers")


def _domains(items: Iterable[str], key: str) -> tuple[str, ...]:
    """Domains as they are compared: lower case, without the root's dot."""
    domains = []
    for item in items:
        name = item.strip().lower().rstrip(".")
        if not name.lstrip(".") or " " in name:
            raise ConfigError(f"{key}: {item!r} is not a domain name")
        domains.append(name)
    return tuple(domains)


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
    _check_networks(config.server.proxy_trusted, "server.proxy_trusted")
    _check_state(config.state)


def _check_networks(items: Iterable[str], key: str) -> None:
    for item in items:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ConfigError(f"{key}: {item!r} is not a network (CIDR)") from None


def _check_state(state: StateConfig) -> None:
    scheme = state.redis_url.partition("://")[0]
    if state.redis_url and scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(
            f"state.redis_url: {state.redis_url!r} is not a redis://, rediss:// or unix:// URL")


def load(path: str | Path) -> Config:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"config: cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {path} is not valid TOML: {exc}") from None
    return replace(from_dict(data), base_dir=str(Path(path).resolve().parent))


def with_overrides(
    config: Config,
    listen: list[str] | None = None,
    downstream: list[str] | None = None,
    accept_domains: list[str] | None = None,
) -> Config:
    """Apply command-line overrides (used by benchmarks and quick trials)."""
    server, down = config.server, config.downstream
    if listen:
        server = replace(server, listen=tuple(parse_hostport(v, "--listen") for v in listen))
    if accept_domains:
        server = replace(server, accept_domains=_domains(accept_domains, "--accept-domain"))
    if downstream:
        servers = tuple(parse_hostport(v, "--downstream") for v in downstream)
        down = replace(down, servers=servers)
    return replace(config, server=server, downstream=down)


def defaults_table() -> dict[str, dict[str, Any]]:
    """The default value of every key, for documentation and tests (a group's tables as
    "group.table", e.g. "scanners.clamd")."""
    result: dict[str, dict[str, Any]] = {}
    for name, cls in _SECTIONS.items():
        instance = cls()
        result[name] = {f.name: getattr(instance, f.name) for f in fields(cls)
                        if f.name in _KEYS[name]}
    return result

"""Issue point 9: the TOML configuration (relayproxy.config) and its command-line checks.

Unit tests parse dicts and files with relayproxy.config directly; the CLI tests run
`python -m relayproxy check-config|run` as real subprocesses and look at exit code and stderr.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
from support.ports import free_port
from support.proxy import PROJECT_ROOT, base_config, run_cli, toml_dumps

from relayproxy import config as rpconfig
from relayproxy.config import ConfigError, HostPort

README = PROJECT_ROOT / "README.md"
SECTIONS = ("server", "tls", "downstream", "dns", "metrics", "log", "plugins", "rules")

# The keys the issue and the interface spec name, with their documented defaults.
# server.hostname and downstream.helo_name default to the machine's name (checked apart).
EXPECTED_DEFAULTS: dict[str, dict[str, Any]] = {
    "server": {
        "listen": ["127.0.0.1:25"],
        "accept_domains": [],
        "max_message_size": 26214400,
        "max_recipients": 100,
        "max_line_length": 998,
        "max_errors": 20,
        "max_connections": 1000,
        "max_connections_per_ip": 20,
        "bare_newline": "reject",
        "idle_timeout": 300,
        "command_timeout": 300,
        "data_timeout": 180,
        "drain_timeout": 30,
        "reverse_dns": True,
        "max_header_size": 262144,
        "hold_bytes": 131072,
        "greet_delay": 0,
    },
    "tls": {"cert": "", "key": ""},
    "downstream": {
        "servers": ["127.0.0.1:10025"],
        "tls": "opportunistic",
        "tls_verify": False,
        "xclient": True,
        "max_connections": 50,
        "connect_timeout": 10,
        "command_timeout": 60,
        "data_timeout": 300,
        "down_time": 30,
        "reuse_connections": True,
        "idle_timeout": 10,
    },
    "dns": {"nameservers": [], "timeout": 3},
    "metrics": {"listen": "127.0.0.1:9325"},
    "log": {"level": "info"},
    "plugins": {"checks": []},
    "rules": {
        "files": [],
        "mode": "enforce",
        "reject_score": 10,
        "tempfail_score": 0,
        "exempt_recipients": ["postmaster", "abuse"],
        "body_scan_bytes": 262144,
        "check_timeout": 10,
        "country_db": "",
    },
}
DYNAMIC_DEFAULTS = {("server", "hostname"), ("downstream", "helo_name")}


def _plain(value: Any) -> Any:
    """HostPort and tuples of them as the strings a config file would use."""
    if isinstance(value, HostPort):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def _error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        rpconfig.from_dict(data)
    return str(info.value)


# ---------------------------------------------------------------------- defaults


def test_defaults_match_the_documented_defaults() -> None:
    table = rpconfig.defaults_table()
    assert set(SECTIONS) <= set(table)
    for section, keys in EXPECTED_DEFAULTS.items():
        for key, expected in keys.items():
            assert key in table[section], f"{section}.{key} is missing from the config"
            assert _plain(table[section][key]) == expected, f"default of {section}.{key}"
    for section, key in DYNAMIC_DEFAULTS:
        assert key in table[section], f"{section}.{key} is missing from the config"


def test_empty_file_gives_defaults_and_hostname_fallbacks(tmp_path: Path) -> None:
    path = tmp_path / "empty.toml"
    path.write_text("")
    config = rpconfig.load(path)
    assert config == rpconfig.Config()
    hostname = config.server.hostname
    assert hostname and not any(c.isspace() for c in hostname)
    # downstream.helo_name unset means "use server.hostname".
    assert config.downstream.helo_name == ""
    assert config.downstream_helo == hostname
    named = rpconfig.from_dict({"server": {"hostname": "mx.example.org"}})
    assert named.downstream_helo == "mx.example.org"


def _readme_rows() -> list[str]:
    if not README.exists():
        pytest.fail(f"{README} does not exist: the config reference table (issue point 9: "
                    "every key with its default documented in the README) is missing",
                    pytrace=False)
    return [line for line in README.read_text().splitlines() if line.lstrip().startswith("|")]


# A config reference row starts with the key: | `section.key` | default | meaning |
# (subsections too: `auth.spf.fail` is key fail of section auth.spf)
_KEY_CELL = re.compile(r"^`?([a-z_.]+)\.([a-z_]+)`?$")


def _first_cell_key(row: str) -> tuple[str, str] | None:
    cells = row.strip().strip("|").split("|")
    match = _KEY_CELL.match(cells[0].strip()) if cells else None
    return (match.group(1), match.group(2)) if match else None


def _default_renderings(value: Any) -> list[str]:
    """Regexes any of which, found in a README row, documents ``value`` as the default."""
    number = r"(?<![\d.]){}(?![\d])"
    if isinstance(value, bool):
        return [r"\b" + str(value).lower() + r"\b"]
    if isinstance(value, int):
        return [number.format(re.escape(text)) for text in (str(value), f"{value:_}",
                                                              f"{value:,}")]
    if isinstance(value, float):
        texts = [str(value)] + ([str(int(value))] if value.is_integer() else [])
        return [number.format(re.escape(text)) for text in texts]
    if isinstance(value, HostPort):
        return [re.escape(str(value))]
    if isinstance(value, tuple):
        if not value:
            return [r"\[\]", "(?i)empty", "(?i)none"]
        # A list default: every element must be named (checked as one combined pattern).
        return ["".join(f"(?=.*{re.escape(str(_plain(v)))})" for v in value)]
    if value == "":
        return ['""', "(?i)empty", "(?i)unset", "(?i)none"]
    return [re.escape(str(value))]


def test_readme_documents_every_key_with_its_default() -> None:
    rows = _readme_rows()
    by_key: dict[tuple[str, str], list[str]] = {}
    for row in rows:
        key = _first_cell_key(row)
        if key is not None:
            by_key.setdefault(key, []).append(row)
    problems = []
    for section, keys in rpconfig.defaults_table().items():
        for key, default in keys.items():
            found = by_key.get((section, key))
            if not found:
                problems.append(f"{section}.{key}: no row in the README config reference")
                continue
            if (section, key) in DYNAMIC_DEFAULTS:
                continue
            # Look only at the cells after the key so the key's own name cannot match.
            rest = ["|".join(row.strip().strip("|").split("|")[1:]) for row in found]
            patterns = _default_renderings(default)
            if not any(re.search(p, text) for p in patterns for text in rest):
                problems.append(f"{section}.{key}: default {_plain(default)!r} not in {found}")
    assert problems == [], "\n".join(problems)


def test_readme_config_reference_names_only_real_keys() -> None:
    table = rpconfig.defaults_table()
    documented = {key for row in _readme_rows() if (key := _first_cell_key(row)) is not None}
    assert documented, "README has no config reference rows (| `section.key` | default | ...)"
    # Only rows of known sections: a first cell like `relayproxy.toml` is not a key.
    unknown = sorted(f"{s}.{k}" for s, k in documented if s in table and k not in table[s])
    assert unknown == [], f"README documents keys the config does not know: {unknown}"


# ---------------------------------------------------------------------- typed and frozen


def test_parsed_config_is_typed_and_frozen(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(toml_dumps({
        "server": {"listen": ["127.0.0.1:2525", "[::1]:2526"], "drain_timeout": 1,
                   "accept_domains": ["Relay.Test", ".example.com"], "max_recipients": 7},
        "downstream": {"servers": ["127.0.0.1:10025", "[::1]:10026"], "tls": "none"},
        "metrics": {"listen": ""},
    }))
    config = rpconfig.load(path)
    server = config.server
    assert server.listen == (HostPort("127.0.0.1", 2525), HostPort("::1", 2526))
    assert server.max_recipients == 7 and isinstance(server.max_recipients, int)
    # An integer in the file is still a float-typed timeout (config values are typed).
    assert isinstance(server.drain_timeout, float) and server.drain_timeout == 1.0
    assert "relay.test" in server.accept_domains and ".example.com" in server.accept_domains
    # Failover order is the order in the file.
    assert [str(s) for s in config.downstream.servers] == ["127.0.0.1:10025", "[::1]:10026"]
    assert config.downstream.tls == "none"
    assert config.metrics.listen is None  # "" disables the endpoint
    with pytest.raises(dataclasses.FrozenInstanceError):
        server.max_recipients = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server = rpconfig.ServerConfig()  # type: ignore[misc]


# ---------------------------------------------------------------------- invalid values

INVALID: list[tuple[str, str, Any]] = [
    ("server", "max_recipients", "x"),
    ("server", "max_recipients", 0),
    ("server", "max_recipients", -5),
    ("server", "max_recipients", 1.5),
    ("server", "max_recipients", True),
    ("server", "max_message_size", "25M"),
    ("server", "max_errors", 0),
    ("server", "max_connections_per_ip", -1),
    ("server", "bare_newline", "maybe"),
    ("server", "idle_timeout", 0),
    ("server", "data_timeout", "180s"),
    ("server", "drain_timeout", -1),
    ("server", "reverse_dns", "yes"),
    ("server", "hostname", "has space"),
    ("server", "hostname", ""),
    ("server", "accept_domains", [1, 2]),
    ("server", "listen", []),
    ("server", "listen", ["127.0.0.1"]),
    ("server", "listen", ["127.0.0.1:0"]),
    ("server", "listen", ["127.0.0.1:70000"]),
    ("server", "listen", ["127.0.0.1:smtp"]),
    ("server", "listen", ["[::1]x25"]),
    ("downstream", "servers", []),
    ("downstream", "servers", ["127.0.0.1"]),
    ("downstream", "tls", "yes"),
    ("downstream", "xclient", 1),
    ("downstream", "max_connections", 0),
    ("downstream", "connect_timeout", "10"),
    ("downstream", "command_timeout", 0),
    ("downstream", "data_timeout", -3),
    ("dns", "nameservers", ["127.0.0.1:x"]),
    ("dns", "timeout", 0),
    ("metrics", "listen", "9325"),
    ("log", "level", "loud"),
    ("server", "greet_delay", -1),
    ("server", "greet_delay", True),
    ("server", "hold_bytes", -1),
    ("server", "hold_bytes", 1.0),
    ("server", "max_header_size", 0),
    ("server", "accept_domains", ["has space.example"]),
    ("server", "accept_domains", ["."]),
    ("server", "hostname", "mx.example\n"),
    ("server", "listen", [{"host": "127.0.0.1", "port": 25}]),
    ("server", "idle_timeout", float("nan")),
    ("tls", "cert", 5),
    ("metrics", "listen", 9325),
    ("metrics", "listen", {"host": "127.0.0.1", "port": 9325}),
    ("plugins", "checks", [1]),
    ("rules", "files", 5),
    ("rules", "mode", "enforcing"),
    ("rules", "reject_score", -1),
    ("rules", "tempfail_score", "5"),
    ("rules", "exempt_recipients", [True]),
    ("rules", "body_scan_bytes", 0),
    ("rules", "check_timeout", 0),
    ("rules", "country_db", False),
]


@pytest.mark.parametrize(("section", "key", "value"), INVALID,
                         ids=[f"{s}.{k}={v!r}" for s, k, v in INVALID])
def test_invalid_value_error_starts_with_the_key(section: str, key: str, value: Any) -> None:
    message = _error({section: {key: value}})
    assert message.startswith(f"{section}.{key}: "), message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("server", "max_recipients", 0, "expected an integer >= 1, got 0"),
        ("server", "max_recipients", "x", "expected an integer >= 1, got 'x'"),
        ("server", "max_recipients", True, "expected an integer >= 1, got True"),
        ("server", "hold_bytes", 1.5, "expected an integer >= 0, got 1.5"),
        ("server", "idle_timeout", 0, "expected a number > 0, got 0"),
        ("server", "greet_delay", -1, "expected a number >= 0, got -1"),
        ("server", "reverse_dns", 1, "expected true or false, got 1"),
        ("server", "bare_newline", "maybe", "expected one of reject, normalize, got 'maybe'"),
        ("server", "hostname", "has space", "expected a host name, got 'has space'"),
        ("server", "listen", [], "expected one or more host:port, got []"),
        ("server", "listen", ["127.0.0.1"], "'127.0.0.1' needs a port (host:port)"),
        ("server", "accept_domains", [1, 2], "expected a string or a list of strings, got [1, 2]"),
        ("server", "accept_domains", ["a b"], "'a b' is not a domain name"),
        ("rules", "mode", 1, "expected one of enforce, monitor, got 1"),
        ("tls", "cert", 5, "expected a string, got 5"),
        ("metrics", "listen", 5, 'expected host:port, or "" for none, got 5'),
    ],
)
def test_invalid_value_says_what_was_expected_and_given(section: str, key: str, value: Any,
                                                         expected: str) -> None:
    assert _error({section: {key: value}}) == f"{section}.{key}: {expected}"


def test_every_key_names_itself_when_given_a_table() -> None:
    # No key takes a table, so each must refuse one in words of its own (no msgspec wording).
    for section, keys in rpconfig.defaults_table().items():
        for key in keys:
            # a group's table ("scanners.clamd") is written nested, as TOML reads [a.b]
            group, _, table = section.rpartition(".")
            data = {group: {table: {key: {"x": 1}}}} if group else {section: {key: {"x": 1}}}
            message = _error(data)
            assert message.startswith(f"{section}.{key}: expected "), message
            assert message.endswith(", got {'x': 1}") and "`" not in message, message


def test_invalid_value_in_a_file_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[server]\nmax_recipients = "x"\n')
    with pytest.raises(ConfigError) as info:
        rpconfig.load(path)
    assert str(info.value).startswith("server.max_recipients: ")


def test_unknown_key_is_rejected() -> None:
    message = _error({"server": {"max_recipient": 5}})
    assert message.startswith("server.max_recipient: "), message
    message = _error({"downstream": {"server": ["127.0.0.1:25"]}})
    assert message.startswith("downstream.server: "), message


def test_unknown_key_suggests_the_near_one() -> None:
    assert _error({"server": {"max_recipient": 5}}) == (
        "server.max_recipient: unknown key (did you mean max_recipients?)")
    assert _error({"rules": {"zzz": 5}}) == "rules.zzz: unknown key"


def test_unknown_section_is_rejected() -> None:
    message = _error({"srever": {"listen": ["127.0.0.1:25"]}})
    assert message.startswith("srever"), message
    # A key at the top level is not a section either.
    message = _error({"max_recipients": 5})
    assert message.startswith("max_recipients"), message
    # base_dir is where the file was read from, not something a file sets
    assert _error({"base_dir": "/"}).startswith("base_dir: unknown section")


def test_section_must_be_a_table() -> None:
    message = _error({"server": 5})
    assert message.startswith("server"), message


def test_a_string_stands_for_a_list_of_one() -> None:
    config = rpconfig.from_dict({
        "server": {"listen": "127.0.0.1:2525", "accept_domains": "Relay.Test."},
        "downstream": {"servers": "[::1]:10025"},
        "dns": {"nameservers": "127.0.0.1"},
        "plugins": {"checks": "pkg.mod:Check"},
        "rules": {"files": "rules/*.toml", "exempt_recipients": "postmaster"},
    })
    assert config.server.listen == (HostPort("127.0.0.1", 2525),)
    assert config.server.accept_domains == ("relay.test",)
    assert config.downstream.servers == (HostPort("::1", 10025),)
    assert config.dns.nameservers == (HostPort("127.0.0.1", 53),)
    assert config.plugins.checks == ("pkg.mod:Check",)
    assert config.rules.files == ("rules/*.toml",)
    assert config.rules.exempt_recipients == ("postmaster",)


def test_domains_are_compared_in_lower_case_without_the_root_dot() -> None:
    config = rpconfig.from_dict({"server": {"accept_domains": [" Relay.TEST. ", ".Example.com"]}})
    assert config.server.accept_domains == ("relay.test", ".example.com")


def test_rules_and_greet_delay_are_typed() -> None:
    config = rpconfig.from_dict({
        "server": {"greet_delay": 2},
        "rules": {"mode": "monitor", "reject_score": 5, "tempfail_score": 2.5,
                  "body_scan_bytes": 1024, "check_timeout": 3, "country_db": "GeoLite2.mmdb"},
    })
    assert config.server.greet_delay == 2.0 and isinstance(config.server.greet_delay, float)
    rules = config.rules
    assert (rules.mode, rules.reject_score, rules.tempfail_score) == ("monitor", 5.0, 2.5)
    assert isinstance(rules.reject_score, float) and isinstance(rules.check_timeout, float)
    assert rules.body_scan_bytes == 1024 and rules.country_db == "GeoLite2.mmdb"
    # 0 is allowed where it means "never" or "at once"
    zero = rpconfig.from_dict({"server": {"greet_delay": 0, "hold_bytes": 0},
                               "rules": {"reject_score": 0}})
    assert (zero.server.greet_delay, zero.server.hold_bytes, zero.rules.reject_score) == (0, 0, 0)


def test_load_records_the_folder_but_equality_ignores_it(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[rules]\nfiles = ["local.toml"]\n')
    config = rpconfig.load(path)
    assert config.base_dir == str(tmp_path.resolve())
    assert config == rpconfig.from_dict({"rules": {"files": ["local.toml"]}})


def test_config_objects_are_dataclasses_for_replace() -> None:
    # Other modules build configs with dataclasses.replace (the demo, the overrides).
    config = rpconfig.Config()
    changed = dataclasses.replace(config, downstream=dataclasses.replace(
        config.downstream, servers=(HostPort("127.0.0.1", 2526),)))
    assert changed.downstream.servers == (HostPort("127.0.0.1", 2526),)
    assert changed.downstream != config.downstream and changed.server == config.server


def test_overrides_parse_like_the_file() -> None:
    config = rpconfig.with_overrides(rpconfig.Config(), listen=["[::1]:2525"],
                                     downstream=["127.0.0.1:10026"],
                                     accept_domains=["Relay.Test."])
    assert config.server.listen == (HostPort("::1", 2525),)
    assert config.downstream.servers == (HostPort("127.0.0.1", 10026),)
    assert config.server.accept_domains == ("relay.test",)
    with pytest.raises(ConfigError, match=r"^--listen: "):
        rpconfig.with_overrides(rpconfig.Config(), listen=["127.0.0.1"])
    with pytest.raises(ConfigError, match=r"^--accept-domain: "):
        rpconfig.with_overrides(rpconfig.Config(), accept_domains=["a b"])


# ---------------------------------------------------------------------- host:port


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:25", "127.0.0.1", 25),
        ("[::1]:25", "::1", 25),
        ("[::1]:2525", "::1", 2525),
        ("localhost:10025", "localhost", 10025),
        ("mail.internal:587", "mail.internal", 587),
    ],
)
def test_hostport_parsing(text: str, host: str, port: int) -> None:
    parsed = rpconfig.parse_hostport(text, "downstream.servers")
    assert (parsed.host, parsed.port) == (host, port)
    config = rpconfig.from_dict({"downstream": {"servers": [text]}})
    assert config.downstream.servers == (HostPort(host, port),)
    # str() gives back the form a config file uses (IPv6 in brackets).
    assert str(parsed) == text


def test_ipv6_listen_address() -> None:
    config = rpconfig.from_dict({"server": {"listen": ["[::1]:25", "127.0.0.1:2525"]}})
    assert config.server.listen == (HostPort("::1", 25), HostPort("127.0.0.1", 2525))


def test_listen_must_be_an_ip_address() -> None:
    message = _error({"server": {"listen": ["mx.example.org:25"]}})
    assert message.startswith("server.listen: "), message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1", HostPort("127.0.0.1", 53)),
        ("[::1]", HostPort("::1", 53)),
        ("127.0.0.1:5353", HostPort("127.0.0.1", 5353)),
        ("[::1]:5300", HostPort("::1", 5300)),
    ],
)
def test_dns_nameservers_default_port_53(text: str, expected: HostPort) -> None:
    config = rpconfig.from_dict({"dns": {"nameservers": [text]}})
    assert config.dns.nameservers == (expected,)


# ---------------------------------------------------------------------- TLS


def test_tls_cert_without_key_is_rejected(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("placeholder")  # exists, so only the missing key can be the problem
    message = _error({"tls": {"cert": str(cert)}})
    assert message.startswith(("tls.key: ", "tls.cert: ")), message


def test_tls_key_without_cert_is_rejected(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_text("placeholder")
    message = _error({"tls": {"key": str(key)}})
    assert message.startswith(("tls.key: ", "tls.cert: ")), message


def test_tls_cert_that_does_not_exist_is_rejected(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_text("placeholder")
    message = _error({"tls": {"cert": str(tmp_path / "missing.pem"), "key": str(key)}})
    assert message.startswith("tls.cert: "), message


def test_tls_cert_and_key_enable_starttls(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("placeholder")
    key.write_text("placeholder")
    config = rpconfig.from_dict({"tls": {"cert": str(cert), "key": str(key)}})
    assert config.tls.enabled
    assert not rpconfig.Config().tls.enabled


# ---------------------------------------------------------------------- CLI


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    return lines[0]


def test_check_config_bad_file_one_line_naming_the_key(tmp_path: Path) -> None:
    bad = _write(tmp_path, "bad.toml", '[server]\nmax_recipients = "x"\n')
    result = run_cli("check-config", "-c", str(bad))
    assert result.returncode != 0, result
    assert "server.max_recipients" in _one_line(result.stderr)


def test_check_config_unknown_key_one_line(tmp_path: Path) -> None:
    bad = _write(tmp_path, "bad.toml", "[downstream]\nxclinet = true\n")
    result = run_cli("check-config", "-c", str(bad))
    assert result.returncode != 0, result
    assert "downstream.xclinet" in _one_line(result.stderr)


def test_check_config_toml_syntax_error_one_line(tmp_path: Path) -> None:
    bad = _write(tmp_path, "bad.toml", "[server\nmax_recipients = 5\n")
    result = run_cli("check-config", "-c", str(bad))
    assert result.returncode != 0, result
    _one_line(result.stderr)


def test_check_config_missing_file_one_line(tmp_path: Path) -> None:
    result = run_cli("check-config", "-c", str(tmp_path / "nope.toml"))
    assert result.returncode != 0, result
    assert "nope.toml" in _one_line(result.stderr)


def test_check_config_good_file_exits_0(tmp_path: Path) -> None:
    good = _write(tmp_path, "good.toml", toml_dumps(base_config(10025)))
    result = run_cli("check-config", "-c", str(good))
    assert result.returncode == 0, result
    assert result.stderr.strip() == ""


def test_run_bad_file_exits_nonzero_with_one_line(tmp_path: Path) -> None:
    port = free_port()
    config = base_config(10025, server={"listen": [f"127.0.0.1:{port}"],
                                        "max_recipients": "x"})
    bad = _write(tmp_path, "bad.toml", toml_dumps(config))
    # run_cli's timeout bounds this: a proxy that started anyway would never return.
    result = run_cli("run", "-c", str(bad), timeout=20)
    assert result.returncode != 0, result
    assert "server.max_recipients" in _one_line(result.stderr)

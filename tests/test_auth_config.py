"""The [auth] section and its [auth.spf], [auth.dkim], [auth.dmarc], [auth.arc] subsections."""

from __future__ import annotations

from itertools import product
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest

from relayproxy import config as rpconfig
from relayproxy import metrics
from relayproxy.config import ConfigError


def test_defaults_are_off_with_the_issues_policies() -> None:
    auth = rpconfig.Config().auth
    assert not auth.enabled and auth.timeout == 10
    assert (auth.spf.fail, auth.spf.softfail, auth.spf.temperror) == (
        "reject", "ignore", "tempfail")
    assert (auth.dkim.max_signatures, auth.dkim.min_key_bits) == (5, 1024)
    assert (auth.dmarc.reject, auth.dmarc.quarantine, auth.dmarc.temperror) == (
        "reject", "tag", "tempfail")
    assert auth.dmarc.trusted_forwarders == () and auth.arc.trusted_sealers == ()


def test_subsections_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[auth]\nenabled = true\n[auth.spf]\nfail = "tag"\n'
                    '[auth.dkim]\nmax_signatures = 2\n'
                    '[auth.arc]\ntrusted_sealers = "lists.example.org"\n')
    auth = rpconfig.load(path).auth
    assert auth.enabled and auth.spf.fail == "tag" and auth.dkim.max_signatures == 2
    assert auth.arc.trusted_sealers == ("lists.example.org",)
    assert auth.dmarc.reject == "reject"  # untouched subsections keep their defaults


@pytest.mark.parametrize(("data", "message"), [
    ({"auth": {"spf": {"fail": "drop"}}},
     "auth.spf.fail: expected one of reject, tempfail, tag, ignore, got 'drop'"),
    ({"auth": {"spf": {"fial": "tag"}}}, "auth.spf.fial: unknown key (did you mean fail?)"),
    ({"auth": {"dkim": {"max_signatures": 0}}},
     "auth.dkim.max_signatures: expected an integer >= 1, got 0"),
    ({"auth": {"dmarc": {"trusted_forwarders": ["nope"]}}},
     "auth.dmarc.trusted_forwarders: 'nope' is not an address or network"),
    ({"auth": {"arc": {"trusted_sealers": ["a b"]}}},
     "auth.arc.trusted_sealers: 'a b' is not a domain name"),
    ({"auth": {"spf": "reject"}}, "auth.spf: expected a table, got 'reject'"),
    ({"auth": {"timeout": 0}}, "auth.timeout: expected a number > 0, got 0"),
])
def test_errors_name_the_key(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        rpconfig.from_dict(data)
    assert str(info.value) == message


def test_plain_counter_is_exported_as_prometheus_clients_counter() -> None:
    # relayproxy_auth_results_total: a plain number per child, the same exposition
    ours, theirs = CollectorRegistry(auto_describe=True), CollectorRegistry(auto_describe=True)
    children = list(product(metrics.AUTH_METHODS, metrics.AUTH_RESULT_VALUES))
    plain = metrics.PlainCounter("x_auth_results", "results by method", ("method", "result"),
                                 children, ours)
    counter = Counter("x_auth_results", "results by method", ["method", "result"],
                      registry=theirs)
    for child in children:
        counter.labels(*child)
    assert generate_latest(ours) == generate_latest(theirs)
    for child in [("spf", "pass"), ("dkim", "fail"), ("spf", "pass"), ("arc", "none")]:
        plain.values[child] += 1
        counter.labels(*child).inc()
    assert generate_latest(ours) == generate_latest(theirs)
    assert b'x_auth_results_total{method="spf",result="pass"} 2.0' in generate_latest(ours)

"""Country lookups in a small MaxMind-format database written by the test (mmdb-writer), in
the layout of GeoIP2-Country, read by the real maxminddb reader."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.mmdb import place, write_database

from relayproxy.policy.geo import CountryDB

GERMANY = place("DE", 2921044, "Germany")
JAPAN = place("JP", 1861060, "Japan")
NETHERLANDS = place("NL", 2750405, "Netherlands")
EUROPE = {"code": "EU", "geoname_id": 6255148, "names": {"en": "Europe"}}

NETWORKS: dict[str, dict[str, Any]] = {
    "192.0.2.0/24": {"continent": EUROPE, "country": GERMANY, "registered_country": GERMANY},
    # an address in use in Japan, registered in the Netherlands: where it is used counts
    "198.51.100.0/25": {"country": JAPAN, "registered_country": NETHERLANDS},
    # only the registration is known: that is the best guess left
    "198.51.100.128/25": {"continent": EUROPE, "registered_country": NETHERLANDS},
    # a record without any country (GeoIP2 has these for e.g. anonymous proxies)
    "203.0.113.0/24": {"continent": EUROPE},
    "2001:db8:1::/48": {"country": JAPAN, "registered_country": JAPAN},
    "2001:db8:2::/48": {"country": {"iso_code": "de"}},  # lower case still reads as "DE"
}



@pytest.fixture
def countries(tmp_path: Path) -> Iterator[CountryDB]:
    db = CountryDB(str(write_database(tmp_path / "countries.mmdb", NETWORKS, 6)))
    yield db
    db.close()


@pytest.mark.parametrize(("ip", "country"), [
    ("192.0.2.1", "DE"),
    ("192.0.2.255", "DE"),
    ("198.51.100.7", "JP"),
    ("198.51.100.200", "NL"),
    ("::ffff:192.0.2.1", "DE"),  # an IPv4 client seen by a dual-stack listener
    ("2001:db8:1::25", "JP"),
    ("2001:db8:2:ffff::1", "DE"),
])
def test_country_of_known_addresses(countries: CountryDB, ip: str, country: str) -> None:
    assert countries.country(ip) == country


@pytest.mark.parametrize("ip", [
    "203.0.113.9",  # a record, without a country in it
    "192.0.3.1",  # no record
    "2001:db8:3::1",
    "::1",
    "not an address",
    "",
])
def test_unknown_addresses_have_no_country(countries: CountryDB, ip: str) -> None:
    assert countries.country(ip) is None


def test_ipv4_only_database(tmp_path: Path) -> None:
    ipv4 = {k: v for k, v in NETWORKS.items() if ":" not in k}
    db = CountryDB(str(write_database(tmp_path / "v4.mmdb", ipv4, 4)))
    try:
        assert db.country("192.0.2.1") == "DE"
        assert db.country("::ffff:192.0.2.1") == "DE"
        assert db.country("2001:db8:1::25") is None
    finally:
        db.close()


def test_corrupt_or_missing_database_is_refused_clearly(tmp_path: Path) -> None:
    good = write_database(tmp_path / "good.mmdb", NETWORKS, 6).read_bytes()
    truncated = tmp_path / "truncated.mmdb"
    truncated.write_bytes(good[: len(good) // 2])  # the metadata at its end is gone
    garbage = tmp_path / "garbage.mmdb"
    garbage.write_bytes(b"GeoIP? no: " + bytes(range(256)) * 4)
    for path in (truncated, garbage, tmp_path):
        with pytest.raises(ValueError, match=f"^cannot open {path}: .*valid MaxMind DB"):
            CountryDB(str(path))
    missing = tmp_path / "missing.mmdb"
    with pytest.raises(ValueError, match=f"^cannot open {missing}: No such file or directory$"):
        CountryDB(str(missing))


def test_corrupt_search_tree_means_unknown(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = write_database(tmp_path / "good.mmdb", NETWORKS, 6).read_bytes()
    broken = tmp_path / "broken.mmdb"
    broken.write_bytes(b"\xff" * 512 + good[512:])  # the tree's first nodes point nowhere
    db = CountryDB(str(broken))
    try:
        assert db.country("192.0.2.1") is None
    finally:
        db.close()
    assert "search tree is corrupt" in caplog.text

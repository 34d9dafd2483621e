"""Small MaxMind-format (GeoIP2-Country layout) databases for tests, built with mmdb-writer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmdb_writer import MMDBWriter
from netaddr import IPSet  # type: ignore[import-untyped]


def place(iso_code: str, geoname_id: int, name: str) -> dict[str, Any]:
    return {"geoname_id": geoname_id, "iso_code": iso_code, "names": {"en": name}}


def write_database(path: Path, networks: dict[str, dict[str, Any]], ip_version: int) -> Path:
    writer = MMDBWriter(ip_version=ip_version, ipv4_compatible=ip_version == 6,
                        database_type="GeoIP2-Country", languages=["en"],
                        description="relayproxy test countries")
    for network, record in networks.items():
        writer.insert_network(IPSet([network]), record)
    writer.to_db_file(str(path))
    return path

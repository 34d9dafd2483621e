"""Content scanners in the stream: clamd, rspamd, spamd (one module each; base.py: what they
share). scanner_checks builds the configured ones, in that order."""

from __future__ import annotations

from ..checks.base import Check
from ..config import ScannersConfig
from .base import ScanResult, result_key


def scanner_checks(config: ScannersConfig) -> list[Check]:
    checks: list[Check] = []
    if config.clamd.address:
        from .clamd import Clamd
        checks.append(Clamd(config.clamd))
    if config.rspamd.url:
        from .rspamd import Rspamd  # aiohttp is imported only when rspamd is configured
        checks.append(Rspamd(config.rspamd))
    if config.spamd.address:
        from .spamd import Spamd
        checks.append(Spamd(config.spamd))
    return checks


__all__ = ["ScanResult", "result_key", "scanner_checks"]

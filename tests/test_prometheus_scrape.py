"""Issue 9, tests with real parts: a real Prometheus (Debian package) on loopback scrapes a
real proxy in front of the real Postfix, loads deploy/prometheus's alerting rules, and its
HTTP API returns the series the proxy exported.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.ports import LOOPBACK, free_port
from support.postfix import PostfixInstance
from support.proxy import PROJECT_ROOT, ProxyProcess, base_config
from support.smtpclient import send_message
from support.wait import wait_until

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
ALERTS = PROJECT_ROOT / "deploy" / "prometheus" / "relayproxy-alerts.yml"


class PrometheusServer:
    """prometheus on 127.0.0.1:<free port> with its own config and TSDB directory."""

    def __init__(self, workdir: Path, target: str) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.log_path = workdir / "prometheus.log"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [{"job_name": "relayproxy",
                                "static_configs": [{"targets": [target]}]}],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> PrometheusServer:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [PROMETHEUS, f"--config.file={self.workdir / 'prometheus.yml'}",
                 f"--storage.tsdb.path={self.workdir / 'data'}",
                 f"--web.listen-address={LOOPBACK}:{self.port}",
                 "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.workdir)

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    return bool(response.status == 200)
            except OSError:
                return False

        wait_until(ready, f"prometheus ready on {self.url}", 60, interval=0.1,
                   describe=lambda: self.log_text()[-3000:],
                   abort=lambda: None if self.process is None or self.process.poll() is None
                   else f"prometheus exited with {self.process.returncode}")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=5) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        data = self.api("query", query=promql)
        assert data["resultType"] == "vector", data
        result: list[dict[str, Any]] = data["result"]
        return result


@pytest.fixture(scope="module")
def scraped_proxy(postfix: PostfixInstance, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[tuple[ProxyProcess, PrometheusServer]]:
    if not Path(PROMETHEUS).exists():
        pytest.fail("prometheus is missing: tests/run.sh installs the Debian package",
                    pytrace=False)
    config = base_config(postfix.port, downstream={"probe_interval": 1})
    proxy = ProxyProcess(config, workdir=tmp_path_factory.mktemp("scraped-proxy"))
    prometheus = PrometheusServer(tmp_path_factory.mktemp("prometheus"),
                                  config["metrics"]["listen"])
    try:
        proxy.start()
        prometheus.start()
        yield proxy, prometheus
    finally:
        prometheus.stop()
        if proxy.process is not None:
            proxy.stop()


def _value(prometheus: PrometheusServer, promql: str) -> float | None:
    result = prometheus.query(promql)
    return float(result[0]["value"][1]) if len(result) == 1 else None


def test_prometheus_scrapes_the_proxy(
        scraped_proxy: tuple[ProxyProcess, PrometheusServer]) -> None:
    proxy, prometheus = scraped_proxy
    marker = uuid.uuid4().hex
    replies = send_message(proxy.host, proxy.port, f"scrape-{marker}@example.org",
                           ["alice@relay.test"],
                           f"Subject: {marker}\r\n\r\nscraped\r\n".encode())
    assert replies["dot"].code == 250, replies
    accepted = 'relayproxy_messages_total{job="relayproxy", outcome="accepted"}'

    def scraped() -> bool:
        return _value(prometheus, accepted) == 1.0

    wait_until(scraped, f"{accepted} == 1 in Prometheus", 30, interval=0.2,
               describe=lambda: f"got {prometheus.query(accepted)}\n{prometheus.log_text()}")
    assert _value(prometheus, 'up{job="relayproxy"}') == 1.0
    server = proxy.config["downstream"]["servers"][0]
    wait_until(lambda: _value(prometheus, f'relayproxy_downstream_up{{server="{server}"}}') == 1,
               "relayproxy_downstream_up == 1 in Prometheus", 30, interval=0.2)
    # a series exported at 0 from the start is there before its first event
    assert _value(prometheus, 'relayproxy_messages_total{outcome="tempfailed"}') == 0.0
    assert _value(prometheus, "relayproxy_max_connections") == 1000.0
    # the size histogram saw the one message
    assert _value(prometheus, "relayproxy_message_size_bytes_count") == 1.0


def test_prometheus_loads_the_alerting_rules(
        scraped_proxy: tuple[ProxyProcess, PrometheusServer]) -> None:
    _, prometheus = scraped_proxy

    def evaluated() -> list[dict[str, Any]] | None:
        groups = prometheus.api("rules")["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        done = rules and all(rule.get("lastEvaluation", "").startswith("2") and
                             not rule["lastEvaluation"].startswith("0001") for rule in rules)
        return rules if done else None

    rules = wait_until(evaluated, "every alerting rule evaluated once", 30, interval=0.2)
    assert len(rules) == 7
    assert {rule["health"] for rule in rules} == {"ok"}, rules
    # a healthy proxy in front of a healthy Postfix fires nothing
    assert [r["name"] for r in rules if r["state"] != "inactive"] == []

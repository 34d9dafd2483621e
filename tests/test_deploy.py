"""Issue 9 points 1-4: deploy/ (systemd, container, Kubernetes, alerting rules, dashboard).

What can be run here is run: `systemd-analyze verify` on the units, `promtool check rules`
and `promtool test rules` on the alerts, promtool's PromQL parser on every dashboard query,
`postconf` on the compose Postfix's main.cf, `relayproxy check-config` on every shipped
configuration. The rest (compose, Dockerfile, Kubernetes manifests) is parsed and checked for
the fields and cross-references each part needs. No container engine or cluster is used.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.proxy import PROJECT_ROOT, run_cli

from relayproxy import metrics
from relayproxy.config import from_dict

DEPLOY = PROJECT_ROOT / "deploy"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
POSTCONF = "/usr/sbin/postconf"


def _run(*argv: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=120,
                          cwd=cwd, check=False)


# ---------------------------------------------------------------- the metric names exported

def exported_names() -> set[str]:
    """Every series name the proxy exports, read from its registry."""
    names: set[str] = set()
    for family in metrics.REGISTRY.collect():
        names.add(family.name)
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}{s}" for s in ("_bucket", "_sum", "_count"))
        names.update(sample.name for sample in family.samples)
    return names


_PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "inf", "nan",
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers outside label matchers and
    strings that are not functions, aggregations, keywords or durations."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word, rest = match.group(), text[match.end():].lstrip()
        if rest.startswith("(") or word.lower() in _PROMQL_WORDS:
            continue
        names.add(word)
    return names


def test_metric_names_reader() -> None:
    expr = ('sum by (le, command) (rate(relayproxy_downstream_latency_seconds_bucket'
            '{instance=~"$instance", command!="x y"}[5m])) / on (instance) group_left '
            'relayproxy_max_connections > 0.8 and up{job="a"} == 0')
    assert metric_names(expr) == {"relayproxy_downstream_latency_seconds_bucket",
                                  "relayproxy_max_connections", "up"}


# ---------------------------------------------------------------------------------- systemd

UNITS = DEPLOY / "systemd"


def _unit_settings(path: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


@pytest.mark.parametrize("name", ["relayproxy.service", "relayproxy@.service"])
def test_systemd_unit_is_hardened(name: str) -> None:
    unit = _unit_settings(UNITS / name)
    defaults = from_dict({})
    assert unit["DynamicUser"] == ["yes"] or unit.get("User"), unit
    assert unit["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert unit["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert unit["ProtectSystem"] == ["strict"]
    assert unit["NoNewPrivileges"] == ["yes"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["KillSignal"] == ["SIGTERM"]
    stop = float(unit["TimeoutStopSec"][0])
    assert stop > defaults.server.drain_timeout + defaults.downstream.data_timeout + 1, stop
    config = "%i.toml" if "@" in name else "relayproxy.toml"
    assert unit["ExecStart"][0].endswith(f"run -c /etc/relayproxy/{config}")


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_units_verify(tmp_path: Path) -> None:
    # verify insists that ExecStart's program exists: point it at this checkout's relayproxy
    program = Path(sys.executable).parent / "relayproxy"
    assert program.exists(), program
    for name in ("relayproxy.service", "relayproxy@.service"):
        text = (UNITS / name).read_text().replace("/usr/local/bin/relayproxy", str(program))
        (tmp_path / name).write_text(text)
    (tmp_path / "relayproxy@mx1.service").symlink_to("relayproxy@.service")
    for unit in ("relayproxy.service", "relayproxy@mx1.service"):
        result = _run(str(SYSTEMD_ANALYZE), "verify", f"./{unit}", cwd=tmp_path)
        # unknown or misspelt directives are only warnings: any output is a failure here
        assert result.returncode == 0 and result.stderr == "" and result.stdout == "", (
            unit, result.stdout, result.stderr)


# ---------------------------------------------------------------------- Prometheus rules

ALERTS = DEPLOY / "prometheus" / "relayproxy-alerts.yml"
ALERT_NAMES = {
    "RelayproxyDown", "RelayproxyNoDownstreamReachable", "RelayproxyTempfailRatioHigh",
    "RelayproxyRejectRatioSpike", "RelayproxyConfigReloadFailing",
    "RelayproxySessionsNearLimit", "RelayproxyScannerErrors",
}


def _promtool() -> str:
    if not Path(PROMTOOL).exists():
        pytest.fail("promtool is missing: tests/run.sh installs the Debian package prometheus",
                    pytrace=False)
    return PROMTOOL


def test_alerting_rules_check() -> None:
    result = _run(_promtool(), "check", "rules", ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERT_NAMES)} rules found" in result.stdout, result.stdout


def test_alerting_rules_fire_on_synthetic_series() -> None:
    result = _run(_promtool(), "test", "rules", "relayproxy-alerts.test.yml",
                  cwd=ALERTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    tests = yaml.safe_load((ALERTS.parent / "relayproxy-alerts.test.yml").read_text())
    tested = {case["alertname"] for test in tests["tests"]
              for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert tested == ALERT_NAMES, "every alert has a case where it fires"


def test_alerting_rules_name_only_exported_metrics() -> None:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert {rule["alert"] for rule in rules} == ALERT_NAMES
    exported = exported_names() | {"up"}  # up: Prometheus's own, per scrape target
    for rule in rules:
        unknown = metric_names(rule["expr"]) - exported
        assert not unknown, f"{rule['alert']}: {unknown} not exported"


# ---------------------------------------------------------------------------------- Grafana

GRAFANA = DEPLOY / "grafana"


def _dashboard_exprs() -> Iterator[tuple[str, str]]:
    dashboard = json.loads((GRAFANA / "relayproxy.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            # label_values(METRIC, label) is Grafana's, not PromQL: its metric is checked
            match = re.fullmatch(r"label_values\((\w+), *\w+\)", variable["definition"])
            assert match, variable["definition"]
            yield f"variable {variable['name']}", match.group(1)


def _as_promql(expr: str) -> str:
    """Grafana's variables replaced by what they stand for at query time."""
    return expr.replace("$__rate_interval", "5m").replace("$instance", ".*")


def test_dashboard_queries_name_only_exported_metrics() -> None:
    exported = exported_names()
    used: set[str] = set()
    for title, expr in _dashboard_exprs():
        names = metric_names(_as_promql(expr))
        assert names, f"{title}: {expr} selects no metric"
        assert names <= exported, f"{title}: {names - exported} not exported"
        used |= names
    # what the issue asks the dashboard to show
    for name in ("relayproxy_sessions_active", "relayproxy_messages_total",
                 "relayproxy_recipients_total", "relayproxy_rule_hits_total",
                 "relayproxy_auth_results_total", "relayproxy_scanner_verdicts_total",
                 "relayproxy_downstream_latency_seconds_bucket",
                 "relayproxy_message_size_bytes_bucket"):
        assert name in used, f"the dashboard does not show {name}"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query as a recording rule's expression."""
    rules = [{"record": f"dashboard:query{i}", "expr": _as_promql(expr)}
             for i, (_, expr) in enumerate(_dashboard_exprs())]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _run(_promtool(), "check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_layout_and_provisioning() -> None:
    dashboard = json.loads((GRAFANA / "relayproxy.json").read_text())
    assert dashboard["uid"] == "relayproxy"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for target in panel.get("targets", []):
            assert target["refId"] and target["datasource"]["uid"] == "${datasource}"
    source = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yaml").read_text())
    [datasource] = source["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/relayproxy.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


# ------------------------------------------------------------------------ container, compose

DOCKER = DEPLOY / "docker"


def _check_config_dir(config: Path, rules: dict[str, str], tmp_path: Path) -> None:
    """relayproxy check-config on config with the rule files laid out beside it."""
    (tmp_path / "relayproxy.toml").write_text(config.read_text())
    for name, text in rules.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    result = run_cli("check-config", "-c", str(tmp_path / "relayproxy.toml"))
    assert result.returncode == 0, result.stderr


def test_compose_file_parses_and_its_files_exist() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"relayproxy", "postfix", "prometheus", "grafana"}
    named_volumes = set(compose.get("volumes", {}))
    for name, service in services.items():
        build = service.get("build")
        if build is not None:
            context = DOCKER / (build if isinstance(build, str) else build["context"])
            dockerfile = "Dockerfile" if isinstance(build, str) else build["dockerfile"]
            assert (context / dockerfile).is_file(), f"{name}: no {context / dockerfile}"
        else:
            assert ":" in service["image"], f"{name}: pin the image version"
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source in named_volumes:
                continue
            assert (DOCKER / source).is_file(), f"{name}: mounts missing {source}"
            assert target.startswith("/")
        for network in service.get("networks", []):
            assert network in compose["networks"]
        for dependency in service.get("depends_on", []):
            assert dependency in services
    # the proxy's drain fits in the grace period compose gives it
    config = tomllib.loads((DOCKER / "relayproxy.toml").read_text())
    grace = int(services["relayproxy"]["stop_grace_period"].removesuffix("s"))
    assert grace > config["server"]["drain_timeout"] + config["downstream"]["data_timeout"] + 1
    # Prometheus loads the rules from where compose mounts them, and scrapes the proxy
    prometheus = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    mounted = {v.split(":")[1] for v in services["prometheus"]["volumes"]}
    assert set(prometheus["rule_files"]) <= mounted
    [scrape] = prometheus["scrape_configs"]
    assert scrape["job_name"] == "relayproxy"  # the alerting rules' up{job="relayproxy"}
    assert scrape["static_configs"][0]["targets"] == [
        f"relayproxy:{config['metrics']['listen'].rpartition(':')[2]}"]
    # Postfix trusts XCLIENT from the compose network only
    subnet = compose["networks"]["mail"]["ipam"]["config"][0]["subnet"]
    assert f"smtpd_authorized_xclient_hosts = {subnet}" in (
        DOCKER / "postfix" / "main.cf").read_text()


def test_container_config_is_valid(tmp_path: Path) -> None:
    rules = {"rules/default.toml": (PROJECT_ROOT / "rules" / "default.toml").read_text()}
    _check_config_dir(DOCKER / "relayproxy.toml", rules, tmp_path)
    config = tomllib.loads((DOCKER / "relayproxy.toml").read_text())
    assert config["downstream"]["servers"] == ["postfix:25"]
    assert config["metrics"]["listen"].endswith(":9325")


def test_dockerfile_is_non_root_with_a_healthcheck() -> None:
    lines = [line.strip() for line in (DOCKER / "Dockerfile").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    [user] = [line for line in lines if line.startswith("USER ")]
    assert user.split()[1].split(":")[0] not in ("0", "root")
    health = " ".join(lines[i] for i, line in enumerate(lines) if line.startswith("HEALTHCHECK")
                      for i in (i, i + 1))
    assert "/healthz" in health
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    for line in lines:
        if line.startswith("COPY ") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert (PROJECT_ROOT / source).exists(), source
                assert f"!{source}" in ignore or f"!{source}/" in ignore, (
                    f"{source} is excluded from the build context")


def test_compose_postfix_main_cf_is_clean(tmp_path: Path) -> None:
    if not Path(POSTCONF).exists():
        pytest.fail(f"{POSTCONF} is missing: tests/run.sh installs postfix", pytrace=False)
    shutil.copy(DOCKER / "postfix" / "main.cf", tmp_path / "main.cf")
    shutil.copy("/usr/share/postfix/master.cf.dist", tmp_path / "master.cf")
    result = _run(POSTCONF, "-c", tmp_path, "-n")
    # an unknown or misspelt parameter is reported as "unused parameter"
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "virtual_mailbox_domains = example.test" in result.stdout


# ------------------------------------------------------------------------------ Kubernetes

KUBE = DEPLOY / "kubernetes"


def _manifests() -> dict[str, list[dict[str, Any]]]:
    """kind -> documents, from every file the kustomization lists."""
    kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in KUBE.glob("*.yaml")} - {"kustomization.yaml"}
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for name in sorted(listed):
        for doc in yaml.safe_load_all((KUBE / name).read_text()):
            assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], name
            by_kind.setdefault(doc["kind"], []).append(doc)
    return by_kind


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and selector.items() <= labels.items()


def test_kubernetes_manifests_fit_together(tmp_path: Path) -> None:
    kinds = _manifests()
    [deployment] = kinds["Deployment"]
    [configmap] = kinds["ConfigMap"]
    [monitor] = kinds["ServiceMonitor"]
    [pdb] = kinds["PodDisruptionBudget"]
    [hpa] = kinds["HorizontalPodAutoscaler"]
    assert deployment["apiVersion"] == "apps/v1"
    assert pdb["apiVersion"] == "policy/v1" and hpa["apiVersion"] == "autoscaling/v2"
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"

    spec = deployment["spec"]
    pod_labels = spec["template"]["metadata"]["labels"]
    assert _matches(spec["selector"]["matchLabels"], pod_labels)
    pod = spec["template"]["spec"]
    [container] = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True

    # the configuration: valid, and the ports and drain the manifests assume
    data = configmap["data"]
    config = from_dict(tomllib.loads(data["relayproxy.toml"]))
    (tmp_path / "relayproxy.toml").write_text(data["relayproxy.toml"])
    for name in config.rules.files:
        (tmp_path / name).write_text(data[name])
    result = run_cli("check-config", "-c", str(tmp_path / "relayproxy.toml"))
    assert result.returncode == 0, result.stderr
    assert config.metrics.listen is not None and config.metrics.listen.port == ports["metrics"]
    assert config.server.listen[0].port == ports["smtp"]
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    drain = config.server.drain_timeout + config.downstream.data_timeout + 1
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain
    [volume] = [v for v in pod["volumes"] if "configMap" in v]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert [m["mountPath"] for m in container["volumeMounts"]
            if m["name"] == volume["name"]] == ["/etc/relayproxy"]
    assert container["args"] == ["run", "-c", "/etc/relayproxy/relayproxy.toml"]

    services = {s["metadata"]["name"]: s for s in kinds["Service"]}
    smtp = services["relayproxy"]["spec"]
    assert smtp["type"] == "LoadBalancer" and smtp["externalTrafficPolicy"] == "Local"
    for service in services.values():
        assert _matches(service["spec"]["selector"], pod_labels)
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports
    # the ServiceMonitor finds the metrics Service, and only it, by its labels and port
    found = [s for s in services.values()
             if _matches(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
    assert [s["metadata"]["name"] for s in found] == ["relayproxy-metrics"]
    assert monitor["spec"]["endpoints"][0]["port"] in {
        p["name"] for p in found[0]["spec"]["ports"]}
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["spec"]["jobLabel"] in found[0]["metadata"]["labels"]

    assert _matches(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["metrics"]


def test_readme_operating_lists_every_alert() -> None:
    readme = (PROJECT_ROOT / "README.md").read_text()
    operating = readme.split("## Operating", 1)[1].split("\n## ", 1)[0]
    for name in ALERT_NAMES:
        assert f"| `{name}` |" in operating, f"README's Operating section lacks {name}"

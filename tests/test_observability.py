"""Issue point 11: Prometheus metrics and the per-transaction log line.

Each metric is checked by its delta across a known SMTP sequence against a real proxy (shared
per module), in front of the real Postfix, a dead downstream, or a scripted one.
"""

from __future__ import annotations

import itertools
import re
import uuid
from collections.abc import Callable, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.ports import free_port
from support.postfix import PostfixInstance
from support.proxy import ProxyProcess, base_config
from support.scripted import ScriptedDownstream
from support.smtpclient import RawSMTP, data_payload, send_message
from support.wait import wait_until

ProxyFactory = Callable[..., ProxyProcess]
ScriptedFactory = Callable[..., ScriptedDownstream]

OUTCOMES = ("accepted", "rejected", "tempfailed")
SOURCES = ("local", "rule", "downstream")
MESSAGE_OUTCOMES = ("accepted", "rejected", "tempfailed", "aborted")


def _start(config: dict[str, object], tmp_path_factory: pytest.TempPathFactory) -> ProxyProcess:
    process = ProxyProcess(config, workdir=tmp_path_factory.mktemp("obs-proxy"))
    try:
        return process.start()
    except BaseException:
        # A proxy that never answered may still run, and a fixture that failed before its
        # yield has no teardown to stop it.
        if process.process is not None:
            process.stop()
        raise


@pytest.fixture(scope="module")
def proxy(
    postfix: PostfixInstance, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """One proxy in front of the real Postfix for the whole module."""
    process = _start(base_config(postfix.port), tmp_path_factory)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def dead_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """A proxy whose downstream port has nothing listening."""
    process = _start(base_config(free_port()), tmp_path_factory)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def tempfail_downstream() -> Iterator[ScriptedDownstream]:
    server = ScriptedDownstream({"DOT": "451 4.3.0 Try again later"}).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tempfail_proxy(
    tempfail_downstream: ScriptedDownstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    process = _start(base_config(tempfail_downstream.port), tmp_path_factory)
    yield process
    process.stop()


def _message(marker: str, extra: str = "") -> bytes:
    return (
        f"From: sender@example.org\r\nTo: alice@relay.test\r\nSubject: {marker}\r\n"
        f"Message-ID: <{uuid.uuid4()}@example.org>\r\n\r\nline with {marker}\r\n{extra}"
    ).encode()


def _sender() -> str:
    return f"obs-{uuid.uuid4().hex[:12]}@example.org"


def _wait_metric(
    proxy: ProxyProcess, name: str, labels: dict[str, str] | None, expected: float,
    timeout: float = 10,
) -> None:
    """Bounded wait for a metric that moves after the client has its reply (e.g. the gauge
    of active sessions drops only once the proxy has closed the connection)."""
    wait_until(
        lambda: proxy.metric(name, labels) == expected,
        f"{name}{labels or ''} == {expected}",
        timeout,
        describe=lambda: (
            f"{name}{labels or ''} = {proxy.metric(name, labels)}\n{proxy.log_tail()}"
        ),
    )


def _families(proxy: ProxyProcess) -> dict[str, tuple[str, list[dict[str, str]]]]:
    """family name -> (type, label sets of its samples)."""
    result: dict[str, tuple[str, list[dict[str, str]]]] = {}
    for family in text_string_to_metric_families(proxy.metrics_text()):
        result[family.name] = (family.type, [dict(s.labels) for s in family.samples])
    return result


def _recipients(proxy: ProxyProcess) -> dict[tuple[str, str], float]:
    return {
        (o, s): proxy.metric("relayproxy_recipients_total", {"outcome": o, "source": s})
        for o in OUTCOMES
        for s in SOURCES
    }


def _messages(proxy: ProxyProcess) -> dict[str, float]:
    return {o: proxy.metric("relayproxy_messages_total", {"outcome": o})
            for o in MESSAGE_OUTCOMES}


def _delta(after: dict[object, float], before: dict[object, float]) -> dict[object, float]:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def _transaction_count(proxy: ProxyProcess) -> int:
    return len(proxy.transactions())


# ---------------------------------------------------------------------- exported metrics


def test_metrics_endpoint_exports_the_issue_metrics(proxy: ProxyProcess) -> None:
    families = _families(proxy)
    expected_types = {
        "relayproxy_connections": "counter",
        "relayproxy_sessions_active": "gauge",
        "relayproxy_messages": "counter",
        "relayproxy_recipients": "counter",
        "relayproxy_downstream_errors": "counter",
        "relayproxy_downstream_latency_seconds": "histogram",
        "relayproxy_message_size_bytes": "histogram",
    }
    for name, kind in expected_types.items():
        assert name in families, f"{name} not exported; have {sorted(families)}"
        assert families[name][0] == kind, f"{name} is a {families[name][0]}, not a {kind}"
    text = proxy.metrics_text()
    for sample in ("relayproxy_connections_total", "relayproxy_sessions_active",
                   "relayproxy_message_size_bytes_count", "relayproxy_message_size_bytes_sum"):
        assert re.search(rf"^{sample}(\{{| )", text, re.MULTILINE), f"no sample {sample}"
    # The label values of the issue are all exposed (at zero until they happen).
    message_outcomes = {ls.get("outcome") for ls in families["relayproxy_messages"][1]}
    assert set(MESSAGE_OUTCOMES) <= message_outcomes
    pairs = {(ls.get("outcome"), ls.get("source")) for ls in families["relayproxy_recipients"][1]}
    assert {(o, s) for o in OUTCOMES for s in SOURCES} <= pairs


# Every value of every label, as dashboards and alerts rely on them (README, Metrics).
LABELLED_SERIES: dict[str, dict[str, tuple[str, ...]]] = {
    "relayproxy_connections_refused": {"reason": ("max_connections", "max_connections_per_ip")},
    "relayproxy_messages": {"outcome": MESSAGE_OUTCOMES},
    "relayproxy_recipients": {"outcome": OUTCOMES, "source": SOURCES},
    "relayproxy_rejections": {
        "stage": ("connect", "helo", "mail", "rcpt", "data", "dot"),
        "code_class": ("4xx", "5xx"),
        "source": SOURCES,
    },
    "relayproxy_protocol_errors": {
        "kind": ("line_too_long", "bad_characters", "unknown_command", "bare_newline_command",
                 "pregreet"),
    },
    "relayproxy_downstream_errors": {
        "kind": ("connect", "timeout", "disconnect", "busy", "tls", "xclient", "helo_refused"),
    },
    "relayproxy_config_reloads": {"result": ("ok", "failed")},
    "relayproxy_downstream_latency_seconds": {
        "command": ("connect", "ehlo", "starttls", "xclient", "mail", "rcpt", "data", "dot",
                    "rset"),
    },
}


def _label_sets(labels: dict[str, tuple[str, ...]]) -> set[tuple[tuple[str, str], ...]]:
    names = sorted(labels)
    return {tuple(zip(names, values, strict=True))
            for values in itertools.product(*(labels[n] for n in names))}


def test_fresh_proxy_exports_every_labelled_series_at_zero(
    proxy_factory: ProxyFactory, scripted: ScriptedFactory
) -> None:
    """Before any event, rate() and absent-series alerts need each series to exist at 0."""
    fresh = proxy_factory(base_config(scripted().port))
    text = fresh.metrics_text()
    assert re.search(r'^relayproxy_downstream_errors_total\{kind="timeout"\} 0\.0$', text,
                     re.MULTILINE), "no zero timeout series on a fresh start:\n" + text
    created = [line for line in text.splitlines() if "_created" in line]
    assert not created, "_created series are exported:\n" + "\n".join(created)

    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, labels in LABELLED_SERIES.items():
        assert name in families, f"{name} not exported; have {sorted(families)}"
        family = families[name]
        # A histogram has one _count sample per label set, next to its buckets and sum.
        samples = [s for s in family.samples
                   if s.name == (f"{name}_count" if family.type == "histogram"
                                 else f"{name}_total")]
        exported = {tuple(sorted(s.labels.items())) for s in samples}
        missing = _label_sets(labels) - exported
        assert not missing, f"{name}: no series for {sorted(missing)}"
        # Only the readiness probe (greeting and QUIT) has happened: nothing was counted.
        counted = {tuple(sorted(s.labels.items())): s.value for s in samples if s.value}
        assert not counted, f"{name} counted something on a fresh proxy: {counted}"


def test_connections_total_and_sessions_active(proxy: ProxyProcess) -> None:
    _wait_metric(proxy, "relayproxy_sessions_active", None, 0)
    before = proxy.metric("relayproxy_connections_total")
    clients = [RawSMTP(timeout=5), RawSMTP(timeout=5)]
    try:
        for client in clients:
            assert client.connect(proxy.host, proxy.port).code == 220
        # Counted at accept, before the greeting was written.
        assert proxy.metric("relayproxy_connections_total") == before + 2
        assert proxy.metric("relayproxy_sessions_active") == 2
        assert clients[0].cmd("QUIT").code == 221
        _wait_metric(proxy, "relayproxy_sessions_active", None, 1)
    finally:
        for client in clients:
            client.close()
    _wait_metric(proxy, "relayproxy_sessions_active", None, 0)
    assert proxy.metric("relayproxy_connections_total") == before + 2


# ---------------------------------------------------------------------- message outcomes


def test_accepted_message_moves_messages_recipients_latency_and_size(
    proxy: ProxyProcess, mailboxes: PostfixInstance
) -> None:
    body = _message(uuid.uuid4().hex, ("x" * 70 + "\r\n") * 40)
    messages = _messages(proxy)
    rcpts = _recipients(proxy)
    latency = {c: proxy.metric("relayproxy_downstream_latency_seconds_count", {"command": c})
               for c in ("mail", "rcpt", "data", "dot")}
    size_count = proxy.metric("relayproxy_message_size_bytes_count")
    size_sum = proxy.metric("relayproxy_message_size_bytes_sum")

    replies = send_message(proxy.host, proxy.port, _sender(), ["alice@relay.test"], body)
    assert replies["dot"].code == 250, replies

    assert _delta(_messages(proxy), messages) == {"accepted": 1}
    assert _delta(_recipients(proxy), rcpts) == {("accepted", "downstream"): 1}
    for command, count in latency.items():
        now = proxy.metric("relayproxy_downstream_latency_seconds_count", {"command": command})
        assert now == count + 1, f"latency histogram for {command}: {count} -> {now}"
    # Size as the client sent it: the body bytes, without the proxy's Received header.
    assert proxy.metric("relayproxy_message_size_bytes_count") == size_count + 1
    assert proxy.metric("relayproxy_message_size_bytes_sum") - size_sum == len(body)
    mailboxes.wait_for_deliveries(1, user="alice")


def test_latency_histogram_has_buckets_by_command(proxy: ProxyProcess) -> None:
    replies = send_message(proxy.host, proxy.port, _sender(), ["bob@relay.test"],
                           _message("latency"))
    assert replies["dot"].code == 250
    text = proxy.metrics_text()
    for command in ("mail", "rcpt", "dot"):
        inf = re.search(
            rf'^relayproxy_downstream_latency_seconds_bucket\{{[^}}]*command="{command}"'
            rf'[^}}]*le="\+Inf"[^}}]*\}} (\S+)$|'
            rf'^relayproxy_downstream_latency_seconds_bucket\{{[^}}]*le="\+Inf"'
            rf'[^}}]*command="{command}"[^}}]*\}} (\S+)$',
            text, re.MULTILINE,
        )
        assert inf, f"no +Inf bucket for command={command}"
        count = proxy.metric("relayproxy_downstream_latency_seconds_count",
                             {"command": command})
        assert float(inf.group(1) or inf.group(2)) == count > 0


@pytest.mark.parametrize(
    ("rcpt", "refusal", "source"),
    [
        ("nobody@relay.test", (550, "5.1.1"), "downstream"),  # Postfix: unknown user
        ("someone@elsewhere.example", (550, "5.7.1"), "local"),  # the proxy: relay denied
    ],
    ids=["unknown-recipient", "relay-denied"],
)
def test_refused_recipient_counts_rejected_by_its_source(
    rcpt: str,
    refusal: tuple[int, str],
    source: str,
    proxy: ProxyProcess,
    mailboxes: PostfixInstance,
) -> None:
    rcpts = _recipients(proxy)
    with RawSMTP(timeout=5) as client:
        client.connect(proxy.host, proxy.port)
        client.ehlo()
        assert client.cmd(f"MAIL FROM:<{_sender()}>").code == 250
        reply = client.cmd(f"RCPT TO:<{rcpt}>")
        assert (reply.code, reply.enhanced) == refusal, reply
        client.cmd("QUIT")
    assert _delta(_recipients(proxy), rcpts) == {("rejected", source): 1}


def test_rejected_message_counts_rejected(
    proxy: ProxyProcess, mailboxes: PostfixInstance
) -> None:
    messages = _messages(proxy)
    # A bare LF is refused at end of data (default bare_newline = reject).
    replies = send_message(proxy.host, proxy.port, _sender(), ["alice@relay.test"],
                           b"Subject: bare\r\n\r\nbare\nline\r\n")
    assert (replies["dot"].code, replies["dot"].enhanced) == (550, "5.6.0"), replies
    assert _delta(_messages(proxy), messages) == {"rejected": 1}
    mailboxes.wait_queue_empty()
    assert mailboxes.deliveries() == []


def test_tempfailed_message_counts_tempfailed(tempfail_proxy: ProxyProcess) -> None:
    messages = _messages(tempfail_proxy)
    replies = send_message(tempfail_proxy.host, tempfail_proxy.port, _sender(),
                           ["alice@relay.test"], _message("tempfail"))
    assert (replies["dot"].code, replies["dot"].enhanced) == (451, "4.3.0"), replies
    assert _delta(_messages(tempfail_proxy), messages) == {"tempfailed": 1}


def test_client_disconnect_mid_data_counts_aborted(
    proxy: ProxyProcess, mailboxes: PostfixInstance
) -> None:
    marker = uuid.uuid4().hex
    messages = _messages(proxy)
    logged = _transaction_count(proxy)
    sender = _sender()
    with RawSMTP(timeout=5) as client:
        client.connect(proxy.host, proxy.port)
        client.ehlo()
        assert client.cmd(f"MAIL FROM:<{sender}>").code == 250
        assert client.cmd("RCPT TO:<alice@relay.test>").code == 250
        assert client.cmd("DATA").code == 354
        client.send(f"Subject: {marker}\r\n\r\npartial {marker}\r\n".encode())
    # The aborted transaction is logged once the proxy noticed the disconnect.
    proxy.wait_for_transactions(logged + 1)
    assert _delta(_messages(proxy), messages) == {"aborted": 1}
    (line,) = [t for t in proxy.transactions() if t.get("from") == f"<{sender}>"]
    assert line["outcome"] == "aborted"
    assert marker not in proxy.log_text(), "partial message content reached the log"
    mailboxes.wait_queue_empty()
    assert mailboxes.deliveries() == []


def test_downstream_dead_counts_downstream_error(dead_proxy: ProxyProcess) -> None:
    before = dead_proxy.metric("relayproxy_downstream_errors_total")
    with RawSMTP(timeout=10) as client:
        client.connect(dead_proxy.host, dead_proxy.port)
        client.ehlo()
        assert client.cmd(f"MAIL FROM:<{_sender()}>").code == 250  # answered by the proxy
        reply = client.cmd("RCPT TO:<alice@relay.test>")
        assert (reply.code, reply.enhanced) == (451, "4.4.1"), reply
        # the transaction keeps that answer; the dead server is not asked again
        again = client.cmd("RCPT TO:<bob@relay.test>")
        assert (again.code, again.enhanced) == (451, "4.4.1"), again
        client.cmd("QUIT")
    assert dead_proxy.metric("relayproxy_downstream_errors_total") == before + 1


# ---------------------------------------------------------------------- transaction log


def _code_after(rcpts: str, address: str, others: list[str]) -> str:
    """The part of the rcpts field between ``address`` and the next recipient."""
    start = rcpts.find(address)
    assert start >= 0, f"{address} missing from rcpts={rcpts!r}"
    tail = rcpts[start + len(address):]
    ends = [i for other in others if (i := tail.find(other)) >= 0]
    return tail[: min(ends)] if ends else tail


def test_transaction_log_line_fields_and_no_content(
    proxy: ProxyProcess, mailboxes: PostfixInstance
) -> None:
    marker = uuid.uuid4().hex  # only in the message content, never in the envelope
    sender = _sender()
    helo = f"helo-{uuid.uuid4().hex[:8]}.example.org"
    body = _message(marker, f"second line {marker}\r\n")
    rcpts = ["alice@relay.test", "nobody@relay.test", "someone@elsewhere.example"]
    logged = _transaction_count(proxy)
    with RawSMTP(timeout=10) as client:
        client.connect(proxy.host, proxy.port)
        assert client.sock is not None
        client_port = client.sock.getsockname()[1]
        client.ehlo(helo)
        assert client.cmd(f"MAIL FROM:<{sender}>").code == 250
        codes = [client.cmd(f"RCPT TO:<{r}>").code for r in rcpts]
        assert codes == [250, 550, 550]
        assert client.cmd("DATA").code == 354
        client.send(data_payload(body))
        dot = client.read_reply()
        assert dot.code == 250, dot
        client.cmd("QUIT")

    lines = proxy.wait_for_transactions(logged + 1)
    mine = [t for t in lines if t.get("from") == f"<{sender}>"]
    assert len(mine) == 1, f"one transaction line per transaction, got {mine}"
    (line,) = mine
    assert line["event"] == "transaction"
    assert re.fullmatch(r"[0-9A-Za-z]+", line["session"]), line
    assert "127.0.0.1" in line["client"] and str(client_port) in line["client"], line
    assert line["helo"] == helo
    for address, code in zip(rcpts, codes, strict=True):
        others = [r for r in rcpts if r != address]
        assert str(code) in _code_after(line["rcpts"], address, others), line["rcpts"]
    assert line["size"] == str(len(body))
    assert str(mailboxes.port) in line["downstream"], line
    assert line["reply"].startswith("250"), line
    assert line["outcome"] == "accepted"
    assert float(line["duration_ms"]) >= 0
    mailboxes.wait_for_deliveries(1, user="alice")
    # The content (subject and body both carry the marker) never reaches the log.
    assert marker not in proxy.log_text()

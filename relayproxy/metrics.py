"""Every Prometheus metric of relayproxy, defined in one place.

Labels are bounded sets (outcome, source, command, reason); never addresses or domains.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import product
from typing import TYPE_CHECKING, Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable

# Every value each label can take. Each child is created at import so that every series is
# exported at 0 from the start: a series that appears only with its first event is invisible
# to rate() and to alerts until then. Code that labels a metric must use one of these values.
CONNECTION_REFUSAL_REASONS: Final = ("max_connections", "max_connections_per_ip")
MESSAGE_OUTCOMES: Final = ("accepted", "rejected", "tempfailed", "aborted")
RECIPIENT_OUTCOMES: Final = ("accepted", "rejected", "tempfailed")
DECISION_SOURCES: Final = ("local", "rule", "auth", "scanner", "downstream")
REJECTION_STAGES: Final = ("connect", "helo", "mail", "rcpt", "data", "dot")
REPLY_CLASSES: Final = ("4xx", "5xx")
PROTOCOL_ERROR_KINDS: Final = (
    "line_too_long", "bad_characters", "unknown_command", "bare_newline_command", "pregreet"
)
PROXY_PROTOCOL_ERROR_KINDS: Final = ("untrusted", "missing", "malformed", "truncated", "timeout")
STATE_ERROR_KINDS: Final = ("connect", "timeout", "error", "skipped")
DOWNSTREAM_ERROR_KINDS: Final = (
    "connect", "timeout", "disconnect", "busy", "tls", "xclient", "helo_refused"
)
LATENCY_COMMANDS: Final = (
    "connect", "ehlo", "starttls", "xclient", "mail", "rcpt", "data", "dot", "rset"
)
CONFIG_RELOAD_RESULTS: Final = ("ok", "failed")
AUTH_METHODS: Final = ("spf", "dkim", "dmarc", "arc")
# RFC 8601 result values of the four methods together (each method uses a subset)
AUTH_RESULT_VALUES: Final = (
    "pass", "fail", "softfail", "neutral", "none", "temperror", "permerror", "policy"
)
SCANNERS: Final = ("clamd", "rspamd", "spamd")
SCANNER_VERDICTS_SEEN: Final = ("clean", "infected", "spam", "reject", "tempfail", "add_header",
                                "rewrite_subject", "skipped")
SCANNER_ERROR_KINDS: Final = ("connect", "timeout", "protocol", "too_big")

# The _created series (one per child, the process start time over again) doubles what is
# scraped and stored and tells nothing that process_start_time_seconds does not. The flag
# is read at each scrape, so this holds for every metric whenever it was defined.
disable_created_metrics()  # type: ignore[no-untyped-call]  # unannotated in prometheus-client

REGISTRY = CollectorRegistry(auto_describe=True)


class PlainCounter(Collector):
    """A labelled counter for a path taken for every message: each child is a plain number in
    `values`, incremented in place (values[labels] += 1: no method call, no lock; the
    increments and the scrapes all run on the event loop, see serve()), and exported as a
    prometheus_client Counter of the same name, documentation and children is (equality:
    tests/test_auth_config.py). Counter.inc cost four times as much."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...],
                 children: Iterable[tuple[str, ...]], registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self.values: dict[tuple[str, ...], float] = dict.fromkeys(children, 0.0)
        registry.register(self)

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield self._family()

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = self._family()
        for labels, value in self.values.items():
            family.add_metric(labels, value)
        yield family


CONNECTIONS = Counter(
    "relayproxy_connections", "Inbound connections accepted", registry=REGISTRY
)
CONNECTIONS_REFUSED = Counter(
    "relayproxy_connections_refused",
    "Inbound connections refused with 421 by a limit",
    ["reason"],
    registry=REGISTRY,
)
SESSIONS_ACTIVE = Gauge(
    "relayproxy_sessions_active", "Inbound SMTP sessions in progress", registry=REGISTRY
)
MESSAGES = Counter(
    "relayproxy_messages",
    "Messages by final outcome (accepted only when the downstream said 250)",
    ["outcome"],
    registry=REGISTRY,
)
RECIPIENTS = Counter(
    "relayproxy_recipients",
    "RCPT commands by outcome and by who decided",
    ["outcome", "source"],
    registry=REGISTRY,
)
REJECTIONS = Counter(
    "relayproxy_rejections",
    "Replies refusing a command, by stage and reply class",
    ["stage", "code_class", "source"],
    registry=REGISTRY,
)
PROTOCOL_ERRORS = Counter(
    "relayproxy_protocol_errors",
    "Client protocol errors (syntax, sequence, overlong lines, bare newlines)",
    ["kind"],
    registry=REGISTRY,
)
PROXY_PROTOCOL_ERRORS = Counter(
    "relayproxy_proxy_protocol_errors",
    "Connections closed for want of a valid PROXY protocol header, by kind",
    ["kind"],
    registry=REGISTRY,
)
STATE_ERRORS = Counter(
    "relayproxy_state_errors",
    "Shared state (Redis) operations that failed, by kind (skipped: not tried, within"
    " state.down_time of a failure); each was answered per state.on_error",
    ["kind"],
    registry=REGISTRY,
)
DOWNSTREAM_ERRORS = Counter(
    "relayproxy_downstream_errors",
    "Downstream failures: connect errors, timeouts, disconnects",
    ["kind"],
    registry=REGISTRY,
)
DOWNSTREAM_CONNECTIONS = Gauge(
    "relayproxy_downstream_connections",
    "Open downstream connections (in use and idle in the pool)",
    registry=REGISTRY,
)
DOWNSTREAM_LATENCY = Histogram(
    "relayproxy_downstream_latency_seconds",
    "Downstream reply latency by command",
    ["command"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
MESSAGE_SIZE = Histogram(
    "relayproxy_message_size_bytes",
    "Size of messages received (as sent by the client)",
    buckets=(1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 10485760, 26214400, 104857600),
    registry=REGISTRY,
)
RULE_HITS = Counter(
    "relayproxy_rule_hits",
    "Rules that matched, by rule and what they did (monitor: would have, not enforced);"
    " every rule of the loaded rule files is exported from the start",
    ["rule", "action"],
    registry=REGISTRY,
)
CONFIG_RELOADS = Counter(
    "relayproxy_config_reloads",
    "SIGHUP reloads by result",
    ["result"],
    registry=REGISTRY,
)
AUTH_RESULTS = PlainCounter(
    "relayproxy_auth_results",
    "Sender authentication results by method (spf, dkim, dmarc, arc) and RFC 8601 result",
    ("method", "result"),
    product(AUTH_METHODS, AUTH_RESULT_VALUES),  # every child from the start, as below
    REGISTRY,
)
SCANNER_VERDICTS = Counter(
    "relayproxy_scanner_verdicts",
    "Content scanner verdicts by scanner",
    ["scanner", "verdict"],
    registry=REGISTRY,
)
SCANNER_ERRORS = Counter(
    "relayproxy_scanner_errors",
    "Content scanner failures by scanner and kind (too_big: the message was not scanned)",
    ["scanner", "kind"],
    registry=REGISTRY,
)
SCANNER_LATENCY = Histogram(
    "relayproxy_scanner_latency_seconds",
    "Time from the end of data to the scanner's verdict",
    ["scanner"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
DOWNSTREAM_UP = Gauge(
    "relayproxy_downstream_up",
    "1 when the downstream server answered the last health probe, else 0",
    ["server"],
    registry=REGISTRY,
)
MAX_CONNECTIONS = Gauge(
    "relayproxy_max_connections",
    "The configured server.max_connections (to compare relayproxy_sessions_active with)",
    registry=REGISTRY,
)
CONFIG_LAST_RELOAD_OK = Gauge(
    "relayproxy_config_last_reload_successful",
    "1 when the last SIGHUP reload succeeded (or none was tried), 0 when it failed and the"
    " previous configuration is still running",
    registry=REGISTRY,
)
CONFIG_LAST_RELOAD_OK.set(1)

for _reason in CONNECTION_REFUSAL_REASONS:
    CONNECTIONS_REFUSED.labels(_reason)
for _outcome in MESSAGE_OUTCOMES:
    MESSAGES.labels(_outcome)
for _outcome, _source in product(RECIPIENT_OUTCOMES, DECISION_SOURCES):
    RECIPIENTS.labels(_outcome, _source)
for _stage, _class, _source in product(REJECTION_STAGES, REPLY_CLASSES, DECISION_SOURCES):
    REJECTIONS.labels(_stage, _class, _source)
for _kind in PROTOCOL_ERROR_KINDS:
    PROTOCOL_ERRORS.labels(_kind)
for _kind in PROXY_PROTOCOL_ERROR_KINDS:
    PROXY_PROTOCOL_ERRORS.labels(_kind)
for _kind in STATE_ERROR_KINDS:
    STATE_ERRORS.labels(_kind)
for _kind in DOWNSTREAM_ERROR_KINDS:
    DOWNSTREAM_ERRORS.labels(_kind)
for _result in CONFIG_RELOAD_RESULTS:
    CONFIG_RELOADS.labels(_result)
for _scanner in SCANNERS:
    SCANNER_LATENCY.labels(_scanner)
    for _verdict in SCANNER_VERDICTS_SEEN:
        SCANNER_VERDICTS.labels(_scanner, _verdict)
    for _kind in SCANNER_ERROR_KINDS:
        SCANNER_ERRORS.labels(_scanner, _kind)

# Label children resolved once: .labels() costs a dict lookup and a lock per call.
MESSAGES_ACCEPTED = MESSAGES.labels("accepted")
MESSAGES_REJECTED = MESSAGES.labels("rejected")
MESSAGES_TEMPFAILED = MESSAGES.labels("tempfailed")
MESSAGES_ABORTED = MESSAGES.labels("aborted")
LATENCY = {c: DOWNSTREAM_LATENCY.labels(c) for c in LATENCY_COMMANDS}
MESSAGES_BY = {o: MESSAGES.labels(o) for o in MESSAGE_OUTCOMES}
RECIPIENTS_BY = {(o, s): RECIPIENTS.labels(o, s)
                 for o, s in product(RECIPIENT_OUTCOMES, DECISION_SOURCES)}


def scrape() -> tuple[bytes, str]:
    """The Prometheus text exposition of every metric, and its content type."""
    # the text format generate_latest writes; prometheus-client's newest CONTENT_TYPE_LATEST
    # names a later version that Prometheus before 3.0 does not know
    return generate_latest(REGISTRY), "text/plain; version=0.0.4; charset=utf-8"


async def serve(host: str, port: int, unready_reason: Callable[[], str | None]
                ) -> asyncio.Server:
    """/metrics, /healthz and /readyz from the event loop (relayproxy.endpoint)."""
    from .endpoint import serve_operations

    return await serve_operations(host, port, unready_reason)

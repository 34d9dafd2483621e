"""Rule files: loading and validation (errors name the file, the rule and the key), and each
condition evaluated on the facts it reads. End-to-end behaviour is in test_rules_e2e.py."""

from __future__ import annotations

import ipaddress
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayproxy.headers import HeaderSection
from relayproxy.policy.rules import Facts, RuleError, RuleSet, Stage, load_rules


def _load(tmp_path: Path, text: str, name: str = "test.toml", **kwargs: Any) -> RuleSet:
    (tmp_path / name).write_text(textwrap.dedent(text))
    return load_rules([name], tmp_path, **kwargs)


def _facts(**values: Any) -> Facts:
    ip = values.pop("client_ip", "192.0.2.10")
    return Facts(ip, ipaddress.ip_address(ip), values.pop("hostname", "mx.example.com"),
                 **values)


def _one(tmp_path: Path, match: str, stage: str = "") -> Any:
    stage_line = f'stage = "{stage}"\n' if stage else ""
    ruleset = _load(tmp_path, f'[[rule]]\nname = "r"\n{stage_line}{match}\n')
    (rule,) = ruleset.rules
    return rule


# ---------------------------------------------------------------------- loading


def test_error_names_file_rule_and_key(tmp_path: Path) -> None:
    with pytest.raises(RuleError) as info:
        _load(tmp_path, """
            [[rule]]
            name = "fine"
            match.helo = "x"

            [[rule]]
            name = "broken"
            match.hleo = "typo"
        """)
    text = str(info.value)
    assert "test.toml" in text and "'broken'" in text and "hleo" in text, text


@pytest.mark.parametrize("body, expected", [
    ('[[rule]]\nname = "r"\nmatch.helo = "(unclosed"\n', "match.helo: invalid regex"),
    ('[[rule]]\nname = "r"\nstage = "connect"\nmatch.sender = "x"\n', "not known at stage"),
    ('[[rule]]\nname = "r"\nmatch.helo = "x"\nreply = "450 4.7.1 no"\n', "needs a 5xx"),
    ('[[rule]]\nname = "r"\nmatch.helo = "x"\nreply = "550 4.7.1 mixed"\n', "same class"),
    ('[[rule]]\nname = "r"\nmatch.helo = "x"\naction = "score"\n', "non-zero score"),
    ('[[rule]]\nname = "r"\naction = "add_header"\nheader = "no colon"\n', "Name: value"),
    ('[[rule]]\nname = "r"\naction = "explode"\n', "action"),
    ('[[rule]]\nname = "r"\nmatch.client_ip = ["300.1.1.1"]\n', "not an address"),
    ('[[rule]]\nname = "r"\nmatch.country = ["DE"]\n', "needs rules.country_db"),
    ('[[rule]]\nname = "a b"\n', "name"),
    ('[[rule]]\nname = "r"\nmatch.dnsbl = { zone = "z.test", codes = ["nope"] }\n', "dnsbl"),
    ('[[rule]]\nname = "r"\nmatch.sender_domain = "missing.list"\n', "cannot read"),
])
def test_invalid_rules_refused(tmp_path: Path, body: str, expected: str) -> None:
    with pytest.raises(RuleError) as info:
        _load(tmp_path, body)
    assert expected in str(info.value), info.value
    assert "test.toml" in str(info.value)


def test_duplicate_names_across_files_refused(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text('[[rule]]\nname = "same"\nmatch.helo = "a"\n')
    (tmp_path / "b.toml").write_text('[[rule]]\nname = "same"\nmatch.helo = "b"\n')
    with pytest.raises(RuleError, match="already used"):
        load_rules(["*.toml"], tmp_path)


def test_globs_load_in_order_and_a_missing_plain_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "10-a.toml").write_text('[[rule]]\nname = "a"\nmatch.helo = "a"\n')
    (tmp_path / "20-b.toml").write_text('[[rule]]\nname = "b"\nmatch.helo = "b"\n')
    ruleset = load_rules(["*.toml"], tmp_path)
    assert [r.name for r in ruleset.rules] == ["a", "b"]
    with pytest.raises(RuleError, match="no such file"):
        load_rules(["absent.toml"], tmp_path)


def test_stage_is_inferred_and_data_rules_on_headers_run_early(tmp_path: Path) -> None:
    ruleset = _load(tmp_path, """
        [[rule]]
        name = "ip"
        match.client_ip = "192.0.2.0/24"
        [[rule]]
        name = "rcpt"
        match.recipient = "x"
        [[rule]]
        name = "subject"
        stage = "data"
        match.header.subject = "x"
        [[rule]]
        name = "body"
        match.body = "x"
    """)
    assert [(r.name, r.stage) for r in ruleset.rules] == [
        ("ip", Stage.CONNECT), ("rcpt", Stage.RCPT), ("subject", Stage.HEADERS),
        ("body", Stage.DATA)]


# ---------------------------------------------------------------------- conditions


def test_client_ip_and_file(tmp_path: Path) -> None:
    (tmp_path / "nets.txt").write_text("# comment\n198.51.100.0/24\n2001:db8::/32  # v6\n")
    rule = _one(tmp_path, 'match.client_ip = "192.0.2.7"\nmatch.any = [{ client_ip_file = '
                          '"nets.txt" }, { client_ip = "192.0.2.7" }]')
    assert rule.test(_facts(client_ip="192.0.2.7")) is True
    assert rule.test(_facts(client_ip="192.0.2.8")) is False
    rule = _one(tmp_path, 'match.client_ip_file = "nets.txt"')
    assert rule.test(_facts(client_ip="198.51.100.200")) is True
    assert rule.test(_facts(client_ip="2001:db8:1::5")) is True
    assert rule.test(_facts(client_ip="203.0.113.1")) is False


def test_rdns_and_fcrdns_are_unknown_on_dns_errors(tmp_path: Path) -> None:
    rule = _one(tmp_path, 'match.fcrdns = false')
    assert rule.test(_facts(rdns="")) is True
    assert rule.test(_facts(rdns="mx.example.org")) is False
    assert rule.test(_facts(rdns=None)) is None
    rule = _one(tmp_path, r"match.rdns = '(?i)\.dynamic\.'")
    assert rule.test(_facts(rdns="host-1.dynamic.isp.test")) is True
    assert rule.test(_facts(rdns="")) is False


@pytest.mark.parametrize("helo, fqdn, literal, mismatch", [
    ("mail.example.org", True, False, False),
    ("localhost", False, False, False),
    ("[192.0.2.10]", False, True, False),  # the client's own address
    ("[192.0.2.99]", False, True, True),  # someone else's
    ("192.0.2.99", False, True, True),
    ("[IPv6:2001:db8::1]", False, True, True),
    ("mx.example.com", True, False, True),  # claims to be us
    ("MX.EXAMPLE.COM.", True, False, True),
])
def test_helo_conditions(tmp_path: Path, helo: str, fqdn: bool, literal: bool,
                         mismatch: bool) -> None:
    facts = _facts(helo=helo)
    assert _one(tmp_path, "match.helo_fqdn = true").test(facts) is fqdn
    assert _one(tmp_path, "match.helo_is_ip_literal = true").test(facts) is literal
    assert _one(tmp_path, "match.helo_mismatch = true").test(facts) is mismatch


def test_sender_conditions(tmp_path: Path) -> None:
    (tmp_path / "bad.list").write_text("spam.example\n.bulk.example\n")
    assert _one(tmp_path, "match.null_sender = true").test(_facts(sender="")) is True
    assert _one(tmp_path, "match.null_sender = true").test(_facts(sender="a@b.c")) is False
    rule = _one(tmp_path, 'match.sender_domain = "bad.list"')
    assert rule.test(_facts(sender="x@spam.example")) is True
    assert rule.test(_facts(sender="x@mail.bulk.example")) is True
    assert rule.test(_facts(sender="x@bulk.example")) is False
    assert rule.test(_facts(sender="")) is False
    rule = _one(tmp_path, 'match.sender_domain = ["bücher.example"]')
    assert rule.test(_facts(sender="x@xn--bcher-kva.example")) is True
    rule = _one(tmp_path, r'match.sender = "^billing@"')
    assert rule.test(_facts(sender="billing@bank.example")) is True


def test_recipient_conditions(tmp_path: Path) -> None:
    rule = _one(tmp_path, 'match.recipient = "^sales@"')
    assert rule.test(_facts(recipient="sales@example.com")) is True
    assert rule.test(_facts(recipients=["a@x", "sales@example.com"])) is True  # at data
    rule = _one(tmp_path, "match.recipients_over = 2")
    assert rule.test(_facts(recipients=["a", "b"], recipient="c")) is True
    assert rule.test(_facts(recipients=["a"], recipient="b")) is False


def test_header_conditions_decode_and_absent_never_matches(tmp_path: Path) -> None:
    headers = HeaderSection.parse(
        b"Subject: =?utf-8?b?R3Jvw59lciBHZXdpbm4=?=\r\nX-Mailer: bulk 1.0\r\n")
    rule = _one(tmp_path, 'match.header.SUBJECT = "Großer Gewinn"')
    assert rule.test(_facts(headers=headers)) is True
    assert _one(tmp_path, 'match.header.x-absent = ".*"').test(_facts(headers=headers)) is False
    rule = _one(tmp_path, 'match.header_absent = ["Date", "Subject"]')
    assert rule.test(_facts(headers=headers)) is True
    rule = _one(tmp_path, 'match.header_absent = ["Subject"]')
    assert rule.test(_facts(headers=headers)) is False


def test_message_conditions(tmp_path: Path) -> None:
    rule = _one(tmp_path, 'match.body = "(?i)viagra"')
    assert rule.test(_facts(body="Buy VIAGRA now")) is True
    assert _one(tmp_path, "match.size_over = 100").test(_facts(size=101)) is True
    assert _one(tmp_path, "match.size_over = 100").test(_facts(size=100)) is False
    rule = _one(tmp_path, r"match.attachment_name = '(?i)\.(exe|scr|js)$'")
    assert rule.test(_facts(attachments=[("invoice.pdf.EXE", "application/octet-stream")]))
    assert not rule.test(_facts(attachments=[("invoice.pdf", "application/pdf")]))
    rule = _one(tmp_path, 'match.attachment_type = "^application/x-msdownload$"')
    assert rule.test(_facts(part_types=["text/plain", "application/x-msdownload"]))


def test_dnsbl_any_not_and_three_valued_logic(tmp_path: Path) -> None:
    rule = _one(tmp_path, 'match.dnsbl = "zen.test"\nmatch.not = { client_ip = "192.0.2.0/24" }')
    (zen,) = rule.dnsbl_zones
    assert rule.test(_facts(client_ip="203.0.113.5", dnsbl={zen: True})) is True
    assert rule.test(_facts(client_ip="192.0.2.5", dnsbl={zen: True})) is False
    assert rule.test(_facts(client_ip="203.0.113.5", dnsbl={zen: None})) is None
    assert rule.test(_facts(client_ip="192.0.2.5", dnsbl={zen: None})) is False
    rule = _one(tmp_path, 'match.any = [{ dnsbl = "a.test" }, { dnsbl = "b.test" }]')
    a, b = rule.dnsbl_zones
    assert rule.test(_facts(dnsbl={a: None, b: True})) is True
    assert rule.test(_facts(dnsbl={a: None, b: False})) is None
    assert rule.test(_facts(dnsbl={a: False, b: False})) is False
    assert {z.zone for z in rule.dnsbl_zones} == {"a.test", "b.test"}


def test_literal_gates_never_skip_a_rule_that_hits(tmp_path: Path) -> None:
    from relayproxy.policy.engine import _Plan

    ruleset = _load(tmp_path, r"""
        [[rule]]
        name = "subject"
        match.header.subject = '(?i)(cheap|prize)\b'
        [[rule]]
        name = "second-received"
        match.header.received = 'by (relay|gateway)\.'
        [[rule]]
        name = "nested"
        match.any = [{ header.subject = "(?i)nothing-here" }, { header_absent = "Date" }]
        [[rule]]
        name = "not"
        match.not = { header.subject = "(?i)nothing-here" }
        [[rule]]
        name = "absent-field"
        match.header.x-mailer = "(?i)bulkmail"
        [[rule]]
        name = "body"
        match.body = '(?i)(viagra|lottery)'
        [[rule]]
        name = "body-and-size"
        match.body = '(?i)lottery'
        match.size_over = 10
        [[rule]]
        name = "no-literal"
        match.body = 'a.b'
    """)
    headers = HeaderSection.parse(b"Subject: =?utf-8?q?CHEAP_stuff?=\r\n"
                                  b"Received: from a by mx.test\r\nReceived: by gateway.test\r\n")
    for body in ("", "short LOTTERY", "x" * 300 + " v\u0131agra", "nothing at all " * 30):
        for stage in (Stage.HEADERS, Stage.DATA):
            rules = ruleset.at(stage)
            facts = _facts(headers=headers, body=body, size=100)
            kept = {r.name for r in _Plan.of(rules).candidates(facts)}
            hits = {r.name for r in rules
                    if r.test(_facts(headers=headers, body=body, size=100)) is not False}
            assert hits <= kept, (body, stage)
    facts = _facts(headers=headers, body="nothing at all " * 30, size=100)
    kept = {r.name for r in _Plan.of(ruleset.at(Stage.DATA)).candidates(facts)}
    assert kept == {"no-literal"}  # the literal-gated body rules are skipped unread
    kept = {r.name for r in _Plan.of(ruleset.at(Stage.HEADERS)).candidates(facts)}
    assert kept == {"subject", "second-received", "nested", "not"}


def _gate_ruleset() -> RuleSet:
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        return _load(Path(folder), r"""
            [[rule]]
            name = "subject"
            match.header.subject = '(?i)(cheap|prize) offer'
            [[rule]]
            name = "tag"
            match.header.x-tag = 'Z(ü|u)rich'
        """)


_GATES = _gate_ruleset()


@given(value=st.sampled_from(["cheap offer", "PRIZE Offer", "Zürich", "Zurich", "nothing"]),
       before=st.text(max_size=8), after=st.text(max_size=8),
       form=st.sampled_from(["plain", "folded", "encoded", "8bit"]),
       field=st.sampled_from(["Subject", "X-Tag", "subject"]))
def test_header_gates_never_skip_a_hit(value: str, before: str, after: str, form: str,
                                       field: str) -> None:
    """The header prefilter looks through the section text (and decoded values when some
    hold encoded-words): whatever the form a value takes, a rule that hits is kept."""
    from email.header import Header

    from relayproxy.policy.engine import _Plan

    text = before + value + after
    if form == "encoded":
        raw = Header(text, "utf-8").encode().encode()
    elif form == "folded":
        raw = text.replace(" ", "\r\n ", 1).encode()
    else:
        raw = text.encode("utf-8" if form == "8bit" else "ascii", "replace")
    if b"\n" in raw.replace(b"\r\n ", b"") or b"\r" in raw.replace(b"\r\n ", b""):
        return  # a line break of the test's own making, not a field
    headers = HeaderSection.parse(field.encode() + b": " + raw + b"\r\n", b"\r\n")
    rules = _GATES.at(Stage.HEADERS)
    kept = {r.name for r in _Plan.of(rules).candidates(_facts(headers=headers))}
    hits = {r.name for r in rules if r.test(_facts(headers=headers))}
    assert hits <= kept


def _engine_message(check: Any, wire: bytes, helo: str = "mx.example.net") -> Any:
    """One message through the engine's hooks, as the pipeline calls them (no DNS: reverse
    lookups off); the end-of-data verdict (or the first refusal) and the transaction."""
    import asyncio

    from relayproxy.checks.base import Envelope, MessageInfo, SessionInfo
    from relayproxy.headers import find_end

    async def run() -> Any:
        session = SessionInfo("t", "192.0.2.10", 40000)
        envelope = Envelope("alice@example.net")
        if (verdict := await check.on_connect(session)) is not None:
            return verdict, envelope
        session.helo = helo
        if (verdict := await check.on_helo(session)) is not None:
            return verdict, envelope
        if (verdict := await check.on_mail(session, envelope)) is not None:
            return verdict, envelope
        if (verdict := await check.on_rcpt(session, envelope, "bob@example.com")) is not None:
            return verdict, envelope
        envelope.recipients.append("bob@example.com")
        found = find_end(wire)
        assert found is not None
        headers = HeaderSection.parse(wire[:found[0]], wire[found[0]:found[1]])
        if (verdict := await check.on_headers(session, envelope, headers)) is not None:
            return verdict, envelope
        observer = check.body_observer(session, envelope)
        if observer is not None:
            await observer.feed(wire[found[1]:])
        message = MessageInfo(len(wire), headers=headers)
        return await check.on_data_end(session, envelope, message), envelope

    return asyncio.run(run())


_ATTACHED = (b"Subject: x\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
             b"Content-Type: text/plain\r\n\r\nhello\r\n--b\r\nContent-Type: "
             b"application/x-msdownload\r\nContent-Disposition: attachment; filename=a.exe\r\n"
             b"\r\nMZ\r\n--b--\r\n")
_PLAIN = b"Subject: x\r\n\r\nhello, nothing attached\r\n"


@pytest.mark.parametrize("match, attached_only", [
    ('match.attachment_type = "^application/x-msdownload$"', True),
    (r"match.attachment_name = '(?i)\.exe$'", True),
    ("match.body = '(?i)hello'", False),  # no part lists made: neither condition reads them
])
def test_engine_lists_parts_for_the_rules_that_read_them(tmp_path: Path, match: str,
                                                         attached_only: bool) -> None:
    from relayproxy.policy.engine import RulesCheck, Settings

    ruleset = _load(tmp_path, f"""
        [[rule]]
        name = "r"
        {match}
        action = "score"
        score = 1
    """)
    check = RulesCheck(ruleset, Settings(), None)
    assert (check.reads_names, check.reads_types) == (
        "attachment_name" in match, "attachment_type" in match)
    verdict, envelope = _engine_message(check, _ATTACHED)
    assert verdict is None
    assert envelope.log_fields.get("rules") == "r"
    _, envelope = _engine_message(check, _PLAIN)
    assert envelope.log_fields.get("rules") == (None if attached_only else "r")


@pytest.mark.parametrize("reject, tempfail, score, code", [
    (10.0, 0.0, 9.5, None),  # below the only threshold: no _threshold call
    (10.0, 0.0, 10.0, 550),
    (0.0, 4.0, 3.0, None),  # reject_score off: tempfail_score is the least
    (0.0, 4.0, 4.0, 451),
    (5.0, 4.0, 4.5, 451),
    (5.0, 4.0, 5.0, 550),
    (0.0, 0.0, 100.0, None),  # both off
])
def test_engine_score_thresholds(tmp_path: Path, reject: float, tempfail: float, score: float,
                                 code: int | None) -> None:
    from relayproxy.policy.engine import RulesCheck, Settings

    ruleset = _load(tmp_path, f"""
        [[rule]]
        name = "s"
        match.body = 'hello'
        action = "score"
        score = {score}
    """)
    check = RulesCheck(ruleset, Settings(reject_score=reject, tempfail_score=tempfail), None)
    verdict, envelope = _engine_message(check, _PLAIN)
    assert (verdict.code if verdict is not None else None) == code
    assert envelope.log_fields["score"] == f"{score:g}"

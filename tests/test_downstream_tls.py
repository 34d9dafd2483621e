"""STARTTLS towards the downstream (downstream.tls), against real Postfix instances.

A second private Postfix offers STARTTLS with a throwaway certificate; the session Postfix does
not offer it at all. Postfix writes "with ESMTPS" into its Received header when the session
that brought the message was encrypted, which is what these tests read.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from support.postfix import PostfixInstance
from support.proxy import ProxyProcess, base_config
from support.smtpclient import send_message


@pytest.fixture(scope="module")
def tls_postfix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostfixInstance]:
    certs = tmp_path_factory.mktemp("downstream-tls")
    certs.chmod(0o755)
    key, cert = certs / "key.pem", certs / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=postfix.test",
         "-days", "1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    instance = PostfixInstance(extra_settings={
        "smtpd_tls_cert_file": str(cert),
        "smtpd_tls_key_file": str(key),
        "smtpd_tls_security_level": "may",
        "smtpd_tls_received_header": "yes",
    })
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()
        instance.remove()


def _send(proxy: ProxyProcess) -> tuple[str, dict[str, Any]]:
    subject = uuid.uuid4().hex
    body = f"Subject: {subject}\r\n\r\nover TLS?\r\n".encode()
    return subject, send_message(proxy.host, proxy.port, "s@example.org", ["alice@relay.test"],
                                 body)


def _delivered(postfix: PostfixInstance, subject: str) -> bytes:
    messages = [m for m in postfix.wait_for_deliveries(1, user="alice") if subject.encode() in m]
    assert len(messages) == 1, f"{len(messages)} deliveries of {subject}"
    return messages[0]


@pytest.mark.parametrize("mode", ["opportunistic", "required"])
def test_starttls_to_a_downstream_that_offers_it(
    tls_postfix: PostfixInstance, proxy_factory: Callable[..., ProxyProcess], mode: str
) -> None:
    tls_postfix.reset()
    proxy = proxy_factory(base_config(tls_postfix.port, downstream={"tls": mode}))
    subject, replies = _send(proxy)
    assert replies["dot"].code == 250, replies
    message = _delivered(tls_postfix, subject)
    postfix_received = message.split(b"Received:", 2)[1]
    assert b"with ESMTPS" in postfix_received, postfix_received


def test_plaintext_when_tls_is_off(
    tls_postfix: PostfixInstance, proxy_factory: Callable[..., ProxyProcess]
) -> None:
    tls_postfix.reset()
    proxy = proxy_factory(base_config(tls_postfix.port, downstream={"tls": "none"}))
    subject, replies = _send(proxy)
    assert replies["dot"].code == 250, replies
    postfix_received = _delivered(tls_postfix, subject).split(b"Received:", 2)[1]
    assert b"with ESMTP " in postfix_received and b"ESMTPS" not in postfix_received


def test_required_tls_refused_when_not_offered(
    mailboxes: PostfixInstance, proxy_factory: Callable[..., ProxyProcess]
) -> None:
    # the session Postfix does not offer STARTTLS: nothing may go to it in plaintext
    proxy = proxy_factory(base_config(mailboxes.port, downstream={"tls": "required"}))
    _, replies = _send(proxy)
    # MAIL is answered by the proxy; the downstream connection is taken at the first RCPT
    assert replies["mail"].code == 250, replies
    (rcpt,) = replies["rcpt"]
    assert (rcpt.code, rcpt.enhanced) == (451, "4.7.5"), rcpt
    assert f"downstream 127.0.0.1:{mailboxes.port}" in rcpt.text
    assert replies["data"].code != 354, replies
    # not fatal: the session ends with the client's QUIT, not a 421
    assert not replies["closed"] and replies["quit"].code == 221, replies
    mailboxes.wait_queue_empty()
    assert mailboxes.deliveries() == []


def test_opportunistic_falls_back_to_plaintext(
    mailboxes: PostfixInstance, proxy_factory: Callable[..., ProxyProcess]
) -> None:
    proxy = proxy_factory(base_config(mailboxes.port, downstream={"tls": "opportunistic"}))
    subject, replies = _send(proxy)
    assert replies["dot"].code == 250, replies
    assert _delivered(mailboxes, subject)

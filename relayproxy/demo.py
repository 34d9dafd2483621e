"""`relayproxy demo`: the proxy in front of a small built-in mailbox server, on loopback.

The demo mailbox is an aiosmtpd server that knows a few users and, like a real server, refuses
the others with 550 5.1.1 at RCPT. It keeps only a one-line summary of each delivered message.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import logging
from dataclasses import replace

from aiosmtpd.smtp import SMTP, Envelope
from aiosmtpd.smtp import Session as AioSession

from .config import Config, HostPort, MetricsConfig, ServerConfig

DEMO_DOMAIN = "example.test"
DEMO_USERS = ("alice", "bob", "carol")
DEMO_PORT = 2525
DEMO_METRICS_PORT = 9325


class DemoMailbox:
    """aiosmtpd handler: a final-destination mail server for DEMO_DOMAIN."""

    def __init__(self, users: tuple[str, ...] = DEMO_USERS, domain: str = DEMO_DOMAIN):
        self.addresses = {f"{u}@{domain}" for u in users}
        self.delivered: list[str] = []

    async def handle_RCPT(
        self, server: SMTP, session: AioSession, envelope: Envelope, address: str,
        rcpt_options: list[str],
    ) -> str:
        if address.lower() not in self.addresses:
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(
        self, server: SMTP, session: AioSession, envelope: Envelope
    ) -> str:
        content = envelope.original_content or b""
        headers = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(content)
        line = (f"demo mailbox: delivered {len(content)} bytes from <{envelope.mail_from}> to "
                f"{', '.join(envelope.rcpt_tos)}: Subject: {headers.get('Subject', '')}")
        self.delivered.append(line)
        print(line, flush=True)
        return "250 2.0.0 OK: delivered to demo mailbox"


async def start_mailbox(handler: DemoMailbox) -> tuple[asyncio.AbstractServer, int]:
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd logs every command
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="mailbox.example.test", decode_data=False,
                     enable_SMTPUTF8=True, ident="demo mailbox"),
        "127.0.0.1", 0,
    )
    port = server.sockets[0].getsockname()[1]
    return server, port


def demo_config(mailbox_port: int, port: int = DEMO_PORT,
                metrics_port: int = DEMO_METRICS_PORT) -> Config:
    base = Config()
    return replace(
        base,
        server=ServerConfig(
            listen=(HostPort("127.0.0.1", port),),
            hostname="relayproxy.example.test",
            accept_domains=(DEMO_DOMAIN,),
            reverse_dns=False,  # the demo must not send queries off this machine
        ),
        downstream=replace(base.downstream, servers=(HostPort("127.0.0.1", mailbox_port),),
                           tls="none"),
        metrics=MetricsConfig(listen=HostPort("127.0.0.1", metrics_port) if metrics_port
                              else None),
    )


def instructions(config: Config) -> str:
    listen = config.server.listen[0]
    metrics = config.metrics.listen
    server = f"{listen.host}:{listen.port}"
    return f"""\
relayproxy demo
  proxy          {server}  (in front of the demo mailbox on loopback)
  demo mailbox   knows {", ".join(f"{u}@{DEMO_DOMAIN}" for u in DEMO_USERS)}
  metrics        {f"http://{metrics.host}:{metrics.port}/metrics" if metrics else "off"}

Try (swaks is in Debian's swaks package):
  swaks --server {server} --from you@example.net --to alice@{DEMO_DOMAIN}
      -> 250: the mailbox accepted it, and only then did the proxy say 250
  swaks --server {server} --from you@example.net --to nobody@{DEMO_DOMAIN}
      -> 550 5.1.1 from the mailbox itself, at RCPT time
  swaks --server {server} --from you@example.net --to someone@elsewhere.example
      -> 550 5.7.1 relay denied by the proxy; the mailbox is never asked
  swaks --server {server} --from you@example.net --to bob@{DEMO_DOMAIN} --no-data-fixup \\
        --data $'Subject: smuggled?\\r\\n\\r\\na\\n.\\nMAIL FROM:<x@y>\\r\\n.\\r\\n'
      -> 550 5.6.0 bare LF refused (SMTP smuggling defence); nothing is delivered
Stop with Ctrl-C.
"""



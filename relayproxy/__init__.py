"""relayproxy: a pass-through filtering SMTP proxy.

Every inbound session is mirrored by a live downstream session; every decision about a message
reaches the sender as an SMTP reply during the conversation. Nothing is stored or queued.
"""

__version__ = "0.1.0"

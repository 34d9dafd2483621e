"""Sender authentication: SPF, streamed DKIM, DMARC, ARC, and the Authentication-Results field.

spf.py (pyspf fed by the async resolver), dkim.py (body hashes computed as the body streams,
dkimpy's header verification), dmarc.py (policy and alignment, the public suffix list), arc.py
(dkimpy's ARC verification on the header section, its body hashes streamed beside DKIM's),
results.py (the RFC 8601 field), check.py (the Check that runs them at MAIL, on the header
section and at the end of data).
"""

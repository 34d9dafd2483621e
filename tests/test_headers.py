"""The held header section: where it ends (as the mail server reads it), and its fields."""

from __future__ import annotations

from relayproxy.headers import HeaderSection, find_end


def test_space_before_the_colon_does_not_end_the_section() -> None:
    # Postfix reads "X-Pad : 1" as a field (RFC 822 syntax): so must the proxy, or the fields
    # after it would reach the mail server unseen by the checks
    wire = (b"Subject: hi\r\nX-Pad : 1\r\nFrom: forged@bank.example\r\n"
            b"Subject: you won\r\n\r\nbody\r\n")
    end, body = find_end(wire) or (0, 0)
    assert wire[end:body] == b"\r\n" and wire[body:] == b"body\r\n"
    section = HeaderSection.parse(wire[:end], b"\r\n")
    assert [f.lname for f in section] == ["subject", "x-pad", "from", "subject"]
    assert section.get("From") == "forged@bank.example"


def test_a_leading_continuation_line_stays_in_the_section() -> None:
    wire = b" x\r\nFrom: a@example.org\r\nSubject: s\r\n\r\nbody\r\n"
    end, _ = find_end(wire) or (0, 0)
    section = HeaderSection.parse(wire[:end])
    assert section.get("Subject") == "s" and section.get("From") == "a@example.org"


def test_a_malformed_encoded_word_reads_as_written() -> None:
    section = HeaderSection.parse(b"Subject: =?utf-8?b?AAAAA?=\r\n")
    assert section.get_all("subject")[0].decoded == "=?utf-8?b?AAAAA?="


def test_wire_form_after_remove_and_prepend() -> None:
    # a field named ".Odd" travels stuffed; parsed, it is ".Odd"; sent again, stuffed again
    section = HeaderSection.parse(b"..Odd: 1\r\nA-R: x\r\nSubject: s\r\n", b"\r\n")
    assert section.wire() == b"..Odd: 1\r\nA-R: x\r\nSubject: s\r\n\r\n"  # untouched
    assert section.fields[0].name == ".Odd"
    assert section.remove("a-r") == 1
    section.prepend("X-Top", "1")
    assert section.wire() == b"X-Top: 1\r\n..Odd: 1\r\nSubject: s\r\n\r\n"

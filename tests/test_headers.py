"""The held header section: where it ends (as the mail server reads it), and its fields."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

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


def _find_end_oracle(data: bytes, start: int = 0) -> tuple[int, int] | None:
    """find_end spelled out line by line: the specification the one-regex version meets."""
    import re
    field_start = re.compile(rb"[!-9;-~]+[ \t]*:")
    pos = start
    while pos < len(data):
        eol = data.find(b"\n", pos)
        if eol < 0:
            return None
        line = data[pos + 1 : eol + 1] if data[pos : pos + 1] == b"." else data[pos : eol + 1]
        if line == b"\r\n":
            return pos, eol + 1
        if not (field_start.match(line) or line[:1] in (b" ", b"\t")):
            return pos, pos
        pos = eol + 1
    return None


_LINES = st.sampled_from([
    b"Subject: hi\r\n", b"X-Pad : 1\r\n", b" folded\r\n", b"\tfolded\r\n", b"..Odd: 1\r\n",
    b".Dot: 1\r\n", b"\r\n", b".\r\n", b"..\r\n", b"no colon\r\n", b":empty name\r\n",
    b"Bare: lf\n", b"\n", b"Name\xff: 8bit\r\n", b"Caf\xc3\xa9: x\r\n", b"body line\r\n",
    b"Partial: no line end", b"X:\r\n", b" \r\n",
])


@given(st.lists(_LINES, max_size=12))
def test_find_end_reads_lines_as_the_oracle(lines: list[bytes]) -> None:
    data = b"".join(lines)
    assert find_end(data) == _find_end_oracle(data)
    # resumed at a later line start (the stream's chunks), it still agrees
    starts = [sum(map(len, lines[:i])) for i in range(len(lines))]
    for start in starts[1:4]:
        if _find_end_oracle(data[:start]) is None:
            assert find_end(data, start) == _find_end_oracle(data, start)


@given(st.lists(st.tuples(st.sampled_from(["Subject", "From", "X-Tag", "subject"]),
                          st.text(st.characters(blacklist_categories=("Cs", "Cc")),
                                  max_size=30),
                          st.booleans()), max_size=6))
def test_section_text_holds_every_value_as_written(
        fields: list[tuple[str, str, bool]]) -> None:
    wire = b""
    for name, value, fold in fields:
        raw = value.encode()
        if fold and b" " in raw:  # folded at a space: the unfolded value has the space
            at = raw.index(b" ")
            raw = raw[:at] + b"\r\n" + raw[at:]
        wire += name.encode() + b": " + raw + b"\r\n"
    section = HeaderSection.parse(wire, b"\r\n")
    text = section.text()
    for f in section.fields:
        assert f.value in text
    assert section.remove("subject") >= 0  # edited: the text comes from the fields left
    for f in section.fields:
        assert f.value in section.text()


def _fields_oracle(wire: bytes) -> list[tuple[str, str, bytes]]:
    """The field split spelled out: a line starting with a space or tab continues the field
    before it (a first one starts a field); a name is what its first line has before the
    colon (the whole line when it has none), white space after it dropped."""
    fields: list[tuple[str, str, bytes]] = []
    for line in wire.splitlines(keepends=True):
        if fields and line[:1] in (b" ", b"\t"):
            name, lname, raw = fields[-1]
            fields[-1] = (name, lname, raw + line)
            continue
        name = line.split(b":", 1)[0].decode("ascii", "replace").rstrip(" \t")
        fields.append((name, name.lower(), line))
    return fields


@given(st.lists(_LINES | st.sampled_from([b"\r", b"Lone: cr\rNext: 1\r\n", b"\t\r\n"]),
                max_size=12))
def test_fields_split_as_the_oracle(lines: list[bytes]) -> None:
    wire = b"".join(lines)
    for _ in range(2):  # the second parse takes the names the first one kept
        section = HeaderSection.parse(wire)
        want = _fields_oracle(wire.replace(b"\r\n.", b"\r\n").removeprefix(b"."))
        assert [(f.name, f.lname, f.raw) for f in section.fields] == want
        for name, lname, _raw in want:
            assert [f.raw for f in section.get_all(name)] == [
                raw for _n, other, raw in want if other == lname]
        assert section.original == b"".join(raw for _n, _l, raw in want)
    if want:  # a removed field leaves the original section too
        section.remove(want[0][0])
        assert section.original == b"".join(
            raw for _n, lname, raw in want if lname != want[0][1])

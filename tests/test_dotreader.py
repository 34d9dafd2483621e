"""DotReader: the DATA-phase scanner that finds <CRLF>.<CRLF> and polices line endings.

The reader sees the client's bytes in whatever pieces TCP delivers, so every property here is
checked for arbitrary splits of the same input (Hypothesis-chosen cut points, every single cut,
and one byte at a time). The expected results come from small, obviously-correct oracles that
look at the whole input at once.

Smuggling (CVE-2023-51764 class): the downstream must never be handed bytes it could read as a
different end of data, so in "reject" mode nothing with a bare CR/LF is forwarded, and in
"normalize" mode the forwarded stream has only CRLF line ends and never "<CRLF>.<CRLF>".
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.smuggling import SMUGGLED, SMUGGLING_VARIANTS

from relayproxy.dotreader import DotReader

TERMINATOR = b"\r\n.\r\n"
BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_NEWLINE = re.compile(rb"\r\n|\r|\n")
MAX_LINE = 998


# ---------------------------------------------------------------------- oracles and helpers


def stuff_lines(lines: list[bytes]) -> bytes:
    """Wire form of a clean message: CRLF line ends, a leading dot doubled (RFC 5321 4.5.2)."""
    return b"".join((b"." if line.startswith(b".") else b"") + line + b"\r\n" for line in lines)


def expected_split(wire: bytes) -> tuple[bytes, bytes] | None:
    """(content, rest) for the strict end of data, or None when there is none.

    The CRLF that ended the DATA command counts as the CRLF before the dot, hence the prefix.
    """
    end = (b"\r\n" + wire).find(TERMINATOR)
    if end < 0:
        return None
    return wire[:end], wire[end + 3 :]


def normalized(content: bytes) -> bytes:
    """Every bare CR or LF made a CRLF; a line that is then a lone "." sent as "..".

    Content always ends with a line end (the CRLF before the final dot), so the last split
    part is empty.
    """
    parts = _NEWLINE.split(content)
    assert parts[-1] == b"", content
    return b"".join((b".." if line == b"." else line) + b"\r\n" for line in parts[:-1])


def chunks_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


def byte_chunks(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def single_cuts(data: bytes) -> list[list[bytes]]:
    """The whole input, and the input cut once at each position."""
    return [[data]] + [[data[:i], data[i:]] for i in range(1, len(data))]


@dataclass
class Fed:
    forwards: list[bytes]
    rest: bytes
    reader: DotReader
    failed_at: int | None  # index of the first chunk after which reader.failed was True

    @property
    def out(self) -> bytes:
        return b"".join(self.forwards)


def feed(chunks: list[bytes], *, mode: str = "reject", max_line: int = MAX_LINE) -> Fed:
    """Feed chunks as the session does: stop at done; what follows the dot is the rest."""
    reader = DotReader(max_line, mode)  # type: ignore[arg-type]
    forwards: list[bytes] = []
    failed_at: int | None = None
    for i, chunk in enumerate(chunks):
        forward, rest = reader.feed(chunk)
        forwards.append(forward)
        if reader.failed and failed_at is None:
            failed_at = i
        if reader.done:
            return Fed(forwards, rest + b"".join(chunks[i + 1 :]), reader, failed_at)
        assert rest == b"", "rest must be empty until the end of data is found"
    return Fed(forwards, b"", reader, failed_at)


def assert_no_bare_newline(out: bytes) -> None:
    match = BARE.search(out)
    assert match is None, f"bare CR/LF at offset {match.start()} forwarded: {out!r}"


def assert_no_early_end(out: bytes) -> None:
    # The downstream saw "DATA\r\n" (or our Received header) first, so a leading ".\r\n"
    # would end its DATA as well.
    assert TERMINATOR not in b"\r\n" + out, f"forwarded bytes contain an end of data: {out!r}"


# ---------------------------------------------------------------------- strategies

# Dots, CR/LF-free bytes including NUL and 8-bit, so lines often start with "." or are ".".
line_st = st.lists(st.sampled_from([b".", b"a", b" ", b"\x00", b"\xff", b"\t"]), max_size=12).map(
    b"".join
)
lines_st = st.lists(line_st, max_size=12)
# Pipelined bytes after the dot: anything, including more terminators.
rest_st = st.binary(max_size=20) | st.sampled_from([b"QUIT\r\n", b"MAIL FROM:<a@b>\r\n", b""])
# Hostile DATA: CR, LF and dots are very likely, so every smuggling shape turns up.
noisy_st = st.lists(
    st.sampled_from([b"\r", b"\n", b".", b"\r\n", b"a", b"\x00", TERMINATOR]), max_size=30
).map(b"".join)
cuts_st = st.lists(st.integers(min_value=0, max_value=400), max_size=8)
split_mode_st = st.sampled_from(["cuts", "bytes"])
mode_st = st.sampled_from(["reject", "normalize"])

PROPERTY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def split(data: bytes, how: str, cuts: list[int]) -> list[bytes]:
    return byte_chunks(data) if how == "bytes" else chunks_at(data, cuts)


# ---------------------------------------------------------------------- clean messages


@PROPERTY
@given(lines=lines_st, rest=rest_st, how=split_mode_st, cuts=cuts_st, mode=mode_st)
def test_clean_message_forwarded_unchanged_in_any_split(
    lines: list[bytes], rest: bytes, how: str, cuts: list[int], mode: str
) -> None:
    stuffed = stuff_lines(lines)
    wire = stuffed + b".\r\n" + rest
    fed = feed(split(wire, how, cuts), mode=mode)
    assert fed.reader.done
    assert fed.out == stuffed  # forwarded exactly as sent, still dot-stuffed
    assert fed.rest == rest
    assert fed.reader.size == len(stuffed)  # content octets as sent, without ".\r\n"
    assert not fed.reader.bare_newline
    assert not fed.reader.line_too_long
    assert not fed.reader.failed


@PROPERTY
@given(lines=lines_st, how=split_mode_st, cuts=cuts_st)
def test_no_terminator_means_not_done(lines: list[bytes], how: str, cuts: list[int]) -> None:
    stuffed = stuff_lines(lines)
    fed = feed(split(stuffed, how, cuts))
    assert not fed.reader.done
    assert fed.rest == b""
    # Only a tail that could still become part of the terminator may be held back.
    assert stuffed.startswith(fed.out)
    assert len(stuffed) - len(fed.out) <= 2
    assert fed.reader.size == len(fed.out)


@pytest.mark.parametrize(
    ("wire", "content", "rest"),
    [
        (b".\r\n", b"", b""),  # empty message: the DATA command's CRLF precedes the dot
        (b".\r\nQUIT\r\n", b"", b"QUIT\r\n"),
        (b"\r\n.\r\n", b"\r\n", b""),
        (b"..\r\n.\r\n", b"..\r\n", b""),  # a stuffed "." line is content
        (b"a\r\n..\r\n.\r\n", b"a\r\n..\r\n", b""),
        (b"a\r\n.\r\n.\r\n", b"a\r\n", b".\r\n"),  # the first terminator wins
        (b"a.\r\n.\r\nNOOP\r\nRSET\r\n", b"a.\r\n", b"NOOP\r\nRSET\r\n"),
    ],
)
def test_terminator_position_in_every_single_cut_and_bytewise(
    wire: bytes, content: bytes, rest: bytes
) -> None:
    for chunks in [*single_cuts(wire), byte_chunks(wire)]:
        fed = feed(chunks)
        assert (fed.reader.done, fed.out, fed.rest) == (True, content, rest), chunks
        assert fed.reader.size == len(content)


def test_dot_not_alone_on_its_line_is_not_the_end() -> None:
    for wire in (b"a\r\n.x\r\n", b"a\r\n. \r\n", b"a\r\nx.\r\n", b".a\r\n"):
        for chunks in [*single_cuts(wire), byte_chunks(wire)]:
            fed = feed(chunks)
            assert not fed.reader.done, chunks


# ---------------------------------------------------------------------- bare CR / LF


@PROPERTY
@given(data=noisy_st, how=split_mode_st, cuts=cuts_st)
def test_reject_mode_never_forwards_a_bare_newline(data: bytes, how: str, cuts: list[int]) -> None:
    wire = data + TERMINATOR  # always a real end of data somewhere
    content, rest = expected_split(wire) or (b"", b"")
    fed = feed(split(wire, how, cuts), mode="reject")
    assert fed.reader.done
    assert fed.rest == rest
    assert fed.reader.size == len(content)
    bare = BARE.search(content) is not None
    assert fed.reader.bare_newline == bare
    assert fed.reader.failed == bare
    out = fed.out
    assert_no_bare_newline(out)
    # What was forwarded is an unchanged prefix: clean chunks before the first bad one.
    assert content.startswith(out)
    if bare:
        assert fed.failed_at is not None
        assert all(f == b"" for f in fed.forwards[fed.failed_at :]), fed.forwards
    else:
        assert out == content


@PROPERTY
@given(data=noisy_st, how=split_mode_st, cuts=cuts_st)
def test_normalize_mode_output_is_safe_in_any_split(data: bytes, how: str, cuts: list[int]) -> None:
    wire = data + TERMINATOR
    content, rest = expected_split(wire) or (b"", b"")
    fed = feed(split(wire, how, cuts), mode="normalize")
    assert fed.reader.done
    assert fed.rest == rest
    assert fed.reader.size == len(content)
    assert fed.reader.bare_newline == (BARE.search(content) is not None)
    assert not fed.reader.failed
    out = fed.out
    assert_no_bare_newline(out)
    assert_no_early_end(out)
    # The split must not change the result: same bytes as normalising the whole content.
    assert out == normalized(content)


@pytest.mark.parametrize("mode", ["reject", "normalize"])
def test_normalize_dot_line_after_bare_lf_split_before_its_crlf(mode: str) -> None:
    """The shape Hypothesis finds first, pinned: "a<LF>." | "<CRLF>b<CRLF>.<CRLF>".

    Read whole, the "." line is stuffed; read in two pieces the second piece is clean on its
    own, so it must still be recognised as a line that started after a (bare) line end.
    """
    wire = b"a\n.\r\nb\r\n.\r\n"
    for chunks in [*single_cuts(wire), byte_chunks(wire)]:
        fed = feed(chunks, mode=mode)
        assert fed.reader.done and fed.reader.bare_newline, chunks
        assert_no_bare_newline(fed.out)
        assert_no_early_end(fed.out)
        if mode == "normalize":
            assert fed.out == b"a\r\n..\r\nb\r\n", chunks


@pytest.mark.parametrize("name", list(SMUGGLING_VARIANTS))
@pytest.mark.parametrize("mode", ["reject", "normalize"])
def test_smuggling_variants_every_split(name: str, mode: str) -> None:
    variant = SMUGGLING_VARIANTS[name]
    outer = b"Subject: outer\r\n\r\nouter body"
    wire = outer + variant + SMUGGLED + TERMINATOR + b"QUIT\r\n"
    content = outer + variant + SMUGGLED + b"\r\n"
    for chunks in [*single_cuts(wire), byte_chunks(wire)]:
        fed = feed(chunks, mode=mode)
        # One message only: the end of data is the final <CRLF>.<CRLF>, never the variant.
        assert fed.reader.done, chunks
        assert fed.rest == b"QUIT\r\n", chunks
        assert fed.reader.size == len(content)
        assert fed.reader.bare_newline, chunks
        assert_no_bare_newline(fed.out)
        assert_no_early_end(fed.out)
        if mode == "reject":
            assert fed.reader.failed
            assert b"MAIL FROM:<evil" not in fed.out
        else:
            assert not fed.reader.failed
            assert fed.out == normalized(content), chunks
            # The smuggled commands survive only as text inside the one message.
            assert SMUGGLED.replace(b"\r\n", b"") in fed.out.replace(b"\r\n", b"")


@pytest.mark.parametrize(
    "wire",
    [b".\n" + SMUGGLED + TERMINATOR, b".\r" + SMUGGLED + TERMINATOR, b"\n.\r\n" + TERMINATOR],
    ids=["dot-LF-at-start", "dot-CR-at-start", "LF-dot-CRLF-at-start"],
)
@pytest.mark.parametrize("mode", ["reject", "normalize"])
def test_bare_dot_line_at_start_of_data(wire: bytes, mode: str) -> None:
    content, _ = expected_split(wire) or (b"", b"")
    for chunks in [*single_cuts(wire), byte_chunks(wire)]:
        fed = feed(chunks, mode=mode)
        assert fed.reader.done and fed.reader.bare_newline, chunks
        assert fed.reader.size == len(content)
        assert_no_bare_newline(fed.out)
        assert_no_early_end(fed.out)
        if mode == "reject":
            assert fed.out == b""
        else:
            assert fed.out == normalized(content), chunks


@pytest.mark.parametrize(
    "wire",
    [
        b"a\r\n.\x00\r\n" + TERMINATOR,  # NUL after the dot: not a lone "." line
        b"a\r\n\x00.\r\n" + TERMINATOR,
        b"a\r\n.\x00\n" + TERMINATOR,  # ...and with a bare LF
        b"a\r\n\x00\r\n.\r\n",
    ],
)
def test_nul_next_to_a_dot_is_not_an_end_of_data(wire: bytes) -> None:
    content, rest = expected_split(wire) or (b"", b"")
    for chunks in [*single_cuts(wire), byte_chunks(wire)]:
        fed = feed(chunks, mode="normalize")
        assert fed.reader.done and fed.rest == rest, chunks
        assert fed.reader.size == len(content)
        assert fed.out == normalized(content)
        assert_no_early_end(fed.out)


@pytest.mark.parametrize("bad", [b"\r", b"\n"], ids=["CR", "LF"])
@pytest.mark.parametrize("where", ["start", "middle", "end-of-line", "before-terminator"])
def test_single_bare_newline_anywhere_is_flagged(bad: bytes, where: str) -> None:
    body = {
        "start": bad + b"abc\r\ndef\r\n",
        "middle": b"ab" + bad + b"c\r\ndef\r\n",
        "end-of-line": b"abc" + bad + b"def\r\n",
        "before-terminator": b"abc\r\ndef" + bad + b"\r\n",
    }[where]
    wire = body + b".\r\n"
    for chunks in [*single_cuts(wire), byte_chunks(wire)]:
        rejected = feed(chunks, mode="reject")
        assert rejected.reader.done and rejected.reader.bare_newline and rejected.reader.failed
        assert_no_bare_newline(rejected.out)
        normal = feed(chunks, mode="normalize")
        assert normal.reader.bare_newline and not normal.reader.failed
        assert normal.out == normalized(body)


def test_reject_mode_forwards_nothing_after_the_first_bad_chunk() -> None:
    chunks = [b"clean line\r\n", b"bare\nline\r\n", b"clean again\r\n", b"more\r\n.\r\n"]
    fed = feed(chunks, mode="reject")
    assert fed.forwards == [b"clean line\r\n", b"", b"", b""]
    assert fed.reader.done and fed.reader.failed and fed.failed_at == 1


# ---------------------------------------------------------------------- line length


@PROPERTY
@given(
    max_line=st.integers(min_value=1, max_value=20),
    lengths=st.lists(st.integers(min_value=0, max_value=24), max_size=8),
    how=split_mode_st,
    cuts=cuts_st,
)
def test_line_too_long_in_any_split(
    max_line: int, lengths: list[int], how: str, cuts: list[int]
) -> None:
    # Lines without a leading dot: how a stuffed dot counts is pinned separately below.
    lines = [bytes([0x61 + i % 26]) * n for i, n in enumerate(lengths)]
    stuffed = stuff_lines(lines)
    wire = stuffed + b".\r\nNOOP\r\n"
    fed = feed(split(wire, how, cuts), max_line=max_line)
    too_long = any(n > max_line for n in lengths)
    assert fed.reader.done and fed.rest == b"NOOP\r\n"
    assert fed.reader.line_too_long == too_long
    assert fed.reader.failed == too_long
    assert fed.reader.size == len(stuffed)
    assert stuffed.startswith(fed.out)
    if not too_long:
        assert fed.out == stuffed


@pytest.mark.parametrize("max_line", [5, MAX_LINE])
@pytest.mark.parametrize("position", ["first", "middle", "last"])
def test_line_limit_boundary(max_line: int, position: str) -> None:
    def wire_with(long_line: bytes) -> bytes:
        lines = {"first": [long_line, b"x", b"y"], "middle": [b"x", long_line, b"y"],
                 "last": [b"x", b"y", long_line]}[position]
        return stuff_lines(lines) + b".\r\n"

    at_limit = wire_with(b"z" * max_line)
    over = wire_with(b"z" * (max_line + 1))
    # Every cut for the short limit; for 998 every cut costs too much, so cuts around the
    # long line's end (where the length is carried across reads) plus byte-at-a-time.
    def splits(wire: bytes) -> list[list[bytes]]:
        if max_line < 100:
            return [*single_cuts(wire), byte_chunks(wire)]
        edge = wire.find(b"z" * max_line) + max_line
        return [[wire], byte_chunks(wire)] + [
            [wire[:i], wire[i:]] for i in range(edge - 3, edge + 4)
        ]

    for chunks in splits(at_limit):
        fed = feed(chunks, max_line=max_line)
        assert fed.reader.done and not fed.reader.line_too_long, [len(c) for c in chunks]
        assert fed.out == at_limit[:-3]
    for chunks in splits(over):
        fed = feed(chunks, max_line=max_line)
        assert fed.reader.done and fed.reader.line_too_long, [len(c) for c in chunks]
        assert fed.reader.failed


def test_line_length_counts_across_many_reads() -> None:
    # A 999-octet line delivered 10 octets at a time, with CRLF-ended lines around it.
    wire = b"short\r\n" + b"q" * (MAX_LINE + 1) + b"\r\nend\r\n.\r\n"
    fed = feed([wire[i : i + 10] for i in range(0, len(wire), 10)])
    assert fed.reader.done and fed.reader.line_too_long


def test_line_length_excludes_the_stuffed_dot() -> None:
    """RFC 5321 4.5.3.1.6: 1000 octets including CRLF, "not counting the leading dot
    duplicated for transparency". A 998-octet text line starting with "." is 999 octets on
    the wire and is still a legal line."""
    line = b"." + b"d" * (MAX_LINE - 1)
    wire = stuff_lines([b"x", line]) + b".\r\n"
    fed = feed([wire])
    assert fed.reader.done
    assert not fed.reader.line_too_long
    assert fed.out == wire[:-3]


def test_normalized_lines_count_without_their_new_crlf() -> None:
    # Normalising bare LF to CRLF adds an octet per line end, not to the line itself.
    body = b"z" * 10 + b"\n" + b"y" * 10 + b"\r\n"
    fed = feed([body + b".\r\n"], mode="normalize", max_line=10)
    assert fed.reader.done and fed.reader.bare_newline
    assert not fed.reader.line_too_long
    assert fed.out == b"z" * 10 + b"\r\n" + b"y" * 10 + b"\r\n"


@PROPERTY
@given(
    max_line=st.integers(min_value=1, max_value=20),
    lines=st.lists(st.tuples(st.booleans(), st.integers(min_value=0, max_value=24)),
                   max_size=10),
    how=split_mode_st,
    cuts=cuts_st,
)
def test_line_too_long_with_stuffed_dots_in_any_split(
    max_line: int, lines: list[tuple[bool, int]], how: str, cuts: list[int]
) -> None:
    # Message lines that begin with "." travel with a second one, which the limit does not
    # count (RFC 5321 4.5.3.1.6): the C-level search must agree with that in every split.
    message = [(b"." if dot else b"") + b"q" * n for dot, n in lines]
    wire = stuff_lines(message) + b".\r\n"
    fed = feed(split(wire, how, cuts), max_line=max_line)
    assert fed.reader.done
    assert fed.reader.line_too_long == any(len(line) > max_line for line in message)


@PROPERTY
@given(
    lines=st.lists(st.binary(max_size=12).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
                   max_size=12),
    how=split_mode_st,
    cuts=cuts_st,
)
def test_unstuffer_gives_the_message_back_in_any_split(
    lines: list[bytes], how: str, cuts: list[int]
) -> None:
    # what observers get: the forwarded wire form, chunk by chunk, unstuffed again
    from relayproxy.dotreader import Unstuffer

    wire = stuff_lines(lines) + b".\r\n"
    reader = DotReader(MAX_LINE, "reject")
    unstuff = Unstuffer()
    message = b""
    for chunk in split(wire, how, cuts):
        forward, _ = reader.feed(chunk)
        message += unstuff(forward)
    assert reader.done
    assert message == b"".join(line + b"\r\n" for line in lines)


def test_a_bare_newline_after_an_overlong_line_is_still_seen() -> None:
    # the reply names the smuggling attempt (550 5.6.0), not the long line (500 5.5.2),
    # whether or not both came in the same chunk
    for chunks in ([b"x" * 50 + b"\r\n", b"a\rb\r\n"], [b"x" * 50 + b"\r\na\rb\r\n"]):
        reader = DotReader(40, "reject")
        for chunk in chunks:
            reader.feed(chunk)
        assert reader.failed and reader.bare_newline, chunks

"""The rule regex prefilter changes the cost of a search, never its result."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayproxy.policy.regex import Regex, required_literals


@pytest.mark.parametrize("pattern, literals", [
    (r"(?i)(cheap|winner|lottery)-0-[a-z]+", ("cheap", "winner", "lottery")),
    (r"^billing@", ("billing@",)),
    (r"(?i)claim your prize", ("claim your prize",)),
    (r"a.*b", None),
    (r"(foo|b)ar", None),  # one branch needs no literal of 3
    (r"x(abc)?yzw", ("yzw",)),  # an optional group is not required
    (r"(?i)grüße", None),  # only ASCII literals are used
])
def test_required_literals(pattern: str, literals: tuple[str, ...] | None) -> None:
    assert required_literals(pattern) == literals


def test_case_folding_never_hides_a_match() -> None:
    padding = "x" * 300  # long enough for the prefilter to be used
    assert Regex(r"(?i)spam").search(padding + "\u017fPAM")  # long s: re matches it
    assert Regex(r"(?i)kilo").search(padding + "\u212aILO")  # Kelvin sign
    assert not Regex(r"spam").search(padding + "SPAM")  # case-sensitive stays so


WORDS = ["spam", "offer", "prize", "cheap", "lottery", "abc"]


@settings(max_examples=300)
@given(
    alternatives=st.lists(st.sampled_from(WORDS), min_size=1, max_size=3),
    suffix=st.sampled_from(["", "-[0-9]+", r"\b", "s?", "[a-z]*x"]),
    flags=st.sampled_from(["", "(?i)"]),
    text=st.lists(st.sampled_from([*WORDS, "SPAM", "Offer", " ", "-12", "x", "\u017f",
                                   "z" * 120]), max_size=12).map("".join),
)
def test_prefiltered_search_equals_re(alternatives: list[str], suffix: str, flags: str,
                                      text: str) -> None:
    pattern = f"{flags}({'|'.join(alternatives)}){suffix}"
    padded = "y" * 300 + text  # past the short-text shortcut
    assert Regex(pattern).search(padded) == (re.search(pattern, padded) is not None), pattern


def test_dotless_and_dotted_i_never_hide_a_match() -> None:
    padding = "x" * 300
    for text in (" v\u0131agra", " V\u0130AGRA"):  # re's (?i)i matches both
        assert re.search("(?i)viagra", padding + text)
        assert Regex("(?i)viagra").search(padding + text), text


_LITERALS = ("cheap", "winner", "\u0131i", "stra\u00dfe", "x\u0130y", "ab")


_ALPHABET = "abcheapwinner\u0131\u0130iSTRASSE\u00dfxy \n"


@given(st.lists(st.text(alphabet=_ALPHABET, max_size=12), max_size=8))
def test_literals_found_as_the_text_streams_equal_the_whole_text(pieces: list[str]) -> None:
    """The body prefilter's streamed search (engine._Literals) finds a literal exactly when
    the folded whole holds it, however the text was cut (a literal across two pieces too)."""
    from relayproxy.policy.engine import _Literals
    from relayproxy.policy.regex import fold

    literals = tuple(fold(lit) for lit in _LITERALS)
    finder = _Literals(literals, max(map(len, literals)) - 1)
    for piece in pieces:
        finder.feed(piece)
    whole = fold("".join(pieces))
    assert finder.seen() == {fold(lit): fold(lit) in whole for lit in _LITERALS}


def test_streamed_literals_cover_a_multipart_text() -> None:
    """Fed by the MIME scanner (parts joined by a line break, as its text is), every literal
    of the text is found; one spanning a dropped preamble is found too (never fewer)."""
    from relayproxy.policy.engine import _Literals
    from relayproxy.policy.mime import MimeScanner
    from relayproxy.policy.regex import fold

    body = (b"preamble cheap\r\n--b\r\nContent-Type: text/plain\r\n\r\nwin\r\n--b\r\n"
            b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            b"bmVyIGxvdHRlcnk=\r\n--b--\r\n")
    finder = _Literals(("cheap", "winner", "lottery", "win"), 6)
    scanner = MimeScanner("multipart/mixed; boundary=b", None, 1 << 20, finder.feed)
    for i in range(0, len(body), 7):
        scanner.feed(body[i:i + 7])
    scanner.close()
    seen = finder.seen()
    text = fold(scanner.text)
    assert all(seen[lit] for lit in seen if lit in text), (scanner.text, seen)
    assert seen["lottery"] and seen["win"]


def test_literal_rare_character_settles_ascii_pieces() -> None:
    """An ASCII piece without a literal's rare character (in either case) is not folded; a
    literal is still found in one with it, in any case, and across two pieces of which
    only one holds that character."""
    from relayproxy.policy.engine import _Literals
    from relayproxy.policy.regex import rare_char

    assert rare_char("cheap") == "p" and rare_char("lottery") == "y"
    assert rare_char("win 4") == "4" and rare_char("a b") == "b"
    finder = _Literals(("cheap", "lottery"), 6)
    finder.feed("X" * 100)  # neither p nor y: settled without folding
    assert finder.seen() == {"cheap": False, "lottery": False}
    finder.feed("xx CHE")  # no P: the start of "cheap" kept for the next piece
    finder.feed("aP and a LotTerY")
    assert finder.seen() == {"cheap": True, "lottery": True}
    finder = _Literals(("cheap",), 4)
    finder.feed("ch\u00e9ap cHeAp")  # not ASCII: folded whole
    assert finder.seen() == {"cheap": True}

"""Rule regexes with a literal prefilter: most rules name words, and a word search is cheap.

Python's re tries a pattern at every position of the text; a case-insensitive alternation
costs about 20 ns an octet, so fifty body rules over a message would cost more than the whole
proxy does. Most patterns cannot match without one of a few literal strings ("cheap", "winner"
or "lottery" in `(?i)(cheap|winner|lottery)-[0-9]+`). Those are found once, when the rules
load, from the pattern's parse tree; a text that contains none of them (both case-folded, which
never hides a match, even the long s that (?i)s matches) is not searched at all. A pattern
without such literals is searched as it is. Like rspamd's and SpamAssassin's prefilters, this
changes the cost, never the result.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

try:  # the parser of the re module (sre_parse before 3.11); without it, no prefilter
    from re import _constants as _c  # type: ignore[attr-defined]
    from re import _parser  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover
    _parser = None

MIN_LITERAL = 3  # shorter literals are in every text: they would filter nothing
# (?i)i also matches the dotless i, and the dotted capital I, which case-folds to i + U+0307:
# fold both onto "i" so no match hides from the prefilter (it can only gain hits)
_FOLD_FIX = {0x131: "i", 0x307: None}


def fold(text: str) -> str:
    """The text as the prefilter compares it: case-folded, dotted and dotless i as "i"."""
    if text.isascii():
        return text.lower()  # the same for ASCII, and several times faster than the below
    return text.casefold().translate(_FOLD_FIX)


# Letters by how often English text uses them, the most frequent first (for rare_char)
_BY_FREQUENCY = "etaoinsrhldcumfpgwybvkxjqz"


def rare_char(literal: str) -> str:
    """The character of a folded ASCII literal that texts lack most often: its rarest letter
    by English frequency, a digit or punctuation mark before all but the rarest letters,
    white space last. ASCII text folds one character into one (fold is lower()), so an ASCII
    text without this character in either case holds no case variant of the literal, and
    saying so takes two memchr calls instead of a folded copy of the text (the rare-byte
    prefilter of the memchr crate, which Rust's regex uses)."""
    return max(literal, key=lambda c: _BY_FREQUENCY.find(c) if c.isalpha() else
               -1 if c.isspace() else 20)


class Regex:
    __slots__ = ("literals", "pattern", "rx")

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.rx = re.compile(pattern)  # re.error for the caller to report
        self.literals = required_literals(pattern)

    def search(self, text: str, folded: str | Callable[[], str] | None = None,
               seen: dict[str, bool] | None = None) -> bool:
        """Does the pattern match somewhere in text? folded: fold(text), or what gives it,
        asked only for a literal that seen does not settle; seen: which literals the text
        holds, shared by the rules that read one text (fifty body rules often name the same
        few words)."""
        literals = self.literals
        if literals is not None and len(text) > 256:  # short texts: searching is cheaper
            low = folded if isinstance(folded, str) else None
            if seen is None:
                seen = {}
            for literal in literals:
                found = seen.get(literal)
                if found is None:
                    if low is None:
                        low = folded() if callable(folded) else fold(text)
                    found = seen[literal] = literal in low
                if found:
                    break
            else:
                return False
        return self.rx.search(text) is not None


def required_literals(pattern: str) -> tuple[str, ...] | None:
    """Case-folded ASCII strings one of which every match contains; None when none is known."""
    if _parser is None:
        return None
    try:
        tree = _parser.parse(pattern)
    except Exception:  # the real compile reports errors; the prefilter just stays off
        return None
    return _best(_candidates(list(tree)))


def _candidates(seq: Sequence[tuple[Any, Any]]) -> list[tuple[str, ...]]:
    """Sets of strings found in a sequence; a match contains one string of each set."""
    out: list[tuple[str, ...]] = []
    run: list[str] = []
    for op, av in seq:
        if op is _c.LITERAL:
            run.append(chr(av))
            continue
        if run:
            out.append(("".join(run),))
            run = []
        if op is _c.SUBPATTERN:
            inner = list(av[3])
            alternatives = _alternatives(inner)
            out += [alternatives] if alternatives else _candidates(inner)
        elif op in (_c.MAX_REPEAT, _c.MIN_REPEAT) and av[0] >= 1:
            out += _candidates(list(av[2]))
        elif op is _c.BRANCH:
            alternatives = _alternatives([(op, av)])
            if alternatives:
                out.append(alternatives)
        # anything else (classes, anchors, lookarounds, backreferences) ends a literal run
    if run:
        out.append(("".join(run),))
    return out


def _alternatives(seq: Sequence[tuple[Any, Any]]) -> tuple[str, ...] | None:
    """For an alternation alone: one required string from each branch, or None."""
    if len(seq) != 1 or seq[0][0] is not _c.BRANCH:
        return None
    found: list[str] = []
    for branch in seq[0][1][1]:
        best = _best(_candidates(list(branch)))
        if best is None:
            return None  # a branch that needs no literal: the alternation needs none
        found += best
    return tuple(found)


def _best(candidates: list[tuple[str, ...]]) -> tuple[str, ...] | None:
    usable = [tuple(s.casefold() for s in c) for c in candidates
              if c and all(s.isascii() and len(s) >= MIN_LITERAL for s in c)]
    if not usable:
        return None
    return max(usable, key=lambda c: (min(map(len, c)), -len(c)))

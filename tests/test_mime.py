"""relayproxy.policy.mime: MIME parts and decoded text learned from a streamed body.

Hand-written bodies for each encoding, structure and malformation, each one also fed byte by
byte and in odd pieces (split points must not matter); the memory and time bounds; and
Hypothesis properties: messages built with email.message.EmailMessage give, in any split, the
text and parts Python's own parser finds, and arbitrary bytes never make the scanner raise.
"""

from __future__ import annotations

import base64
import email
import email.policy
import time
from email.message import EmailMessage

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relayproxy.headers import HeaderSection
from relayproxy.policy import mime
from relayproxy.policy.mime import MimeScanner, Part

BIG = 1 << 20


def feed(body: bytes, content_type: str | None, cte: str | None, budget: int,
         cuts: list[int]) -> MimeScanner:
    scanner = MimeScanner(content_type, cte, budget)
    last = 0
    for cut in [*sorted(set(cuts)), len(body)]:
        scanner.feed(body[last:cut])
        last = max(last, cut)
    scanner.close()
    return scanner


def outcome(scanner: MimeScanner) -> tuple[str, list[Part], bool]:
    return scanner.text, scanner.parts, scanner.parts_truncated


def scan(body: bytes, content_type: str | None = None, cte: str | None = None,
         budget: int = BIG) -> MimeScanner:
    """Scan body whole, and check that byte by byte and in 7-octet pieces give the same."""
    whole = feed(body, content_type, cte, budget, [])
    for step in (1, 7):
        split = feed(body, content_type, cte, budget, list(range(0, len(body), step)))
        assert outcome(split) == outcome(whole), f"pieces of {step}"
    return whole


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode()


PDF = base64.encodebytes(b"%PDF-1.4 " + bytes(range(256)) * 4).replace(b"\n", b"\r\n")

MIXED = crlf("""\
This is a multi-part message in MIME format.
--outer
Content-Type: text/plain; charset="utf-8"
Content-Transfer-Encoding: quoted-printable

Caf=C3=A9 ol=
=C3=A9
--outer
Content-Type: application/pdf; name="invoice.pdf"
Content-Disposition: attachment; filename="invoice.pdf"
Content-Transfer-Encoding: base64

""") + PDF + crlf("""\
--outer
Content-Type: application/octet-stream
Content-Disposition: attachment;
\tfilename="setup.exe"
Content-Transfer-Encoding: base64

TVqQAAMAAAAEAAAA//8AALgAAAAAAAAAQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA
--outer--
epilogue, ignored
""")


# ---------------------------------------------------------------------- single parts


def test_plain_quoted_printable() -> None:
    body = crlf("Price: 10=E2=82=AC =3D cheap=\nest\nsecond line=20\n")
    s = scan(body, "text/plain; charset=UTF-8", "quoted-printable")
    assert s.text == "Price: 10€ = cheapest\r\nsecond line \r\n"
    assert s.parts == [Part("text/plain", "", "")]
    assert s.attachments == []


@pytest.mark.parametrize(("charset", "encoding"), [("utf-8", "utf-8"), ("ISO-8859-1", "latin-1"),
                                                   ("windows-1252", "cp1252")])
def test_base64_text_in_its_charset(charset: str, encoding: str) -> None:
    text = "Crème brûlée à volonté\r\n" * 20
    body = base64.encodebytes(text.encode(encoding)).replace(b"\n", b"\r\n")
    s = scan(body, f'text/plain; charset="{charset}"', "Base64")
    assert s.text == text


def test_html_kept_as_is() -> None:
    body = crlf('<html><body><p style="x">Buy <b>now</b></p></body></html>\n')
    s = scan(body, "text/html; charset=us-ascii", "7bit")
    assert s.text == body.decode()
    assert s.parts == [Part("text/html", "", "")]


def test_defaults_when_headers_are_absent() -> None:
    # RFC 2045 5.2: text/plain; charset=us-ascii; 8-bit octets are read as UTF-8 here
    s = scan("naïve\r\n".encode())
    assert s.text == "naïve\r\n"
    assert s.parts == [Part("text/plain", "", "")]


def test_unknown_or_unfit_charsets_fall_back_to_utf8() -> None:
    for charset in ("x-no-such-charset", "zlib", "base64", "punycode", "idna", "undefined"):
        s = scan("é €\r\n".encode(), f"text/plain; charset={charset}")
        assert s.text == "é €\r\n", charset


@pytest.mark.parametrize("body", [b"\x00h\x00\xe9", b"\xfe\xff\x00h\x00\xe9",
                                  b"\xff\xfeh\x00\xe9\x00"])
def test_utf16_with_or_without_byte_order_mark(body: bytes) -> None:
    # RFC 2781 4.3: without a byte order mark UTF-16 is big-endian
    assert scan(body, "text/plain; charset=UTF-16").text == "hé"


def test_non_text_single_part_is_recorded_not_decoded() -> None:
    s = scan(PDF, 'application/pdf; name="a.pdf"', "base64")
    assert s.text == ""
    assert s.parts == s.attachments == [Part("application/pdf", "a.pdf", "")]


# ---------------------------------------------------------------------- multipart


def test_multipart_mixed_with_attachments() -> None:
    s = scan(MIXED, 'multipart/mixed; boundary="outer"')
    assert s.text == "Café olé"
    assert s.parts == [
        Part("text/plain", "", ""),
        Part("application/pdf", "invoice.pdf", "attachment"),
        Part("application/octet-stream", "setup.exe", "attachment"),
    ]
    assert [p.filename for p in s.attachments] == ["invoice.pdf", "setup.exe"]


def test_rfc2231_encoded_and_continued_filename() -> None:
    body = crlf("""\
--b
Content-Type: application/octet-stream; name="fallback.bin"
Content-Disposition: attachment;
 filename*0*=UTF-8''%E2%82%AC%20rapport%20;
 filename*1*=%C3%A9t%C3%A9;
 filename*2=".exe"

data
--b
Content-Type: application/octet-stream; name*=iso-8859-1'fr'caf%E9.zip

data
--b--
""")
    s = scan(body, "multipart/mixed; boundary=b")
    assert [p.filename for p in s.parts] == ["€ rapport été.exe", "café.zip"]


def test_filename_precedence() -> None:
    body = crlf("""\
--b
Content-Type: application/octet-stream; name="type-name.bin"
Content-Disposition: attachment; filename="plain.pdf"; filename*=utf-8''real.exe

x
--b
Content-Type: application/octet-stream; name="type-name.bin"
Content-Disposition: attachment; filename=" padded .pdf "

x
--b
Content-Type: application/octet-stream; name=type-name.bin

x
--b--
""")
    s = scan(body, "multipart/mixed; boundary=b")
    assert [p.filename for p in s.parts] == ["real.exe", "padded .pdf", "type-name.bin"]


def test_rfc2047_encoded_filename() -> None:
    word = base64.b64encode("rapport été.exe".encode()).decode()
    body = crlf(f"""\
--b
Content-Type: application/octet-stream; name="=?UTF-8?B?{word}?="
Content-Transfer-Encoding: base64

AAAA
--b
Content-Type: application/zip
Content-Disposition: attachment; filename="=?iso-8859-1?q?na=EFve?= .zip"

x
--b--
""")
    s = scan(body, "multipart/mixed; boundary=b")
    assert [p.filename for p in s.parts] == ["rapport été.exe", "naïve .zip"]


def test_nested_alternative_inside_mixed() -> None:
    body = crlf("""\
--mixed
Content-Type: multipart/alternative; boundary="alt"

--alt
Content-Type: text/plain

plain version
--alt
Content-Type: text/html

<p>html version</p>
--alt--

--mixed
Content-Type: image/png
Content-Disposition: inline; filename=logo.png
Content-Transfer-Encoding: base64

iVBORw0KGgo=
--mixed--
""")
    s = scan(body, "multipart/mixed; boundary=mixed")
    assert s.text == "plain version\n<p>html version</p>"
    assert s.parts == [Part("text/plain", "", ""), Part("text/html", "", ""),
                       Part("image/png", "logo.png", "inline")]
    assert s.attachments == [Part("image/png", "logo.png", "inline")]


def test_message_rfc822_attachment_is_descended() -> None:
    body = crlf("""\
--outer
Content-Type: text/plain

see attached
--outer
Content-Type: message/rfc822; name="fwd.eml"
Content-Disposition: attachment; filename="fwd.eml"

From: someone@example.com
Subject: inner
Content-Type: multipart/mixed; boundary="inner"

--inner
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: base64

""") + base64.encodebytes("inner text €".encode()).replace(b"\n", b"\r\n") + crlf("""\
--inner
Content-Type: application/x-msdownload; name="payload.exe"

MZ
--inner--

--outer--
""")
    s = scan(body, "multipart/mixed; boundary=outer")
    assert s.text == "see attached\ninner text €"
    assert s.parts == [
        Part("text/plain", "", ""),
        Part("message/rfc822", "fwd.eml", "attachment"),
        Part("text/plain", "", ""),
        Part("application/x-msdownload", "payload.exe", ""),
    ]


def test_encoded_message_part_stays_opaque() -> None:
    inner = base64.encodebytes(crlf("Subject: x\n\nsecret\n")).replace(b"\n", b"\r\n")
    body = crlf("--b\nContent-Type: message/rfc822\nContent-Transfer-Encoding: base64\n\n")
    s = scan(body + inner + b"--b--\r\n", "multipart/mixed; boundary=b")
    assert s.parts == [Part("message/rfc822", "", "")]
    assert s.text == ""


def test_top_level_message_rfc822() -> None:
    s = scan(crlf("Subject: x\nContent-Type: text/html\n\n<b>hi</b>\n"), "message/rfc822")
    assert s.parts == [Part("message/rfc822", "", ""), Part("text/html", "", "")]
    assert s.text == "<b>hi</b>\r\n"


def test_digest_parts_default_to_messages() -> None:
    body = crlf("""\
--d

Subject: one

first
--d
Content-Type: text/plain

not a message
--d--
""")
    s = scan(body, "multipart/digest; boundary=d")
    assert s.parts == [Part("message/rfc822", "", ""), Part("text/plain", "", ""),
                       Part("text/plain", "", "")]
    assert s.text == "first\nnot a message"


def test_delimiter_syntax() -> None:
    # transport padding after either delimiter, LF-only lines, a boundary prefix that is no
    # delimiter, and a close delimiter without a final line end
    body = (b"--b \t\nContent-Type: text/plain\n\none\n--bx\n--b-\n-- b\n"
            b"--b\t\r\n\r\ntwo\r\n--b-- ")
    s = scan(body, "multipart/mixed; boundary=b")
    assert s.text == "one\n--bx\n--b-\n-- b\ntwo"
    assert len(s.parts) == 2


def test_boundary_with_odd_characters_and_a_first_delimiter_at_the_start() -> None:
    boundary = "=_a:b'(c)+,-./?"
    body = crlf(f"--{boundary}\nContent-Type: text/plain\n\nx\n--{boundary}--\n")
    s = scan(body, f'multipart/mixed; boundary="{boundary}"')
    assert s.text == "x"


def test_outer_delimiter_ends_unclosed_inner_multipart() -> None:
    body = crlf("""\
--o
Content-Type: multipart/alternative; boundary=i

--i
Content-Type: text/plain

inner, never closed
--o
Content-Type: text/plain

after
--o--
""")
    s = scan(body, "multipart/mixed; boundary=o")
    assert s.text == "inner, never closed\nafter"


def test_header_field_details() -> None:
    body = crlf("""\
--b
X-Long: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa
  bbbbbbbbbb
CONTENT-TYPE: Text/HTML (a comment);
\tcharset="iso-8859-1";
    format=flowed
Content-Type: application/x-second-is-ignored
content-disposition: INLINE

caf\xe9
--b--
""").replace("é".encode(), b"\xe9")
    s = scan(body, "multipart/mixed; boundary=b")
    assert s.parts == [Part("text/html", "", "inline")]
    assert s.text == "café"


def test_part_without_headers_or_blank_line() -> None:
    body = crlf("--b\nno header here\n--b\n\nno headers\n--b\n--b--\n")
    s = scan(body, "multipart/mixed; boundary=b")
    assert s.text == "no header here\nno headers\n"
    assert s.parts == [Part("text/plain", "", "")] * 3


def test_dispositions() -> None:
    body = crlf("""\
--b
Content-Type: application/pdf
Content-Disposition: form-data

x
--b
Content-Type: text/plain
Content-Disposition: attachment

notes
--b--
""")
    s = scan(body, "multipart/mixed; boundary=b")
    # RFC 2183 2.8: an unknown disposition type reads as attachment
    assert s.parts == [Part("application/pdf", "", "attachment"),
                       Part("text/plain", "", "attachment")]
    assert s.text == "notes"  # text attachments are text a reader opens


# ---------------------------------------------------------------------- the budget


def test_budget_counts_octets_before_charset_decoding() -> None:
    s = scan("héllo wörld".encode(), "text/plain; charset=utf-8", budget=5)
    assert s.text == "héll"  # h, é (2 octets), l, l


def test_budget_spans_parts_and_parts_are_still_tracked() -> None:
    body = crlf("""\
--b
Content-Type: text/plain

abc
--b
Content-Type: text/html

defgh
--b
Content-Type: text/plain

never read
--b
Content-Type: application/zip; name=z.zip

x
--b--
""")
    s = scan(body, "multipart/mixed; boundary=b", budget=5)
    assert s.text == "abc\nde"
    assert [p.content_type for p in s.parts] == ["text/plain", "text/html", "text/plain",
                                                 "application/zip"]
    assert scan(body, "multipart/mixed; boundary=b", budget=0).text == ""


def test_budget_of_base64_counts_decoded_octets() -> None:
    body = base64.encodebytes(b"0123456789" * 100).replace(b"\n", b"\r\n")
    assert scan(body, "text/plain", "base64", budget=15).text == "012345678901234"


def test_preamble_does_not_spend_the_budget() -> None:
    body = crlf("a long preamble nobody reads\n--b\nContent-Type: text/plain\n\nbody\n--b--\n")
    s = scan(body, "multipart/mixed; boundary=b", budget=10)
    assert s.text == "body"


# ---------------------------------------------------------------------- malformed input


def test_multipart_without_boundary_reads_as_text() -> None:
    body = crlf("--x\nContent-Type: text/plain\n\nhello\n--x--\n")
    s = scan(body, "multipart/mixed")
    assert s.text == body.decode()
    assert s.parts == [Part("text/plain", "", "")]


def test_boundary_that_never_comes_leaves_the_body_as_text() -> None:
    s = scan(crlf("Buy cheap pills\n"), 'multipart/alternative; boundary="nowhere"')
    assert s.text == "Buy cheap pills\r\n"
    assert s.parts == []


def test_unterminated_multipart_and_truncated_headers() -> None:
    body = crlf("--b\nContent-Type: text/plain\nContent-Transfer-Encoding: quoted-printable\n\n"
                "cut off =E2=82=AC")
    s = scan(body, "multipart/mixed; boundary=b")
    assert s.text == "cut off €"
    s = scan(crlf("--b\nContent-Type: text/html; charset=utf-8\nContent-Dispo"),
             "multipart/mixed; boundary=b")
    assert s.parts == [Part("text/html", "", "")]


@pytest.mark.parametrize(("encoded", "decoded"), [
    (b"SGVsbG8@@@ gd29y!bGQ=\r\n", b"Hello world"),  # junk skipped, as clients do
    (b"SGVsbG8", b"Hello"),  # unpadded end
    (b"SGk=SGk=", b"Hi"),  # the data ends at its pad, as in Python
    (b"S=G=k", b"Hi"),  # pads that complete nothing are skipped
    (b"S", b""),
    (b"====\r\n\x00\xff", b""),
])
def test_lenient_base64(encoded: bytes, decoded: bytes) -> None:
    assert scan(encoded, "text/plain; charset=latin-1", "base64").text == decoded.decode()


@pytest.mark.parametrize(("encoded", "decoded"), [
    (b"a=\r\nb=3d=3D=\nc", b"ab==c"),
    (b"=XY =4", b"=XY =4"),  # not escapes: kept
    (b"x=\rdropped\r\ny\r", b"x=dropped\r\ny"),  # bare CRs, which RFC 2045 forbids, go
    (b"end=", b"end"),
])
def test_lenient_quoted_printable(encoded: bytes, decoded: bytes) -> None:
    assert scan(encoded, "text/plain; charset=latin-1", "quoted-printable").text == \
        decoded.decode("latin-1")


def test_long_quoted_printable_line_is_decoded_in_pieces() -> None:
    line = b"=41=42" * 5000 + b"=\r\n" + b"x" * 20000
    assert scan(line, "text/plain", "quoted-printable").text == "AB" * 5000 + "x" * 20000


def test_oversized_part_header_section_makes_the_part_opaque() -> None:
    filler = b"X-Filler: " + b"x" * 1000 + b"\r\n"
    body = (b"--b\r\nContent-Type: text/plain\r\n" + filler * 70 + b"\r\nhidden text\r\n"
            b"--b\r\nContent-Type: text/plain\r\n\r\nshown\r\n--b--\r\n")
    s = scan(body, "multipart/mixed; boundary=b")
    assert s.parts == [Part("application/octet-stream", "", ""), Part("text/plain", "", "")]
    assert s.text == "shown"


def test_entities_are_capped() -> None:
    part = b"--b\r\nContent-Type: application/octet-stream; name=a.bin\r\n\r\nx\r\n"
    text = b"--b\r\nContent-Type: text/plain\r\n\r\nseen\r\n"
    late = b"--b\r\nContent-Type: text/plain\r\n\r\nnot read\r\n--b--\r\n"
    body = text + part * (mime.MAX_PARTS - 2)
    s = feed(body + b"--b--\r\n", "multipart/mixed; boundary=b", None, BIG, [])
    assert len(s.parts) == mime.MAX_PARTS - 1  # the multipart itself is an entity
    assert not s.parts_truncated
    s = feed(body + part * 1000 + late, "multipart/mixed; boundary=b", None, BIG, [])
    assert len(s.parts) == mime.MAX_PARTS - 1
    assert s.parts_truncated
    assert s.text == "seen"


def test_deep_nesting_is_capped() -> None:
    depth = mime.MAX_DEPTH + 8
    head = b"".join(b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i, i + 1)
                    for i in range(depth))
    body = head + b"--b%d\r\nContent-Type: text/plain\r\n\r\ndeep\r\n" % depth
    s = scan(body, "multipart/mixed; boundary=b0")
    assert s.parts == [Part("application/octet-stream", "", "")]
    assert "deep" not in s.text


def test_feed_after_close_and_double_close_are_ignored() -> None:
    s = MimeScanner("text/plain", None, BIG)
    s.feed(b"a")
    s.close()
    s.feed(b"b")
    s.close()
    assert s.text == "a"


# ---------------------------------------------------------------------- bounds


@pytest.mark.parametrize("line_start", [b"", b"--b", b"--"])
def test_held_back_line_stays_bounded(line_start: bytes) -> None:
    s = MimeScanner("multipart/mixed; boundary=b", None, BIG)
    s.feed(b"--b\r\nContent-Type: application/octet-stream\r\n\r\n\r\n" + line_start)
    for _ in range(500):
        s.feed(b"x" * 4000)
        assert len(s._buf) <= 1000
    s.feed(b"\r\n--b\r\nContent-Type: text/plain\r\n\r\nafter\r\n--b--\r\n")
    s.close()
    assert s.text == "after"


def test_header_line_buffer_stays_bounded() -> None:
    s = MimeScanner("multipart/mixed; boundary=b", None, BIG)
    s.feed(b"--b\r\nX-Long: ")
    for _ in range(100):
        s.feed(b"y" * 1000)
        assert len(s._buf) <= mime.MAX_HEADER_SECTION + 1000
    s.close()
    assert s.parts == [Part("application/octet-stream", "", "")]


def test_large_attachment_costs_little_more_than_the_boundary_search() -> None:
    blob = base64.encodebytes(bytes(range(256)) * (48 * 1024)).replace(b"\n", b"\r\n")
    body = crlf("--b\nContent-Type: application/zip; name=big.zip\n"
                "Content-Transfer-Encoding: base64\n\n") + blob + crlf("--b--\n")
    s = MimeScanner("multipart/mixed; boundary=b", None, BIG)
    began = time.perf_counter()
    for i in range(0, len(body), 65536):
        s.feed(body[i:i + 65536])
    s.close()
    elapsed = time.perf_counter() - began
    assert s.parts == [Part("application/zip", "big.zip", "")]
    # 16 MiB: a bytes.find pass takes milliseconds; a Python loop per line would take seconds
    assert elapsed < 1.0, elapsed


# ---------------------------------------------------------------------- properties

TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"))
               | st.sampled_from(["\n", "=", "-", " ", "\t"]), max_size=300)
# Python's email.utils.unquote strips a name's surrounding <...> (get_filename gives "" for
# "<>"); the scanner keeps the name as written, so such names are no oracle for it
NAMES = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")),
                min_size=1, max_size=60).filter(
    lambda s: "=?" not in s and s.strip() != "" and not (s.startswith("<") and s.endswith(">")))


@st.composite
def messages(draw: st.DrawFn, depth: int = 0) -> EmailMessage:
    msg = EmailMessage()
    msg["Subject"] = "generated"
    text = draw(TEXT)
    charsets = ["utf-8"]
    try:
        text.encode("latin-1")
        charsets.append("iso-8859-1")
    except UnicodeEncodeError:
        pass
    msg.set_content(text, charset=draw(st.sampled_from(charsets)),
                    cte=draw(st.sampled_from([None, "quoted-printable", "base64"])))
    if draw(st.booleans()):
        msg.add_alternative(f"<p>{draw(TEXT)}</p>", subtype="html",
                            cte=draw(st.sampled_from([None, "quoted-printable", "base64"])))
    for _ in range(draw(st.integers(0, 3))):
        msg.add_attachment(
            draw(st.binary(max_size=300)), maintype="application",
            subtype=draw(st.sampled_from(["pdf", "octet-stream", "x-msdownload"])),
            filename=draw(NAMES), disposition=draw(st.sampled_from(["attachment", "inline"])))
    if depth == 0 and draw(st.booleans()):
        msg.add_attachment(draw(messages(depth=1)))
    return msg


def split_message(msg: EmailMessage) -> tuple[str | None, str | None, bytes]:
    raw = msg.as_bytes(policy=email.policy.SMTP)
    head, _, body = raw.partition(b"\r\n\r\n")
    headers = HeaderSection.parse(head + b"\r\n")
    return headers.get("Content-Type"), headers.get("Content-Transfer-Encoding"), body


def expected(msg: EmailMessage) -> tuple[str, list[Part]]:
    """What Python's parser reads from the serialised message."""
    parsed = email.message_from_bytes(msg.as_bytes(policy=email.policy.SMTP),
                                      policy=email.policy.default)
    texts, parts = [], []
    for part in parsed.walk():
        ctype = part.get_content_type()
        if part.is_multipart() and ctype not in ("message/rfc822", "message/global"):
            continue
        parts.append(Part(ctype, part.get_filename() or "", part.get_content_disposition() or ""))
        if ctype in ("text/plain", "text/html"):
            texts.append(part.get_content())
    return "\n".join(texts).replace("\r\n", "\n"), parts


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages(), st.data())
def test_generated_messages_read_as_python_reads_them(msg: EmailMessage,
                                                       data: st.DataObject) -> None:
    content_type, cte, body = split_message(msg)
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=40))
    whole = feed(body, content_type, cte, BIG, [])
    assert outcome(feed(body, content_type, cte, BIG, cuts)) == outcome(whole)
    text, parts = expected(msg)
    assert whole.text.replace("\r\n", "\n") == text
    assert whole.parts == parts


TOKENS = st.sampled_from([
    b"--b", b"--b--", b"--c", b"--c--", b"\r\n", b"\n", b"\r", b"\r\n\r\n", b" \t", b"-", b"=",
    b"==", b"=3D", b"=\r\n", b"=4", b"QUJD", b"QQ", b"\xc3", b"\xa9", b"\xff", b":",
    b"Content-Type: multipart/alternative; boundary=c\r\n",
    b"Content-Type: multipart/digest; boundary=\"b\"\r\n",
    b"Content-Type: message/rfc822\r\n",
    b"Content-Type: text/html; charset=utf-7\r\n",
    b"Content-Type: text/plain; charset*=utf-8''%C3%A9; name*0*=x%; name*1=\"y\r\n",
    b"Content-Transfer-Encoding: base64\r\n",
    b"Content-Transfer-Encoding: quoted-printable\r\n",
    b"Content-Disposition: attachment; filename=\"=?utf-8?b?w6k=?=\"\r\n",
    b" folded; boundary=b\r\n",
])
GARBAGE = st.lists(TOKENS | st.binary(max_size=6), max_size=60).map(b"".join)
TOP_TYPES = st.sampled_from([
    None, "multipart/mixed; boundary=b", "multipart/digest; boundary=b", "message/rfc822",
    'multipart/mixed; boundary="c"', "text/plain; charset=utf-16", "multipart/mixed",
    "text/html; charset=\"unknown\"", "application/octet-stream; name*=''%FF",
])
CTES = st.sampled_from([None, "base64", "quoted-printable", "8bit", "x-uuencode"])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(GARBAGE, TOP_TYPES, CTES, st.integers(0, 80), st.lists(st.integers(0, 400), max_size=30))
def test_any_bytes_in_any_split_never_raise(body: bytes, content_type: str | None,
                                            cte: str | None, budget: int,
                                            cuts: list[int]) -> None:
    whole = feed(body, content_type, cte, budget, [])
    assert outcome(feed(body, content_type, cte, budget, cuts)) == outcome(whole)
    assert len(whole.text) <= budget + max(0, len(whole._texts) - 1)  # octets >= characters
    assert whole.attachments == [p for p in whole.parts if p.filename or
                                 p.disposition == "attachment"]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.lists(st.integers(0, 200), max_size=10))
def test_raw_bytes_never_raise(body: bytes, cuts: list[int]) -> None:
    for content_type in ("multipart/mixed; boundary=b", "text/plain"):
        whole = feed(body, content_type, "base64", 50, [])
        assert outcome(feed(body, content_type, "base64", 50, cuts)) == outcome(whole)


HEADER_VALUES = st.lists(st.sampled_from([
    ";", "=", '"', "\\", "*", "*0*", "*1", "'", "%", "%E9", "%C3%A9", "=?utf-8?q?", "=?x?b?", "?=",
    "filename", "name", "boundary", "charset", "utf-16", "zlib", "punycode", "multipart/mixed",
    "message/rfc822", "text/plain", "attachment", "(", ")", " ", "\t", "\r\n ",
]) | st.binary(max_size=4).map(lambda b: b.decode("utf-8", "surrogateescape")),
    max_size=25).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(HEADER_VALUES, HEADER_VALUES, HEADER_VALUES, st.lists(st.integers(0, 300), max_size=8))
def test_any_header_values_never_raise(content_type: str, disposition: str, cte: str,
                                       cuts: list[int]) -> None:
    section = f"Content-Type: {content_type}\r\nContent-Disposition: {disposition}\r\n"
    body = (b"--b\r\n" + section.encode("utf-8", "surrogateescape") + b"\r\nx\r\n--b--\r\n")
    for top in (content_type, "multipart/mixed; boundary=b"):
        whole = feed(body, top, cte, 100, [])
        assert outcome(feed(body, top, cte, 100, cuts)) == outcome(whole)
        for part in whole.parts:
            part.filename.encode()  # no lone surrogates: it can be logged
            assert len(part.filename) <= 255


def test_every_name_a_part_gives_is_kept() -> None:
    # a harmless name where one client looks, an executable where another does
    s = MimeScanner('multipart/mixed; boundary="b"', None, 1000)
    s.feed(b'--b\r\nContent-Type: application/octet-stream; name="evil.exe"\r\n'
           b"Content-Disposition: attachment; filename=\"fine.pdf\"; filename*=UTF-8''also.pdf\r\n"
           b"\r\nxx\r\n--b--\r\n")
    s.close()
    (part,) = s.attachments
    assert part.filename == "also.pdf"
    assert part.names == ("also.pdf", "fine.pdf", "evil.exe")


@pytest.mark.parametrize(("content_type", "disposition_cte", "budget", "settled"), [
    (None, None, 0, True),  # a plain message, no text wanted: its body tells nothing more
    ("application/pdf; name=a.pdf", "base64", BIG, True),  # not text: never decoded
    ("text/plain", None, BIG, False),  # its text is wanted
    ("multipart/mixed; boundary=b", None, 0, False),  # its parts are in the body
    ("message/rfc822", None, 0, False),  # so are the enclosed message's
])
def test_settled_only_when_the_body_can_add_nothing(
        content_type: str | None, disposition_cte: str | None, budget: int,
        settled: bool) -> None:
    scanner = MimeScanner(content_type, disposition_cte, budget)
    assert scanner.settled is settled
    if settled:  # and indeed: fed or not, it ends the same
        fed = feed(b"--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b--\r\n", content_type,
                   disposition_cte, budget, [3, 20])
        unfed = MimeScanner(content_type, disposition_cte, budget)
        unfed.close()
        assert outcome(fed) == outcome(unfed)


def test_text_is_one_string_after_close() -> None:
    scanner = feed(b"abc\r\n" * 100, "text/plain", None, BIG, list(range(0, 500, 7)))
    assert scanner.text == "abc\r\n" * 100
    assert scanner.text is scanner.text  # joined once, the pieces let go

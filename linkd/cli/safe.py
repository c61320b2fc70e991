"""Text that came from a peer or a file name is never written raw to a terminal.

A peer chooses its goodbye reason, its nack reasons and the names of the files
it sends; anyone who can drop a file into out/ chooses its name. Printed raw,
`\\x1b[2J` clears the operator's screen and a newline starts a line of the
attacker's choosing ("ALL LINKS OK"). Every human-readable line linkctl prints
goes through `printable()`: control characters -- C0 (including tab, newline,
carriage return and ESC), DEL, C1 (U+0080..U+009F, which some terminals obey
as escape sequences) -- and every other character Python does not count as
printable (bidi overrides such as U+202E, zero-width and unassigned code
points) become `\\xNN` (ASCII, and the bytes of a file name that is not
UTF-8), `\\uNNNN` or `\\UNNNNNNNN` escapes, and a backslash of such a text
`\\\\`. JSON output needs nothing: json.dumps escapes control characters itself
(and, with the default ensure_ascii, everything else that is not ASCII).
"""

from __future__ import annotations

from typing import Any


def _escape(c: str) -> str:
    n = ord(c)
    if 0xDC80 <= n <= 0xDCFF:
        # a byte of a file name that is not UTF-8 (Python's surrogateescape): shown as
        # that byte, which bash's $'...' takes back (linkctl retry ... $'bad\xff.txt')
        return f"\\x{n - 0xDC00:02x}"
    if n < 0x80:
        return f"\\x{n:02x}"
    if n < 0x10000:     # (C1 and Latin-1 as \u00NN: \xNN is a raw byte, above)
        return f"\\u{n:04x}"
    return f"\\U{n:08x}"


def printable(text: object) -> str:
    """`text` (made a str) with every non-printable character escaped: one line, safe
    for a terminal."""
    s = text if isinstance(text, str) else str(text)
    if s.isprintable() and "\\" not in s:
        return s
    # a backslash of the text is doubled: `bad\xff` (those four characters) and the
    # byte 0xff must not print alike
    return "".join(c if c.isprintable() and c != "\\" else "\\\\" if c == "\\"
                   else _escape(c) for c in s)


def printable_lines(text: str) -> str:
    """Like printable(), but keeps the line breaks of text linkctl itself laid out."""
    return "\n".join(printable(line) for line in text.split("\n"))


def safe_doc(value: Any) -> Any:
    """A JSON document with every string (keys too) made printable(), for formatting
    it as a human table."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {printable(k) if isinstance(k, str) else k: safe_doc(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [safe_doc(v) for v in value]
    return value

"""Names on the wire and on disk: one home for each naming rule.

A leaf module (it imports only `re`): the sans-IO protocol core checks the
names a peer sends with it, the spool checks the names it writes with it, so
a name the peer may send is exactly a name the spool may write.

* A *channel* name is 1..64 of [A-Za-z0-9_.-] and not '.' or '..' (it is a
  folder name under out/ and in/).
* A *node* name is 1..253 of the same characters (a DNS-like name).
* A *plain* file name is one path component linkd would write: not empty,
  no '/', NUL or control character, not starting with '.', valid UTF-8 and
  at most NAME_MAX bytes.
"""

from __future__ import annotations

import re

NAME_MAX = 255                                   # bytes in one file name (Linux NAME_MAX)
CHANNEL_PATTERN = "[A-Za-z0-9_.-]{1,64}"
CHANNEL_RE = re.compile(CHANNEL_PATTERN)         # use .fullmatch
NODE_RE = re.compile("[A-Za-z0-9_.-]{1,253}")    # use .fullmatch


def is_channel_name(name: object) -> bool:
    """True if `name` is a valid channel name."""
    return isinstance(name, str) and CHANNEL_RE.fullmatch(name) is not None \
        and name not in (".", "..")


def is_node_name(name: object) -> bool:
    return isinstance(name, str) and NODE_RE.fullmatch(name) is not None


def plain_name_problem(name: str) -> str | None:
    """None if `name` is one plain path component; else a short reason that
    completes a sentence whose subject is the name ("is empty", "contains '/'")."""
    if not isinstance(name, str):
        return "is not a string"
    if not name:
        return "is empty"
    if name in (".", ".."):
        return f"is {name!r}"
    if "/" in name:
        return "contains '/'"
    if "\0" in name:
        return "contains a NUL byte"
    if any(c < " " or c == "\x7f" for c in name):
        return "contains a control character"
    if name.startswith("."):
        return "starts with '.'"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    if size > NAME_MAX:
        return f"is {size} bytes long (at most {NAME_MAX})"
    return None

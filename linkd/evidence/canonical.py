"""The one canonical encoding that evidence is signed and hashed over.

Canonical JSON: the object serialised with its keys sorted by code point, no
whitespace (`,` and `:` separators), non-ASCII characters as themselves
(UTF-8), and only these value types: objects, arrays, strings, integers in
[-(2^53 - 1), 2^53 - 1], booleans and null. No floats: a time is a string. For
these values the bytes equal RFC 8785 (JCS) and Python's
``json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)``
encoded as UTF-8, so an independent verifier can reproduce them.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from ..errors import EncodingError as EncodingError  # re-exported

MAX_SAFE_INT = (1 << 53) - 1




def _check(value: Any, where: str) -> None:
    if value is None or isinstance(value, (bool, str)):
        return
    if isinstance(value, int):
        if abs(value) > MAX_SAFE_INT:
            raise EncodingError(f"{where}: integer {value} is outside ±(2^53-1)")
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise EncodingError(f"{where}: key {key!r} is not a string")
            _check(item, f"{where}.{key}")
        return
    raise EncodingError(f"{where}: {type(value).__name__} has no canonical encoding")


_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                            allow_nan=False)   # what json.dumps(...) builds on every call


def canonical_json(obj: Any) -> bytes:
    """The canonical bytes of `obj` (see the module docstring)."""
    _check(obj, "$")
    return _ENCODER.encode(obj).encode("utf-8")


def micros(seconds: float) -> int:
    """Seconds since the epoch (a float, as on the wire) as integer microseconds."""
    return round(seconds * 1_000_000)


EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


_last_second: tuple[int, str] = (0, "1970-01-01T00:00:00")


def utc_text(us: int) -> str:
    """Integer microseconds since the epoch as RFC 3339 UTC with exactly six
    fractional digits: ``2026-11-30T12:00:00.250000Z``. (The receipts of one
    group commit share their second: the text of the last second is kept.)"""
    global _last_second
    seconds, fraction = divmod(us, 1_000_000)
    known, text = _last_second
    if known != seconds:
        text = (EPOCH + dt.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S")
        _last_second = (seconds, text)
    return f"{text}.{fraction:06d}Z"


def parse_utc(text: str) -> int:
    """The inverse of `utc_text` (raises EncodingError on anything else)."""
    try:
        moment = dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC)
    except (TypeError, ValueError):
        raise EncodingError(f"{text!r} is not a time like 2026-11-30T12:00:00.250000Z") \
            from None
    if utc_text(_us(moment)) != text:
        raise EncodingError(f"{text!r} is not in canonical form (six fractional digits, Z)")
    return _us(moment)


def _us(moment: dt.datetime) -> int:
    delta = moment - EPOCH
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds

"""JSON-shaped values: what the documents linkd serves and logs are made of.

Status documents, `linkctl queue` entries and a session's TLS facts are plain
JSON; naming their type here (instead of `dict[str, Any]`) keeps mypy's
`disallow_any_explicit` on for the modules that build them.
"""

from __future__ import annotations

from typing import TypeAlias

JSONValue: TypeAlias = "str | int | float | bool | None | list[JSONValue] | dict[str, JSONValue]"
JSONObject: TypeAlias = "dict[str, JSONValue]"

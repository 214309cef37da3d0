"""Turn raw records into (text, pile_set_name) documents, or a reason why the record is skipped."""

from __future__ import annotations

import json
from typing import Any

from .readers import TextBytes

# Skip reasons, as counted in the manifest and the summary.
INVALID_JSON = "invalid_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_TEXT = "missing_text"
NON_STRING_TEXT = "non_string_text"
EMPTY_TEXT = "empty_text"
INVALID_UTF8 = "invalid_utf8"
SKIP_REASONS = (INVALID_JSON, NOT_AN_OBJECT, MISSING_TEXT, NON_STRING_TEXT, EMPTY_TEXT, INVALID_UTF8)
# Records left out on purpose (--include-set / --exclude-set) are counted apart from bad ones.
FILTERED = "filtered_by_set"
NO_SET = "(none)"


def _set_name(record: dict) -> str:
    meta = record.get("meta")
    name = meta.get("pile_set_name") if isinstance(meta, dict) else record.get("pile_set_name")
    return name if isinstance(name, str) else NO_SET


def _check_text(text: Any) -> str | None:
    """The skip reason for a text value, or None when it is a good document."""
    if not isinstance(text, str):
        return NON_STRING_TEXT
    if not text.strip():
        return EMPTY_TEXT
    try:
        text.encode("utf-8")  # lone surrogates from JSON escapes like "\ud800"
    except UnicodeEncodeError:
        return INVALID_UTF8
    return None


def parse_record(raw: Any, text_key: str = "text") -> tuple[str | None, str, str | None]:
    """(text, pile_set_name, skip_reason): text is None exactly when the record is skipped."""
    if isinstance(raw, TextBytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None, NO_SET, INVALID_UTF8
        reason = _check_text(text)
        return (None if reason else text), NO_SET, reason
    if isinstance(raw, tuple):  # parquet row
        text, set_name = raw
        reason = _check_text(text)
        return (None if reason else text), (set_name if isinstance(set_name, str) else NO_SET), reason
    try:
        record = json.loads(raw)
    except UnicodeDecodeError:
        return None, NO_SET, INVALID_UTF8
    except ValueError:
        return None, NO_SET, INVALID_JSON
    if not isinstance(record, dict):
        return None, NO_SET, NOT_AN_OBJECT
    set_name = _set_name(record)
    if text_key not in record:
        return None, set_name, MISSING_TEXT
    text = record[text_key]
    reason = _check_text(text)
    return (None if reason else text), set_name, reason

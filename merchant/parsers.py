"""The API's JSON parser: bounded in size, nesting depth and item count before anything is built.

Python's json module recurses once per nesting level, so `[[[[...]]]]` 100 000 deep (200 KB,
or 64 KiB of it) raises RecursionError, which would be a 500. The depth is therefore measured by
a linear scan of the text first, and the parser only runs on bodies it can parse in a few
frames. The item count bounds the work serializers and validation do on a body that fits the
byte limit (64 KiB of `[0,0,0,...]` is 32 000 items).
"""

import re
from collections.abc import Mapping
from typing import Any

from django.conf import settings
from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser
from rest_framework.utils import json

from merchant.problems import Problem

# A JSON string (or, unterminated, the rest of the text), or a bracket. Every token can match
# from where it starts, so each character is looked at once: no backtracking, no quadratic
# case, whatever the input. Brackets inside strings are skipped exactly as the JSON parser
# skips them; on text that is not JSON the scan can only over-count, never under-count, the
# depth the parser would reach before it gives up.
_TOKEN = re.compile(r'"(?:[^"\\]++|\\.)*+(?:"|\\?\Z)|[\[\]{}]', re.DOTALL)


class JSONTooComplex(ValueError):
    """Valid (or not yet parsed) JSON over the depth or item limit."""


def json_depth(text: str, *, limit: int) -> int:
    """The deepest nesting of `text`, counted up to limit + 1 (then the scan stops)."""
    depth = deepest = 0
    for token in _TOKEN.finditer(text):
        char = token.group()
        if char in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        elif char in "]}":
            depth = max(depth - 1, 0)
    return deepest


def json_item_count(value: Any, *, limit: int) -> int:
    """The object members plus array items of a parsed document, counted up to limit + 1."""
    count = 0
    stack = [value]
    while stack and count <= limit:
        node = stack.pop()
        if isinstance(node, dict):
            children = list(node.values())
        elif isinstance(node, list):
            children = node
        else:
            continue
        count += len(children)
        stack.extend(children)
    return count


def json_loads_limited(
    text: str, *, strict: bool = True, max_depth: int | None = None, max_items: int | None = None
) -> Any:
    """json.loads within JSON_MAX_DEPTH and JSON_MAX_ITEMS (unless given): a ValueError, as
    the json module raises on bad JSON, with a message fit for a client; never RecursionError."""
    max_depth = settings.JSON_MAX_DEPTH if max_depth is None else max_depth
    if json_depth(text, limit=max_depth) > max_depth:
        raise JSONTooComplex(f"The JSON body is nested deeper than {max_depth} levels.")
    value = json.loads(text, parse_constant=json.strict_constant if strict else None)
    max_items = settings.JSON_MAX_ITEMS if max_items is None else max_items
    if json_item_count(value, limit=max_items) > max_items:
        raise JSONTooComplex(
            f"The JSON body has more than {max_items} object members and array items in total."
        )
    return value


class LimitedJSONParser(JSONParser):
    """JSONParser that refuses bodies over LINK_MAX_BODY_BYTES (413) and over
    JSON_MAX_DEPTH or JSON_MAX_ITEMS (400 bad-request, saying which limit)."""

    def limits(self) -> tuple[int, int]:
        """The largest body in bytes, and the most object members + array items in it."""
        return settings.LINK_MAX_BODY_BYTES, settings.JSON_MAX_ITEMS

    def parse(
        self,
        stream: Any,
        media_type: str | None = None,
        parser_context: Mapping[str, Any] | None = None,
    ) -> Any:
        context = parser_context or {}
        limit, max_items = self.limits()
        # DRF hands a JSON parser the whole body, which Django read (or refused: 413 from the
        # exception handler) under DATA_UPLOAD_MAX_MEMORY_SIZE, twice the largest limit.
        raw = stream.read(limit + 1)
        if len(raw) > limit:
            raise Problem("payload-too-large", f"The body is larger than {limit // 1024} KiB.")
        encoding = context.get("encoding", settings.DEFAULT_CHARSET)
        try:
            # bytes.decode refuses bytes-to-bytes codecs (bz2_codec...): no decompression bomb.
            text = raw.decode(encoding)
        except (LookupError, UnicodeError) as exc:
            raise ParseError("The body is not text in the declared charset.") from exc
        try:
            return json_loads_limited(text, strict=self.strict, max_items=max_items)
        except JSONTooComplex as exc:
            raise Problem("bad-request", str(exc)) from exc
        except ValueError as exc:
            raise ParseError(f"JSON parse error - {exc}") from exc


class BatchJSONParser(LimitedJSONParser):
    """POST /link/batch's: the limits of LINK_BATCH_MAX_ITEMS single requests, as the batch's
    items are (the depth limit is the same: an item nests one level deeper than a body)."""

    def limits(self) -> tuple[int, int]:
        return settings.LINK_BATCH_MAX_BODY_BYTES, settings.LINK_BATCH_MAX_JSON_ITEMS

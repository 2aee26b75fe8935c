"""The sequences-file + items-JSONL format: the shared Amazon data, and any catalog a user brings.

    sequences file (plain or .gz)    one user per line: ``user item item ...``, whitespace
                                     separated, items oldest first; ids are any strings
    items JSONL (plain or .gz)       one JSON object per item:
                                     ``item_id`` (or ``asin``): the id used in the sequences file
                                     ``asin``, ``title``, ``brand``, ``price``, ``categories``
                                     (list of category paths), ``short_text``: all optional

The shared data (``<data-dir>/<dataset>/sequences.txt.gz`` + ``items.jsonl.gz``) is this format
with ids 1..N already dense; they come out unchanged.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from pathlib import Path
from typing import Any

from tiger_ray.data.catalog import ItemRecord, UserSequence
from tiger_ray.data.item_text import clean_categories, clean_price, clean_str
from tiger_ray.data.lines import iter_lines, where

ID_FIELDS = ("item_id", "asin")


def parse_sequence_line(line: str, at: str) -> tuple[str, list[str]]:
    """One ``user item item ...`` line -> (user, items); ``at`` is ``path:line`` for errors."""
    user, *items = line.split()
    if not items:
        raise ValueError(f"{at}: user {user!r} has no items (expected `user item item ...`)")
    return user, items


def repeated_user_error(at: str, user: str, first: str) -> ValueError:
    """``first``: where the user's first line is ("line 3", or "path:3" in another file)."""
    return ValueError(f"{at}: user {user!r} appears again (first at {first}); "
                      f"give one line per user")


def read_sequences_file(path: str | os.PathLike) -> list[UserSequence]:
    path = Path(path)
    users: list[UserSequence] = []
    first_line: dict[str, int] = {}
    for lineno, line in iter_lines(path, desc=f"read {path.name}"):
        user, items = parse_sequence_line(line, where(path, lineno))
        if user in first_line:
            raise repeated_user_error(where(path, lineno), user, f"line {first_line[user]}")
        first_line[user] = lineno
        users.append(UserSequence(user, items, where(path, lineno)))
    if not users:
        raise ValueError(f"{path}: no user sequences in the file")
    return users


def _id_string(value: Any, name: str, at: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, numbers.Integral)):
        raise ValueError(f"{at}: {name} must be a string or an integer, got {value!r}")
    text = str(value).strip()
    if not text or any(ch.isspace() for ch in text):
        raise ValueError(f"{at}: {name} {value!r} must be non-empty and contain no whitespace")
    return text


def _optional_text(row: dict, name: str, at: str) -> str | None:
    value = row.get(name)
    if value is not None and not isinstance(value, (str, numbers.Number)):
        raise ValueError(f"{at}: {name} must be a string or null, got {type(value).__name__}")
    return clean_str(value)


def _optional_price(row: dict, at: str) -> float | None:
    value = row.get("price")
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return None
    price = clean_price(value)
    if price is None:
        raise ValueError(f"{at}: price must be a non-negative number or null, got {value!r}")
    return price


def _categories(row: dict, at: str) -> list[list[str]]:
    value = row.get("categories")
    if value is not None and not isinstance(value, (str, list)):
        raise ValueError(f"{at}: categories must be a list of category paths, got {value!r}")
    return clean_categories(value)


def parse_item_row(row: Any, at: str) -> ItemRecord:
    """One items-JSONL object -> ItemRecord; ``at`` is ``path:line`` for errors."""
    if not isinstance(row, dict):
        raise ValueError(f"{at}: expected a JSON object, got {type(row).__name__}")
    id_field = next((name for name in ID_FIELDS if row.get(name) is not None), None)
    if id_field is None:
        raise ValueError(f"{at}: the item has neither 'item_id' nor 'asin'")
    key = _id_string(row[id_field], id_field, at)
    asin = row.get("asin")
    return ItemRecord(
        key=key,
        asin=_id_string(asin, "asin", at) if asin is not None else None,
        title=_optional_text(row, "title", at),
        brand=_optional_text(row, "brand", at),
        categories=_categories(row, at),
        price=_optional_price(row, at),
        short_text=_optional_text(row, "short_text", at),
        source=at,
    )


def parse_item_line(line: str, at: str) -> ItemRecord:
    """One items-JSONL line -> ItemRecord (parsed as JSON, never evaluated)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{at}: not valid JSON ({err.msg} at column {err.colno})") from None
    return parse_item_row(row, at)


def repeated_item_error(at: str, key: str, first: str) -> ValueError:
    return ValueError(f"{at}: item {key!r} appears again (first at {first})")


def read_items_jsonl(path: str | os.PathLike) -> dict[str, ItemRecord]:
    path = Path(path)
    items: dict[str, ItemRecord] = {}
    for lineno, line in iter_lines(path, desc=f"read {path.name}"):
        record = parse_item_line(line, where(path, lineno))
        if record.key in items:
            raise repeated_item_error(record.source, record.key, items[record.key].source)
        items[record.key] = record
    if not items:
        raise ValueError(f"{path}: no items in the file")
    return items

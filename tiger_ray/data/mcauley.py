"""The original Amazon 2014 review files of J. McAuley, as a user downloads them.

    reviews_<Category>_5.json.gz   one JSON object per review: reviewerID, asin, unixReviewTime, ...
    meta_<Category>.json.gz        one Python dict literal per item: asin, title, price, brand,
                                   categories, ... (single-quoted, so not JSON)

Meta lines are parsed with ``ast.literal_eval``, which accepts only literals: a line such as
``__import__('os').system(...)`` is rejected with its file:line and never run. Each user's
reviews are ordered by ``unixReviewTime``; reviews with equal times keep their file order.
"""

from __future__ import annotations

import ast
import json
import numbers
import os
import re
from pathlib import Path
from typing import Any

from tiger_ray.data.catalog import ItemRecord, UserSequence
from tiger_ray.data.item_text import clean_categories, clean_price, clean_str
from tiger_ray.data.lines import iter_lines, where

# The paper's datasets; any other McAuley category name is used as given.
CATEGORIES = {"beauty": "Beauty", "sports": "Sports_and_Outdoors", "toys": "Toys_and_Games"}
# The asin is the first key of every meta line; reading it with a regex lets us skip the
# (slow) literal parse of items outside the k-core. Lines it does not match are fully parsed.
_LEADING_ASIN = re.compile(r"""^\s*\{\s*['"]asin['"]\s*:\s*['"]([^'"\\]+)['"]\s*[,}]""")


def category_name(dataset: str) -> str:
    return CATEGORIES.get(dataset.lower(), dataset)


def file_names(dataset: str) -> tuple[str, str]:
    """(reviews file, meta file) names of a dataset, e.g. beauty -> reviews_Beauty_5.json.gz."""
    category = category_name(dataset)
    return f"reviews_{category}_5.json.gz", f"meta_{category}.json.gz"


def _require(row: dict, name: str, kind: type, expected: str, at: str) -> Any:
    if name not in row:
        raise ValueError(f"{at}: review has no {name!r} field")
    value = row[name]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"{at}: {name} must be {expected}, got {value!r}")
    return value


def read_reviews(path: str | os.PathLike) -> list[UserSequence]:
    """Every user's reviewed asins, oldest first; users in order of their first review in the file."""
    path = Path(path)
    reviews: dict[str, list[tuple[int, str]]] = {}
    first_line: dict[str, int] = {}
    for lineno, line in iter_lines(path, desc=f"read {path.name}"):
        at = where(path, lineno)
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{at}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{at}: expected a JSON object, got {type(row).__name__}")
        user = str(_require(row, "reviewerID", str, "a string", at)).strip()
        asin = str(_require(row, "asin", str, "a string", at)).strip()
        if not user or not asin:
            raise ValueError(f"{at}: reviewerID and asin must be non-empty")
        time = int(_require(row, "unixReviewTime", numbers.Real, "a number", at))
        reviews.setdefault(user, []).append((time, asin))
        first_line.setdefault(user, lineno)
    if not reviews:
        raise ValueError(f"{path}: no reviews in the file")
    users = []
    for user, timed in reviews.items():
        timed.sort(key=lambda pair: pair[0])  # stable: equal times keep file order
        users.append(UserSequence(user, [asin for _, asin in timed],
                                  f"{where(path, first_line[user])} (first review)"))
    return users


def parse_meta_line(line: str, at: str) -> dict:
    """One meta line -> dict, by JSON or ``ast.literal_eval``; anything else is a ValueError."""
    text = line.strip()
    try:
        row = json.loads(text)
    except json.JSONDecodeError:
        try:
            row = ast.literal_eval(text)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as err:
            reason = type(err).__name__ if not str(err) else str(err).splitlines()[0]
            raise ValueError(f"{at}: not a Python dict literal ({reason}); meta lines are "
                             "parsed, never executed") from None
    if not isinstance(row, dict):
        raise ValueError(f"{at}: expected a dict, got {type(row).__name__}")
    return row


def meta_record(row: dict, at: str) -> ItemRecord:
    asin = row.get("asin")
    if not isinstance(asin, str) or not asin.strip():
        raise ValueError(f"{at}: meta row has no asin")
    return ItemRecord(
        key=asin.strip(),
        asin=asin.strip(),
        title=clean_str(row.get("title")),
        brand=clean_str(row.get("brand")),
        categories=clean_categories(row.get("categories")),
        price=clean_price(row.get("price")),
        source=at,
    )


def read_meta(path: str | os.PathLike, wanted: set[str] | None = None) -> dict[str, ItemRecord]:
    """Metadata of the ``wanted`` asins (all when None); duplicates of a wanted asin are an error."""
    path = Path(path)
    items: dict[str, ItemRecord] = {}
    for lineno, line in iter_lines(path, desc=f"read {path.name}"):
        at = where(path, lineno)
        if wanted is not None:
            match = _LEADING_ASIN.match(line)
            if match and match.group(1) not in wanted:
                continue
        record = meta_record(parse_meta_line(line, at), at)
        if wanted is not None and record.key not in wanted:
            continue
        if record.key in items:
            raise ValueError(f"{at}: asin {record.key!r} appears again (first at "
                             f"{items[record.key].source})")
        items[record.key] = record
    return items

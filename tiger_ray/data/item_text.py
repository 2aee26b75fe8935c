"""Item metadata cleaning and the text the sentence encoder reads.

The paper encodes "title, price, brand, and category" of each item with Sentence-T5 (Sec. 4.1).
We write them as labelled fields, e.g.

    Title: OPI Nail Lacquer; Price: $12.00; Brand: OPI; Categories: Beauty > Makeup > Nails

A missing field is left out entirely (never written as "None" or "nan"), so the encoder never
sees placeholder words. The text depends only on the cleaned fields, so it is deterministic.
"""

from __future__ import annotations

import html
import math
from typing import Any, Iterable

FIELD_SEPARATOR = "; "
PATH_SEPARATOR = " > "
PATHS_SEPARATOR = ", "


def clean_str(value: Any) -> str | None:
    """A non-empty string with HTML entities decoded and whitespace collapsed, or None."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    text = " ".join(html.unescape(str(value)).split())
    if not text or text.lower() in {"none", "nan", "null"}:
        return None
    return text


def clean_price(value: Any) -> float | None:
    """A finite, non-negative price in dollars, or None ("$1,299.00" strings are accepted)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str):
        value = value.strip().lstrip("$").replace(",", "")
        if not value:
            return None
    try:
        price = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(price) or price < 0:
        return None
    return price


def clean_categories(value: Any) -> list[list[str]]:
    """Category paths as a list of lists of non-empty strings, duplicates removed, order kept.

    Accepts the metadata's list of paths, a single path (list of strings) or one string.
    """
    if value is None:
        return []
    if isinstance(value, str):
        value = [[value]]
    elif isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        value = [value]
    if not isinstance(value, (list, tuple)):
        return []
    paths: list[list[str]] = []
    for path in value:
        if isinstance(path, str):
            path = [path]
        if not isinstance(path, (list, tuple)):
            continue
        cleaned = [c for c in (clean_str(level) for level in path) if c is not None]
        if cleaned and cleaned not in paths:
            paths.append(cleaned)
    return paths


def format_price(price: float) -> str:
    return f"${price:,.2f}"


def format_categories(categories: Iterable[Iterable[str]]) -> str:
    return PATHS_SEPARATOR.join(PATH_SEPARATOR.join(path) for path in categories)


def item_text(title: str | None, price: float | None, brand: str | None,
              categories: list[list[str]], fallback: str) -> str:
    """The encoder's text for one item from already-cleaned fields.

    ``fallback`` (e.g. the item's id) is used only when every field is missing, so the text is
    never empty.
    """
    fields = []
    if title is not None:
        fields.append(f"Title: {title}")
    if price is not None:
        fields.append(f"Price: {format_price(price)}")
    if brand is not None:
        fields.append(f"Brand: {brand}")
    if categories:
        fields.append(f"Categories: {format_categories(categories)}")
    return FIELD_SEPARATOR.join(fields) if fields else f"Item: {fallback}"

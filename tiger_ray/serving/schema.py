"""The HTTP API's request and response models, its hard limits, and its error bodies.

Everything a client can get wrong is checked here or in ``catalog.resolve_history`` and answered
with a 4xx whose JSON body names the field:

    {"error": "invalid_request", "message": "k: Input should be less than or equal to 100",
     "fields": [{"field": "k", "message": "Input should be less than or equal to 100"}]}

Histories are JSON integers (item ids, 1..N) or strings (ASINs); the JSON type decides, so the
numeric ASINs of books (ISBNs such as "0205616461") are never mistaken for ids. Types are strict:
``"k": "10"``, ``"k": 10.0`` and ``true`` in a history are errors, not silently coerced.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Sequence

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt
from pydantic_core import PydanticCustomError

# Hard limits. A history longer than the model's window is accepted up to MAX_HISTORY items and
# cut to the most recent items the model reads (TIGER and the baseline read the last 20 by
# default); MAX_HISTORY only bounds the work a single request can cause.
MAX_HISTORY = 1000
MAX_K = 100
MAX_ASIN_LENGTH = 64
MAX_USER_ID = 2**63 - 1
MAX_TEMPERATURE = 100.0
# Big enough for MAX_HISTORY ASINs of MAX_ASIN_LENGTH characters, small enough to refuse junk.
DEFAULT_MAX_BODY_BYTES = 128 * 1024

ModelName = Literal["tiger", "ann"]


def _history_item(value: Any) -> int | str:
    # One clear error per bad entry (a plain int | str union reports one error per member).
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise PydanticCustomError(
            "history_item", "must be an item id (integer) or an ASIN (string), got {kind}",
            {"kind": type(value).__name__ if value is not None else "null"})
    if isinstance(value, str) and not (0 < len(value) <= MAX_ASIN_LENGTH and value.isprintable()):
        raise PydanticCustomError("history_item", "an ASIN must be 1 to {limit} printable characters",
                                  {"limit": MAX_ASIN_LENGTH})
    return value


HistoryItem = Annotated[int | str, BeforeValidator(_history_item)]


class RecommendRequest(BaseModel):
    """POST /recommend."""

    model_config = ConfigDict(extra="forbid")  # a typo such as "hisotry" is an error, not ignored

    history: list[HistoryItem] = Field(
        min_length=1, max_length=MAX_HISTORY,
        description=f"The user's items, oldest first: item ids (integers) or ASINs (strings), "
                    f"1 to {MAX_HISTORY}. Only the most recent items the model reads (its window, "
                    f"see GET /info) are used; older ones are dropped.")
    user_id: StrictInt | None = Field(
        default=None, ge=0, le=MAX_USER_ID,
        description="Optional user id (as in sequences.parquet). TIGER hashes it into its user "
                    "token; the baseline looks up its user vector if it learned one (unknown "
                    "users get none). Omitted = 0, an anonymous user.")
    k: StrictInt = Field(default=10, ge=1, le=MAX_K, description=f"How many items, 1..{MAX_K}.")
    model: ModelName = Field(default="tiger", description="tiger (generative retrieval) or ann "
                                                          "(dual encoder + FAISS baseline)")
    temperature: float | None = Field(
        default=None, ge=0.0, le=MAX_TEMPERATURE, allow_inf_nan=False, strict=True,
        description="TIGER only. 0 = deterministic beam search; > 0 = sample k distinct items "
                    "from the temperature-scaled, trie-constrained distribution (diverse, "
                    "different on every call). Omit for the served default. Not accepted by the "
                    "ann model.")


class Item(BaseModel):
    item_id: int
    asin: str | None
    title: str | None


class ItemDetails(Item):
    """GET /items/{item_id}."""

    brand: str | None = None
    categories: list[list[str]] = Field(default_factory=list)
    price: float | None = None


class RankedItem(Item):
    rank: int
    score: float


class RecommendResponse(BaseModel):
    model: ModelName
    model_version: str
    user_id: int | None
    k: int
    history_length: int = Field(description="items received")
    history_used: int = Field(description="most recent items the model read (its window)")
    batch_size: int = Field(description="requests the model answered together with this one")
    items: list[RankedItem] = Field(description="best first; fewer than k only if the model "
                                                "could not fill every slot")


class ModelInfo(BaseModel):
    model: ModelName
    version: str
    window: int | None = Field(description="history items the model reads")
    replicas: int = Field(description="replicas configured at start")
    max_batch_size: int
    batch_wait_timeout_s: float
    options: dict[str, Any]


class InfoResponse(BaseModel):
    run: str
    catalog_size: int
    models: list[ModelInfo]
    limits: dict[str, int]


class HealthResponse(BaseModel):
    status: Literal["ok"]
    models: list[ModelName]


class FieldError(BaseModel):
    field: str
    message: str


class ErrorResponse(BaseModel):
    error: str
    message: str
    fields: list[FieldError] = Field(default_factory=list)


class ApiError(ValueError):
    """An error answered with ``status`` and an ``ErrorResponse`` body naming the fields: client
    errors found after parsing (unknown items, a model not served) and 503 from /healthz."""

    def __init__(self, status: int, fields: Sequence[tuple[str, str]], error: str = "invalid_request"):
        self.status = status
        self.error = error
        self.fields = [FieldError(field=f, message=m) for f, m in fields]
        super().__init__(summary(self.fields))

    def body(self) -> dict:
        return ErrorResponse(error=self.error, message=str(self), fields=self.fields).model_dump()


def summary(fields: Sequence[FieldError], limit: int = 5) -> str:
    shown = "; ".join(f"{f.field}: {f.message}" for f in fields[:limit])
    more = len(fields) - limit
    return shown + (f"; and {more} more" if more > 0 else "")


def field_path(loc: Sequence[str | int]) -> str:
    """("body", "history", 3) -> "history[3]", ("path", "item_id") -> "item_id"; the body is "body"."""
    parts = list(loc[1:]) if loc and loc[0] in ("body", "path", "query") else list(loc)
    if not parts:
        return "body"
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _json_type(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def describe_validation_errors(errors: Sequence[dict]) -> ApiError:
    """FastAPI/pydantic validation errors -> one ApiError (400 for bodies that are not JSON).

    A body that is not JSON, or not a JSON object, is reported on the field "body"; the rest name
    the request field, e.g. "history[2]" or "k".
    """
    fields, status = [], 422
    for err in errors:
        kind = err.get("type", "")
        if kind == "json_invalid":
            status = 400
            detail = (err.get("ctx") or {}).get("error", "JSON decode error")
            fields.append(("body", f"not valid JSON ({detail} at character {err['loc'][-1]})"))
        elif kind == "missing" and tuple(err.get("loc", ())) == ("body",):
            status = 400
            fields.append(("body", "a JSON object is required (Content-Type: application/json)"))
        elif tuple(err.get("loc", ())) == ("body",) and isinstance(err.get("input"), (bytes, str)):
            # FastAPI hands over the raw bytes when the Content-Type is not JSON.
            status = 400
            fields.append(("body", "not a JSON object; send JSON with Content-Type: application/json"))
        elif tuple(err.get("loc", ())) == ("body",):
            fields.append(("body", f"must be a JSON object, got {_json_type(err.get('input'))}"))
        elif kind == "extra_forbidden":
            fields.append((field_path(err["loc"]), "unknown field"))
        else:
            fields.append((field_path(err.get("loc", ("body",))), err.get("msg", "invalid value")))
    return ApiError(status, fields)

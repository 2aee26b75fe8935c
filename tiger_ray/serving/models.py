"""The model side of serving, without Ray: load a Retriever, describe it, answer a mixed batch.

A ``ServedModel`` wraps any ``Retriever`` (``evaluation/retrieval.py``), so serving runs exactly
the code `tiger evaluate` runs. A batch collected by ``@serve.batch`` may mix requests with
different ``k`` and ``temperature``; it is split into groups that share both, and each group is
one ``recommend`` call. Asking each group for its own k (rather than the batch's largest k and
slicing) keeps every answer identical to what the same request would get alone.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tiger_ray.evaluation.retrieval import Retriever
from tiger_ray.runs import RunDir

log = logging.getLogger(__name__)

# Files that make up each model, relative to the run directory (globs); their contents are the
# model's version. The TIGER directory holds weights, config and the Semantic-ID table it was
# trained with; the baseline holds the dual encoder and its FAISS indexes.
MODEL_FILES = {
    "tiger": ["seq2seq/best/*"],
    "ann": ["baseline/model.pt", "baseline/index-*/*"],
    "hybrid": ["seq2seq/best/*", "baseline/model.pt", "baseline/index-*/*", "hybrid/tuning.json"],
}


@dataclass(frozen=True)
class Query:
    history: np.ndarray  # int64 item ids, oldest first, already validated against the catalog
    user_id: int
    k: int
    temperature: float | None = None


@dataclass
class Answer:
    item_ids: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    history_used: int = 0  # most recent history items the model read
    batch_size: int = 0  # queries answered together with this one (including it)
    model_version: str = "unknown"
    error: str | None = None  # set when the model rejected this query (a client error) ...
    error_field: str = "history"  # ... and the request field it is about


def import_loader(path: str):
    """"package.module:function" -> the function (a custom ``load(run, **options) -> Retriever``)."""
    module_name, sep, function = path.partition(":")
    if not sep or not function:
        raise ValueError(f"loader must look like 'package.module:function', got {path!r}")
    return getattr(importlib.import_module(module_name), function)


def model_version(run: RunDir, model: str) -> str:
    """Short SHA-256 of the model's files (name and content), or "unknown" if none are found."""
    paths = sorted({p for pattern in MODEL_FILES.get(model, []) for p in run.root.glob(pattern)
                    if p.is_file()})
    if not paths:
        return "unknown"
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path.relative_to(run.root)).encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:12]


def history_window(retriever: Retriever) -> int | None:
    """How many of the most recent history items the model reads, if it says so."""
    for owner in (retriever, getattr(retriever, "tokenizer", None),
                  getattr(getattr(retriever, "model", None), "config", None)):
        value = getattr(owner, "max_history", None) if owner is not None else None
        if isinstance(value, int) and value > 0:
            return value
    return None


def temperature_mode(retriever: Retriever) -> str | None:
    """How a retriever takes a per-request temperature: "argument" (``recommend(...,
    temperature=)``), "attribute" (a ``temperature`` setting read at decoding time, as
    ``TigerRetriever`` has), or None (it has no temperature)."""
    try:
        if "temperature" in inspect.signature(retriever.recommend).parameters:
            return "argument"
    except (TypeError, ValueError):
        pass
    return "attribute" if isinstance(getattr(retriever, "temperature", None), (int, float)) else None


class ServedModel:
    def __init__(self, retriever: Retriever, name: str, version: str = "unknown",
                 options: dict | None = None):
        self.retriever = retriever
        self.name = name
        self.version = version
        self.options = dict(options or {})
        self.window = history_window(retriever)
        self.temperature_mode = temperature_mode(retriever)
        self.supports_temperature = self.temperature_mode is not None
        self._lock = threading.Lock()  # one batch at a time: a temperature setting is shared state

    def describe(self) -> dict:
        # The options it was loaded with, and the decoding settings in effect (e.g. beam size).
        effective = {key: getattr(self.retriever, key) for key in ("beam_size", "temperature")
                     if isinstance(getattr(self.retriever, key, None), (int, float))}
        return {"model": self.name, "version": self.version, "window": self.window,
                "supports_temperature": self.supports_temperature,
                "options": {**self.options, **effective}}

    def answer(self, queries: list[Query]) -> list[Answer]:
        """One Answer per query, in order; never raises for a bad query, only reports it."""
        with self._lock:
            answers = self._answer(queries)
        for a in answers:
            a.batch_size, a.model_version = len(queries), self.version
        return answers

    def _answer(self, queries: list[Query]) -> list[Answer]:
        answers: list[Answer | None] = [None] * len(queries)
        groups: dict[tuple[int, float | None], list[int]] = {}
        for i, q in enumerate(queries):
            if q.temperature is not None and not self.supports_temperature:
                answers[i] = Answer(error=f"the {self.name} model does not take a temperature",
                                    error_field="temperature")
            else:
                groups.setdefault((q.k, q.temperature), []).append(i)
        for (k, temperature), members in groups.items():
            try:
                results = self._recommend([queries[i] for i in members], k, temperature)
            except ValueError as err:
                if len(members) == 1:
                    results = [Answer(error=str(err))]
                else:
                    # One bad query must not fail its neighbours: retry them one by one.
                    results = [self._answer([queries[i]])[0] for i in members]
            for i, result in zip(members, results):
                answers[i] = result
        return answers  # type: ignore[return-value]

    def _recommend(self, queries: list[Query], k: int, temperature: float | None) -> list[Answer]:
        # The retrievers cut histories to their window themselves; cutting here too only makes
        # ``history_used`` exact.
        histories = [q.history[-self.window:] if self.window else q.history for q in queries]
        user_ids = np.array([q.user_id for q in queries], dtype=np.int64)
        if temperature is None:
            recs = self.retriever.recommend(histories, user_ids, k)
        elif self.temperature_mode == "argument":
            recs = self.retriever.recommend(histories, user_ids, k, temperature=temperature)
        else:
            default = self.retriever.temperature
            self.retriever.temperature = temperature
            try:
                recs = self.retriever.recommend(histories, user_ids, k)
            finally:
                self.retriever.temperature = default
        answers = []
        for ids, scores in zip(np.asarray(recs.item_ids), np.asarray(recs.scores)):
            keep = ids >= 0  # -1 marks a slot the model could not fill
            answers.append(Answer(item_ids=ids[keep].astype(int).tolist(),
                                  scores=scores[keep].astype(float).tolist()))
        for answer, history in zip(answers, histories):
            answer.history_used = len(history)
        return answers


def load_served_model(run: RunDir, model: str, options: dict | None = None,
                      loader: str | None = None) -> ServedModel:
    """Load ``model`` of ``run`` through the registry (or a custom ``loader``) for serving."""
    from tiger_ray.retrievers import load_retriever

    options = {k: v for k, v in (options or {}).items() if v is not None}
    load = import_loader(loader) if loader else (lambda run, **kw: load_retriever(run, model, **kw))
    retriever = load(run, **options)
    version = model_version(run, model)
    log.info("serving %s version %s (window %s) from %s", model, version,
             history_window(retriever), Path(run.root))
    return ServedModel(retriever, model, version, options)

"""Retrievers by name: how `tiger evaluate`, `tiger compare` and serving load a trained model.

The wiring layer: evaluation and serving work on the ``Retriever`` protocol
(``evaluation/retrieval.py``) and never import a model package; this module maps each model
name to its package's ``load_retriever(run: RunDir, **options) -> Retriever``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

from tiger_ray.baseline import retriever as ann_retriever
from tiger_ray.evaluation.retrieval import Retriever
from tiger_ray.hybrid import retriever as hybrid_retriever
from tiger_ray.runs import RunDir
from tiger_ray.seq2seq import retriever as tiger_retriever

LOADERS: dict[str, Callable[..., Retriever]] = {
    "tiger": tiger_retriever.load_retriever,
    "ann": ann_retriever.load_retriever,
    "hybrid": hybrid_retriever.load_retriever,
}
MODELS = tuple(LOADERS)


def _loader(model: str) -> Callable[..., Retriever]:
    if model not in LOADERS:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    return LOADERS[model]


def loader_accepts(model: str) -> set[str]:
    """Keyword options the model's loader takes (so a flag that does not apply is an error)."""
    return set(list(inspect.signature(_loader(model)).parameters)[1:])


def load_retriever(run: RunDir, model: str, **options) -> Retriever:
    return _loader(model)(run, **options)


@dataclass(frozen=True)
class RetrieverFactory:
    """A picklable recipe for a retriever (run, model, loader options, an optional wrapper):
    Ray Data evaluation actors call it once each, so every actor loads the model itself."""

    run_root: str
    model: str
    options: dict = field(default_factory=dict)
    wrap: Callable[[Retriever], Retriever] | None = None

    @property
    def name(self) -> str:
        return self.model

    def __call__(self) -> Retriever:
        retriever = load_retriever(RunDir(self.run_root), self.model, **self.options)
        return self.wrap(retriever) if self.wrap is not None else retriever

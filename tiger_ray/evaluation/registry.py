"""Retrievers by name: how `tiger evaluate`, `tiger compare` and serving load a trained model.

Each entry is "module:function" with signature ``load(run: RunDir, **options) -> Retriever``;
modules are imported only when asked for, so loading one model never imports the other's stack.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

from tiger_ray.evaluation.retrieval import Retriever
from tiger_ray.runs import RunDir

LOADERS = {
    "tiger": "tiger_ray.seq2seq.retriever:load_retriever",
    "ann": "tiger_ray.baseline.retriever:load_retriever",
}
MODELS = tuple(LOADERS)


def load_retriever(run: RunDir, model: str, **options) -> Retriever:
    if model not in LOADERS:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    module_name, function = LOADERS[model].split(":")
    return getattr(importlib.import_module(module_name), function)(run, **options)


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

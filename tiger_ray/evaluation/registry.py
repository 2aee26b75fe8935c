"""Retrievers by name: how `tiger evaluate`, `tiger compare` and serving load a trained model.

Each entry is "module:function" with signature ``load(run: RunDir, **options) -> Retriever``;
modules are imported only when asked for, so loading one model never imports the other's stack.
"""

from __future__ import annotations

import importlib

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

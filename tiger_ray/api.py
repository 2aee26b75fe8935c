"""The Python API: every stage as a function, and a trained model as a ``Recommender``.

    import tiger_ray
    tiger_ray.prepare("runs/beauty", dataset="beauty")
    tiger_ray.embed("runs/beauty")
    tiger_ray.train_rqvae("runs/beauty")
    tiger_ray.train_seq2seq("runs/beauty", max_steps=2000)
    tiger_ray.evaluate("runs/beauty", split=("test",))
    tiger_ray.load_retriever("runs/beauty").recommend([12, 7, 3], k=10)

Each stage function is its `tiger <stage>` command: the same config dataclass (keyword arguments
are its fields, as `tiger <stage> --print-config` lists them; an unknown one is an error), the
same presets (``preset=``, default ``"cpu"``), the same run function. A stage that needs Ray starts
an embedded loopback-only Ray and shuts it down afterwards, unless Ray is already running (then
it uses that one, e.g. a cluster after ``ray.init(address=...)``).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from tiger_ray import pipeline
from tiger_ray.config import build_config, field_names
from tiger_ray.data.synth import PRESETS as SYNTH_PRESETS
from tiger_ray.data.synth import SynthConfig, run_synth
from tiger_ray.ray_env import ray_session
from tiger_ray.runs import RunDir

STAGES = {stage.name: stage for stage in pipeline.STAGES}


def _config(cls: type, presets: dict, preset: str | None, settings: dict[str, Any]):
    names = field_names(cls)
    unknown = sorted(set(settings) - names)
    if unknown:
        raise TypeError(f"unknown setting(s) {', '.join(unknown)} for {cls.__name__}; "
                        f"choose from {', '.join(sorted(names))}")
    if preset is not None and preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(sorted(presets))}")
    return build_config(cls, settings, presets.get(preset or "cpu", {}))


def _run_stage(name: str, run: str | os.PathLike, preset: str | None, settings: dict) -> dict:
    stage = STAGES[name]
    config = _config(stage.config, stage.presets, preset, settings)
    with ray_session():
        return stage.run(RunDir(run), config)


def synth(run: str | os.PathLike, *, preset: str | None = None, **settings) -> dict:
    """`tiger synth`: a synthetic catalog with embeddings (``SynthConfig`` fields)."""
    config = _config(SynthConfig, SYNTH_PRESETS, preset, settings)
    with ray_session():
        return run_synth(RunDir(run), config)


def prepare(run: str | os.PathLike, *, preset: str | None = None, **settings) -> dict:
    """`tiger prepare` (``PrepareConfig`` fields, e.g. ``dataset="beauty"``)."""
    return _run_stage("prepare", run, preset, settings)


def embed(run: str | os.PathLike, *, preset: str | None = None, **settings) -> dict:
    """`tiger embed` (``EmbedConfig`` fields, e.g. ``model=...``)."""
    return _run_stage("embed", run, preset, settings)


def train_rqvae(run: str | os.PathLike, *, preset: str | None = None, **settings) -> dict:
    """`tiger train-rqvae` (``RQVAEConfig`` fields)."""
    return _run_stage("train-rqvae", run, preset, settings)


def train_seq2seq(run: str | os.PathLike, *, preset: str | None = None, **settings) -> dict:
    """`tiger train-seq2seq` (``Seq2SeqTrainConfig`` fields)."""
    return _run_stage("train-seq2seq", run, preset, settings)


def evaluate(run: str | os.PathLike, *, preset: str | None = None, **settings) -> dict:
    """`tiger evaluate` (``EvaluateConfig`` fields); returns {split: metrics}."""
    return _run_stage("evaluate-tiger", run, preset, settings)


def train_baseline(run: str | os.PathLike, *, preset: str | None = None, **settings) -> dict:
    """`tiger train-baseline` (``BaselineConfig`` fields)."""
    return _run_stage("train-baseline", run, preset, settings)


def compare(run: str | os.PathLike, *, preset: str | None = None, **settings) -> dict:
    """`tiger compare` (``CompareConfig`` fields)."""
    return _run_stage("compare", run, preset, settings)


def serve(run: str | os.PathLike, *, preset: str | None = None, **settings) -> str:
    """`tiger serve` without blocking: deploy on Ray Serve and return the URL. Ray keeps running
    (it serves); ``stop_serving()`` removes the application, ``ray.shutdown()`` ends it all."""
    from tiger_ray.ray_env import init_ray
    from tiger_ray.serving.app import start
    from tiger_ray.serving.settings import PRESETS, ServeConfig

    config = _config(ServeConfig, PRESETS, preset, settings)
    init_ray()
    return start(RunDir(run), config)


def stop_serving(app_name: str | None = None) -> None:
    from tiger_ray.serving.app import stop
    from tiger_ray.serving.settings import ServeConfig

    stop(app_name or ServeConfig().app_name)


class Recommender:
    """A trained model of a run, one user at a time (``retriever`` is the batched protocol)."""

    def __init__(self, retriever):
        self.retriever = retriever

    def recommend(self, history: Sequence[int], k: int = 10, user_id: int = 0) -> list[int]:
        """The top ``k`` item ids after ``history`` (item ids, oldest first)."""
        recs = self.retriever.recommend([np.asarray(history, dtype=np.int64)],
                                        np.array([user_id], dtype=np.int64), k)
        return [int(i) for i in recs.item_ids[0] if i >= 0]

    def recommend_batch(self, histories: Sequence[Sequence[int]], k: int = 10,
                        user_ids: Sequence[int] | None = None):
        """``Recommendations`` (item_ids, scores: [len(histories), k]) for many users at once."""
        users = np.zeros(len(histories), np.int64) if user_ids is None else np.asarray(user_ids, np.int64)
        return self.retriever.recommend([np.asarray(h, dtype=np.int64) for h in histories], users, k)


def load_retriever(run: str | os.PathLike, model: str = "tiger", **options) -> Recommender:
    """The trained ``model`` ("tiger" or "ann") of ``run``; ``options`` as `tiger evaluate`'s
    model options (``beam_size``, ``precision``, ``index_type`` ...)."""
    from tiger_ray.evaluation.evaluate import load

    return Recommender(load(RunDir(run), model, **options))

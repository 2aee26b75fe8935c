"""The large-catalog path at test size: a `tiger synth` catalog through every stage, and no stage
pulls the catalog or the users into the driver.

20,000 items and 10,000 users (~125k interactions) are small enough for CI but large enough that
gathering any of them shows: every stage below runs in this process (the driver) under
``DriverRowCounter``, which counts the rows that reach it through Ray Data and the Parquet/numpy
readers. Rows the driver holds at once must stay under a quarter of the smallest of those counts
(the samples a stage may legitimately hold, validation and evaluated users, are configured below
that); rows it streams in bounded batches may pass at most once over the users and once over the
items (the seq2seq trainer draws its validation sample that way, the evaluation its per-item
category table for the entropy metric).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tiger_ray.config import build_config
from tiger_ray.runs import RunDir
from tiger_ray.testing.driver_rows import DriverRowCounter

N_ITEMS, N_USERS = 20_000, 10_000
ROW_BUDGET = N_USERS // 4  # rows of any kind the driver may see in one stage
EVAL_USERS = 300

pytestmark = pytest.mark.ray  # not slow: issue 19 wants this check in CI


@pytest.fixture(scope="module")
def scale_run(ray_local, tmp_path_factory) -> RunDir:
    from tiger_ray.testing.synthetic import make_large_synthetic_run

    return make_large_synthetic_run(tmp_path_factory.mktemp("scale") / "run", n_items=N_ITEMS,
                                    n_users=N_USERS, dim=16, clusters=16, sub_clusters=8)


def _stage(run_fn, run: RunDir, config, rows_seen: dict, name: str):
    with DriverRowCounter() as rows:
        summary = run_fn(run, config)
    rows_seen[name] = dict(rows.by_call)
    assert rows.held < ROW_BUDGET, (
        f"{name}: the driver held {rows.held} rows (budget {ROW_BUDGET}): {dict(rows.by_call)}")
    assert rows.streamed <= N_USERS + N_ITEMS, (
        f"{name}: {rows.streamed} rows streamed through the driver (at most one pass over the "
        f"{N_USERS} users and one over the {N_ITEMS} items): {dict(rows.by_call)}")
    return summary


def test_every_stage_streams_a_20k_item_catalog(scale_run):
    from tiger_ray.baseline.ann_index import IndexConfig
    from tiger_ray.baseline.config import BaselineConfig
    from tiger_ray.baseline.config import PRESETS as BASELINE_PRESETS
    from tiger_ray.baseline.ray_train import run_train_baseline
    from tiger_ray.evaluation.evaluate import EvaluateConfig, run_evaluate
    from tiger_ray.semantic_ids.config import PRESETS as RQVAE_PRESETS
    from tiger_ray.semantic_ids.config import RQVAEConfig
    from tiger_ray.semantic_ids.ray_train import run_train_rqvae
    from tiger_ray.semantic_ids.table import read_semantic_ids
    from tiger_ray.seq2seq.presets import PRESETS as SEQ2SEQ_PRESETS
    from tiger_ray.seq2seq.presets import Seq2SeqTrainConfig
    from tiger_ray.seq2seq.ray_train import run_train_seq2seq

    run, rows_seen = scale_run, {}
    # 32^3 prefixes for 20k items: few collisions, so the 4th token stays small.
    rqvae = build_config(RQVAEConfig, {"codebook_size": 32, "train_sample": 4000, "steps": 400,
                                       "batch_size": 128, "kmeans_init_size": 1000,
                                       "max_collision_token": 256},
                         RQVAE_PRESETS["tiny"])
    _stage(run_train_rqvae, run, rqvae, rows_seen, "train-rqvae")
    sids = read_semantic_ids(run)
    assert sids.num_items == N_ITEMS and isinstance(sids.codes, np.ndarray)
    assert json.loads((run.semantic_ids / "semantic_ids.json").read_text())["count"] == N_ITEMS

    seq2seq = build_config(Seq2SeqTrainConfig, {"max_steps": 20, "eval_every": 20, "val_users": 200},
                           SEQ2SEQ_PRESETS["tiny"])
    summary = _stage(run_train_seq2seq, run, seq2seq, rows_seen, "train-seq2seq")
    assert summary["steps"] == 20

    evaluate = EvaluateConfig(model="tiger", split=("test",), limit=EVAL_USERS, batch_size=100,
                              workers=1)
    tiger = _stage(run_evaluate, run, evaluate, rows_seen, "evaluate-tiger")["test"]
    assert tiger["count"] == EVAL_USERS and tiger["invalid_id_rate"] == 0

    baseline = build_config(BaselineConfig, {"data": "stream", "loss": "in_batch", "epochs": 1,
                                             "valid_users": 200}, BASELINE_PRESETS["tiny"])
    index = IndexConfig(index_type="ivfpq", ivf_nlist=64, pq_m=4)
    _stage(lambda r, c: run_train_baseline(r, c, index), run, baseline, rows_seen, "train-baseline")
    evaluate_ann = EvaluateConfig(model="ann", split=("test",), limit=EVAL_USERS, batch_size=100,
                                  workers=1)
    ann = _stage(run_evaluate, run, evaluate_ann, rows_seen, "evaluate-ann")["test"]
    assert ann["count"] == EVAL_USERS
    # Something was learned on the synthetic walks (random is 10 / 20,000 = 0.0005).
    assert max(tiger["recall@10"], ann["recall@10"]) > 0.005, (tiger, ann)

"""Serving without Ray: request validation, catalog lookups, batched answering, config and CLI."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import yaml
from pydantic import ValidationError

from serving_helpers import serving_run  # noqa: F401 - the shared tiny run fixture
from tiger_ray.serving.catalog import Catalog
from tiger_ray.serving.models import Query, ServedModel, load_served_model, model_version
from tiger_ray.serving.schema import (
    MAX_HISTORY,
    ApiError,
    RecommendRequest,
    describe_validation_errors,
    field_path,
)
from tiger_ray.serving.settings import PRESETS, ServeConfig


def _errors(body) -> ApiError:
    with pytest.raises(ValidationError) as info:
        RecommendRequest.model_validate(body)
    # FastAPI prefixes body fields with "body"; do the same so the mapping is the one served.
    return describe_validation_errors([{**e, "loc": ("body", *e["loc"])} for e in info.value.errors()])


# ---------------------------------------------------------------- request schema

def test_valid_request_defaults_and_mixed_history():
    req = RecommendRequest.model_validate({"history": [3, "B000000007", 12]})
    assert req.history == [3, "B000000007", 12]
    assert (req.k, req.model, req.user_id, req.temperature) == (10, "tiger", None, None)


@pytest.mark.parametrize("body, field, message", [
    ({}, "history", "Field required"),
    ({"history": "B000000001"}, "history", "valid list"),
    ({"history": []}, "history", "at least 1"),
    ({"history": list(range(1, MAX_HISTORY + 2))}, "history", f"at most {MAX_HISTORY}"),
    ({"history": [1, 2.5]}, "history[1]", "item id (integer) or an ASIN (string), got float"),
    ({"history": [True]}, "history[0]", "got bool"),
    ({"history": [None]}, "history[0]", "got null"),
    ({"history": [{"id": 1}]}, "history[0]", "got dict"),
    ({"history": ["x" * 65]}, "history[0]", "1 to 64 printable characters"),
    ({"history": ["B0\u0000"]}, "history[0]", "1 to 64 printable characters"),
    ({"history": [1], "k": 0}, "k", "greater than or equal to 1"),
    ({"history": [1], "k": 101}, "k", "less than or equal to 100"),
    ({"history": [1], "k": "5"}, "k", "valid integer"),
    ({"history": [1], "k": 5.0}, "k", "valid integer"),
    ({"history": [1], "model": "bert"}, "model", "'tiger' or 'ann'"),
    ({"history": [1], "user_id": -1}, "user_id", "greater than or equal to 0"),
    ({"history": [1], "user_id": "7"}, "user_id", "valid integer"),
    ({"history": [1], "temperature": -0.5}, "temperature", "greater than or equal to 0"),
    ({"history": [1], "temperature": "hot"}, "temperature", "valid number"),
    ({"history": [1], "histroy": [2]}, "histroy", "unknown field"),
    ([1, 2, 3], "body", "must be a JSON object, got an array"),
])
def test_every_bad_field_is_named(body, field, message):
    err = _errors(body)
    assert err.status == 422
    assert [f.field for f in err.fields] == [field]
    assert message in err.fields[0].message and field in str(err)


def test_non_json_bodies_are_400_on_the_body_field():
    not_json = describe_validation_errors([{"type": "json_invalid", "loc": ("body", 1), "msg": "JSON decode error",
                                            "ctx": {"error": "Expecting value"}}])
    assert not_json.status == 400 and "not valid JSON (Expecting value" in str(not_json)
    missing = describe_validation_errors([{"type": "missing", "loc": ("body",), "msg": "Field required"}])
    assert missing.status == 400 and missing.fields[0].field == "body"
    raw = describe_validation_errors([{"type": "model_attributes_type", "loc": ("body",), "msg": "x",
                                       "input": b"history=1"}])
    assert raw.status == 400 and "Content-Type: application/json" in str(raw)


def test_field_paths():
    assert field_path(("body", "history", 3)) == "history[3]"
    assert field_path(("path", "item_id")) == "item_id"
    assert field_path(("body",)) == "body"
    assert field_path(("body", "a", "b", 0)) == "a.b[0]"


# ---------------------------------------------------------------- catalog

def _catalog() -> Catalog:
    return Catalog(pa.table({
        "item_id": pa.array([1, 2, 3, 4], pa.int64()),
        "asin": ["B0A", "0205616461", None, "B0D"],
        "title": ["a", "b", "c", None],
        "brand": [None, "x", None, None],
        "categories": pa.array([[["Beauty", "Eyes"]], None, [], []], pa.list_(pa.list_(pa.string()))),
        "price": [1.5, None, 3.0, None],
    }))


def test_catalog_resolves_ids_and_asins_in_order():
    catalog = _catalog()
    assert catalog.resolve_history([4, "B0A", "0205616461", 3]).tolist() == [4, 1, 2, 3]
    assert catalog.ids_of_asins(["B0D", "nope", "B0A", "B0A\0", ""]).tolist() == [4, 0, 1, 0, 0]
    assert catalog.items(np.array([2, 4])) == [{"item_id": 2, "asin": "0205616461", "title": "b"},
                                               {"item_id": 4, "asin": "B0D", "title": None}]
    assert catalog.details(1) == {"item_id": 1, "asin": "B0A", "title": "a", "brand": None,
                                  "categories": [["Beauty", "Eyes"]], "price": 1.5}
    assert catalog.details(2)["categories"] == [] and catalog.details(5) is None


def test_catalog_reports_every_unknown_item_with_its_position():
    with pytest.raises(ApiError) as info:
        _catalog().resolve_history(["B0A", 0, "B0Z", 2, 10**30, -4])
    err = info.value
    assert err.status == 422 and err.error == "unknown_items"
    assert [f.field for f in err.fields] == ["history[1]", "history[2]", "history[4]", "history[5]"]
    assert "unknown item id 0 (the catalog has ids 1..4)" in err.fields[0].message
    assert "unknown ASIN 'B0Z'" in err.fields[1].message
    assert str(10**30) in err.fields[2].message


def test_catalog_requires_dense_ids():
    with pytest.raises(ValueError, match="item_id must be 1..N"):
        Catalog(pa.table({"item_id": pa.array([1, 3], pa.int64()), "asin": ["a", "b"], "title": ["a", "b"]}))


def _write_items(path, n, parts=1):
    import pyarrow.parquet as pq

    from tiger_ray.data.schema import ITEMS_SCHEMA

    ids = np.arange(1, n + 1)
    table = pa.table({"item_id": ids, "asin": [f"A{i:07d}" for i in ids], "title": [f"t{i}" for i in ids],
                      "brand": [None] * n, "categories": [[["C", str(i % 3)]] for i in ids],
                      "price": [float(i) for i in ids], "text": [f"t{i}" for i in ids]},
                     schema=ITEMS_SCHEMA)
    if parts == 1:
        pq.write_table(table, path)
        return
    path.mkdir()
    for j, lo in enumerate(range(0, n, -(-n // parts))):
        pq.write_table(table.slice(lo, -(-n // parts)), path / f"part-{j:05d}.parquet")


@pytest.mark.parametrize("parts", [1, 3])
def test_catalog_from_run_is_memory_mapped_and_answers_like_the_table(tmp_path, parts):
    from tiger_ray.runs import RunDir

    run = RunDir(tmp_path)
    _write_items(run.items, 1000, parts)
    catalog = Catalog.from_run(run)
    directory = run.root / "serving" / "catalog"
    assert sorted(p.name for p in directory.iterdir()) == [
        "asin_hash.npy", "asin_item.npy", "items.arrow", "source.json"]
    # Zero-copy: the ASIN index is a memory map, not a copy in this process's heap.
    assert isinstance(catalog._asin_index.hashes, np.memmap)
    assert catalog.size == 1000
    assert catalog.ids_of_asins(["A0000999", "A0000001", "nope"]).tolist() == [999, 1, 0]
    assert catalog.details(500)["title"] == "t500" and catalog.details(500)["categories"] == [["C", "2"]]
    assert catalog.items(np.array([7]))[0] == {"item_id": 7, "asin": "A0000007", "title": "t7"}
    # 12 bytes per item for the ASIN index (8-byte hash + 4-byte id).
    assert (directory / "asin_hash.npy").stat().st_size + (directory / "asin_item.npy").stat().st_size \
        < 12 * 1000 + 512


def test_catalog_files_are_rebuilt_when_items_change(tmp_path):
    from tiger_ray.runs import RunDir

    run = RunDir(tmp_path)
    _write_items(run.items, 10)
    assert Catalog.from_run(run).size == 10
    run.items.unlink()
    _write_items(run.items, 20)
    assert Catalog.from_run(run).size == 20


def test_catalog_rejects_items_out_of_order_across_parts(tmp_path):
    from tiger_ray.runs import RunDir

    run = RunDir(tmp_path)
    _write_items(run.items, 30, parts=3)
    parts = sorted(run.items.iterdir())
    parts[0].rename(run.items / "part-99999.parquet")  # first ids now come last
    with pytest.raises(ValueError, match="item_id must be 1..N in row order"):
        Catalog.from_run(run)
    assert not (run.root / "serving" / "catalog").exists()  # nothing half-built left behind


def test_asin_lookup_confirms_hash_matches_on_the_asin_column():
    from tiger_ray.serving.catalog import AsinIndex, hash_strings

    asins = pa.array(["x", "y", "z"])
    # Force a collision: all three share one hash; only the true ASIN may match.
    index = AsinIndex(np.zeros(3, np.uint64), np.array([1, 2, 3], np.uint32))
    index.hashes[:] = hash_strings(pa.array(["y"]))[0]
    assert index.lookup(["y", "z"], asins).tolist() == [2, 0]
    assert hash_strings(pa.array(["B0A", "B0A\0", "", None])).tolist()[:2] != [0, 0]
    assert len(set(hash_strings(pa.array(["B0A", "B0A\0", ""])).tolist())) == 3


# ---------------------------------------------------------------- batched answering with the real models

@pytest.fixture(scope="module")
def served(serving_run):
    return {m: load_served_model(serving_run, m) for m in ("tiger", "ann")}


@pytest.mark.parametrize("model", ["tiger", "ann"])
def test_mixed_batch_equals_one_by_one(served, serving_run, model):
    served_model: ServedModel = served[model]
    assert served_model.window == {"tiger": 20, "ann": 8}[model]  # the tiny presets' windows
    rng = np.random.default_rng(1)
    queries = [Query(rng.integers(1, 65, size=n), user_id=u, k=k)
               for n, u, k in [(3, 1, 10), (30, 2, 5), (1, 0, 10), (12, 4, 3), (7, 5, 5)]]
    batch = served_model.answer(queries)
    for query, answer in zip(queries, batch):
        alone = served_model.answer([query])[0]
        assert answer.error is None and answer.batch_size == len(queries) and alone.batch_size == 1
        assert answer.model_version == served_model.version == model_version(serving_run, model)
        assert answer.item_ids == alone.item_ids and len(answer.item_ids) == query.k
        np.testing.assert_allclose(answer.scores, alone.scores, rtol=1e-5, atol=1e-5)
        assert answer.history_used == min(len(query.history), served_model.window)
        assert answer.scores == sorted(answer.scores, reverse=True)


def test_a_bad_query_does_not_fail_its_batch(served):
    ann = served["ann"]
    good, bad = Query(np.array([1, 2, 3]), 1, 5), Query(np.array([1, 999]), 2, 5)
    answers = ann.answer([good, bad, good])
    assert answers[0].error is None and answers[0].item_ids == answers[2].item_ids
    assert "999" in answers[1].error and answers[1].item_ids == []
    tempered = ann.answer([Query(np.array([1]), 1, 5, temperature=0.5)])[0]
    assert tempered.error_field == "temperature" and "does not take a temperature" in tempered.error


def test_tiger_temperature_is_per_request_and_restored(served):
    tiger = served["tiger"]
    assert tiger.supports_temperature and tiger.retriever.temperature == 0.0
    history = np.array([1, 5, 9, 13])
    beam = tiger.answer([Query(history, 1, 10)])[0]
    sampled = tiger.answer([Query(history, 1, 10, temperature=5.0)] * 6)
    assert tiger.retriever.temperature == 0.0  # the served default is back
    assert all(len(set(a.item_ids)) == 10 for a in sampled)  # k distinct items each
    assert any(a.item_ids != beam.item_ids for a in sampled)  # hot sampling differs from the beam
    assert tiger.answer([Query(history, 1, 10, temperature=0.0)])[0].item_ids == beam.item_ids


def test_model_version_follows_the_files(serving_run, tmp_path):
    version = model_version(serving_run, "tiger")
    assert len(version) == 12 and version == model_version(serving_run, "tiger")
    assert version != model_version(serving_run, "ann")
    assert model_version(type(serving_run)(tmp_path), "tiger") == "unknown"


# ---------------------------------------------------------------- settings, app builder, YAML, CLI

def test_config_validation_and_presets():
    assert ServeConfig().host == "127.0.0.1"
    with pytest.raises(ValueError, match="models"):
        ServeConfig(models=("tiger", "bert"))
    with pytest.raises(ValueError, match="tiger_max_batch_size"):
        ServeConfig(tiger_max_batch_size=0)
    for preset in PRESETS.values():
        ServeConfig(**preset)
    assert ServeConfig(beam_size=30, use_gpu=True).model_options("tiger") == {"beam_size": 30, "device": "cuda"}
    assert ServeConfig().model_options("ann") == {}


def test_app_builder_and_yaml(serving_run, tmp_path):
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    from tiger_ray.serving.app import app_builder

    path = Path(__file__).resolve().parents[1] / "tiger_ray" / "serving" / "serve_config.yaml"
    config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    app_config = config.applications[0]
    assert config.http_options.host == "127.0.0.1"
    args = {**app_config.args, "run": str(serving_run.root), "preset": "tiny"}
    app = call_user_app_builder_with_args_if_necessary(app_builder, args)
    names = {app._bound_deployment.name}
    for handle_app in app._bound_deployment.init_args[1].values():
        names.add(handle_app._bound_deployment.name)
    assert names == {d.name for d in app_config.deployments} == {"RecommenderApi", "TigerModel", "AnnModel"}
    with pytest.raises(ValueError, match=r"unknown fields \['replica'\]"):
        app_builder({"run": str(serving_run.root), "replica": 2})
    (tmp_path / "items.parquet").write_bytes(serving_run.items.read_bytes())  # a run without models
    with pytest.raises(FileNotFoundError, match="tiger train-seq2seq"):
        app_builder({"run": str(tmp_path), "models": ["tiger"]})


def test_use_gpu_gives_each_model_replica_a_gpu(serving_run):
    # What serve_config.yaml's commented num_gpus lines restate when they override ray_actor_options.
    from tiger_ray.serving.app import app_builder

    app = app_builder({"run": str(serving_run.root), "use_gpu": True})
    for model in app._bound_deployment.init_args[1].values():
        assert model._bound_deployment.ray_actor_options["num_gpus"] == 1
    assert app._bound_deployment.ray_actor_options.get("num_gpus", 0) == 0  # the ingress needs none


class FakeServe:
    """The part of ``ray.serve`` that ``stop`` uses, recording what it was asked to do."""

    def __init__(self, apps):
        self.apps, self.calls = set(apps), []

    def status(self):
        return SimpleNamespace(applications={name: None for name in self.apps})

    def delete(self, name):
        self.calls.append(f"delete {name}")
        self.apps.discard(name)

    def shutdown(self):
        self.calls.append("shutdown")
        self.apps.clear()


@pytest.mark.parametrize("apps, owns_ray, calls", [
    ({"tiger", "other"}, False, ["delete tiger"]),       # a shared cluster: only our app goes
    ({"tiger"}, False, ["delete tiger"]),                # ... even the last one: Serve stays up
    ({"tiger"}, True, ["delete tiger", "shutdown"]),     # our own local Ray: Serve goes too
    ({"tiger", "other"}, True, ["delete tiger"]),        # ... unless another app is still on it
    (set(), True, ["shutdown"]),                         # start() failed before deploying
    (set(), False, []),
])
def test_stop_deletes_only_our_app(monkeypatch, apps, owns_ray, calls):
    from tiger_ray.serving import app

    fake = FakeServe(apps)
    monkeypatch.setattr(app, "serve", fake)
    monkeypatch.setattr(app, "owns_local_ray", lambda: owns_ray)
    app.stop("tiger")
    assert fake.calls == calls


def test_cli_flags(tmp_path, capsys, monkeypatch):
    from tiger_ray import cli

    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    parser = cli.build_parser()
    args = parser.parse_args(["serve", "--run", "r", "--models", "ann", "--port", "9000",
                              "--tiger-max-batch-size", "4", "--no-blocking"])
    assert args.models == ["ann"] and args.port == 9000 and args.blocking is False
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--run", "r", "--models", "tiger,bert"])
    assert "choose from tiger, ann" in capsys.readouterr().err
    code = cli.main(["serve", "--run", str(tmp_path), "--detach"])
    assert code == 2 and "--detach needs a running Ray cluster" in capsys.readouterr().err


def test_demo_request_is_a_real_test_split_history(serving_run, tmp_path):
    from tiger_ray.data.schema import read_sequences
    from tiger_ray.runs import RunDir
    from tiger_ray.serving.demo import demo_request, serve_demo, trained_models

    assert trained_models(serving_run) == ("tiger", "ann")
    with pytest.raises(FileNotFoundError, match="no trained model"):
        serve_demo(RunDir(tmp_path))

    body, target = demo_request(serving_run)
    seq = read_sequences(serving_run.sequences)[0]
    assert target == seq[-1] and body["user_id"] == 1
    assert body["history"] == [f"B{i:09d}" for i in seq[:-1][-20:]]
    json.dumps(body)

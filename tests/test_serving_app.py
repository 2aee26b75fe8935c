"""The served API end to end: Ray Serve on 127.0.0.1 with a tiny trained run (TIGER + ANN)."""

from __future__ import annotations

import concurrent.futures as futures
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests

from serving_helpers import free_port, serving_run  # noqa: F401 - the shared tiny run fixture
from tiger_ray.config import build_config
from tiger_ray.serving.client import ServingError, TigerClient
from tiger_ray.serving.settings import PRESETS, ServeConfig

pytestmark = pytest.mark.ray

MODELS = ("tiger", "ann")


@pytest.fixture(scope="module")
def service(ray_local, serving_run):
    from tiger_ray.serving.app import start, stop

    config = build_config(ServeConfig, {"port": free_port()}, PRESETS["tiny"])
    url = start(serving_run, config)
    try:
        with TigerClient(url) as client:
            client.wait_until_ready(timeout=120)
        yield url, config
    finally:
        stop(config.app_name)


@pytest.fixture
def http():
    with requests.Session() as session:
        session.trust_env = False  # loopback traffic never goes through an environment proxy
        yield session


def _post(http, url, body, **kwargs):
    return http.post(url + "/recommend", json=body, timeout=60, **kwargs)


def test_valid_request_returns_ranked_items_with_metadata(service, serving_run, http):
    url, _ = service
    items = pq.read_table(serving_run.items).to_pylist()
    info = http.get(url + "/info", timeout=30).json()
    versions = {m["model"]: m["version"] for m in info["models"]}
    for model in MODELS:
        response = _post(http, url, {"history": [1, "B000000005", 9], "user_id": 3, "k": 7, "model": model})
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["model"], body["k"], body["user_id"]) == (model, 7, 3)
        assert body["model_version"] == versions[model] != "unknown"
        assert body["history_length"] == body["history_used"] == 3 and body["batch_size"] >= 1
        ranked = body["items"]
        assert [r["rank"] for r in ranked] == list(range(1, 8))
        assert len({r["item_id"] for r in ranked}) == 7
        scores = [r["score"] for r in ranked]
        assert scores == sorted(scores, reverse=True)
        for r in ranked:  # metadata straight from items.parquet
            row = items[r["item_id"] - 1]
            assert (r["asin"], r["title"]) == (row["asin"], row["title"])


@pytest.mark.parametrize("body, status, field, message", [
    ({}, 422, "history", "Field required"),
    ({"history": "B000000001"}, 422, "history", "valid list"),
    ({"history": [1, 2.5]}, 422, "history[1]", "item id (integer) or an ASIN (string)"),
    ({"history": []}, 422, "history", "at least 1"),
    ({"history": [1] * 1001}, 422, "history", "at most 1000"),
    ({"history": [1, 999, "NOPE"]}, 422, "history[1]", "unknown item id 999"),
    ({"history": [1], "k": 0}, 422, "k", "greater than or equal to 1"),
    ({"history": [1], "k": 101}, 422, "k", "less than or equal to 100"),
    ({"history": [1], "k": "10"}, 422, "k", "valid integer"),
    ({"history": [1], "model": "bert"}, 422, "model", "'tiger' or 'ann'"),
    ({"history": [1], "model": "ann", "temperature": 0.7}, 422, "temperature", "does not take a temperature"),
    ({"history": [1], "user_id": "u1"}, 422, "user_id", "valid integer"),
    ({"history": [1], "hisotry": [1]}, 422, "hisotry", "unknown field"),
    ([1, 2], 422, "body", "must be a JSON object"),
], ids=lambda v: json.dumps(v)[:40] if isinstance(v, (dict, list)) else str(v))
def test_bad_json_requests_are_422_naming_the_field(service, http, body, status, field, message):
    response = _post(http, service[0], body)
    assert response.status_code == status, response.text
    error = response.json()
    assert field in [f["field"] for f in error["fields"]]
    assert message in error["message"]


def test_unknown_items_are_all_reported_by_id(service, http):
    error = _post(http, service[0], {"history": [1, 999, "NOPE", 2, 0]}).json()
    assert error["error"] == "unknown_items"
    assert {f["field"]: f["message"] for f in error["fields"]} == {
        "history[1]": "unknown item id 999 (the catalog has ids 1..64)",
        "history[2]": "unknown ASIN 'NOPE'",
        "history[4]": "unknown item id 0 (the catalog has ids 1..64)"}


def test_bodies_that_are_not_json_or_too_large_are_4xx(service, http):
    url, config = service
    cases = {
        "not JSON": dict(data=b'{"history": [1,', headers={"Content-Type": "application/json"}),
        "text/plain": dict(data=b'{"history": [1]}', headers={"Content-Type": "text/plain"}),
        "form": dict(data={"history": "1"}),
        "empty": dict(data=b"", headers={"Content-Type": "application/json"}),
    }
    for name, kwargs in cases.items():
        response = http.post(url + "/recommend", timeout=30, **kwargs)
        assert response.status_code == 400, (name, response.text)
        assert response.json()["fields"][0]["field"] == "body", name
    big = json.dumps({"history": ["B000000001"] * 20000}).encode()
    assert len(big) > config.max_body_bytes
    declared = http.post(url + "/recommend", data=big, headers={"Content-Type": "application/json"}, timeout=30)
    chunked = http.post(url + "/recommend", data=iter([big[i:i + 8192] for i in range(0, len(big), 8192)]),
                        headers={"Content-Type": "application/json"}, timeout=30)
    for response in (declared, chunked):
        assert response.status_code == 413, response.text
        assert response.json()["error"] == "body_too_large"
        assert str(config.max_body_bytes) in response.json()["message"]


def test_routes_items_info_health_and_docs(service, serving_run, http):
    url, config = service
    assert http.get(url + "/items/3", timeout=30).json() == {
        "item_id": 3, "asin": "B000000003", "title": "tent model 3", "brand": "brand2",
        "categories": [["Synthetic", "Tent"]], "price": 8.0}
    assert http.get(url + "/items/asin/B000000003", timeout=30).json()["item_id"] == 3
    for path, status, field in [("/items/0", 404, "item_id"), ("/items/65", 404, "item_id"),
                                ("/items/abc", 422, "item_id"), ("/items/asin/NOPE", 404, "asin")]:
        response = http.get(url + path, timeout=30)
        assert response.status_code == status and response.json()["fields"][0]["field"] == field, path
    assert http.get(url + "/recommend", timeout=30).status_code == 405
    assert http.get(url + "/nowhere", timeout=30).json()["error"] == "not_found"
    info = http.get(url + "/info", timeout=30).json()
    assert info["run"] == str(serving_run.root) and info["catalog_size"] == 64
    assert {m["model"]: (m["window"], m["max_batch_size"]) for m in info["models"]} == {
        "tiger": (20, config.tiger_max_batch_size), "ann": (8, config.ann_max_batch_size)}
    assert info["limits"] == {"max_history": 1000, "max_k": 100, "max_body_bytes": config.max_body_bytes}
    assert http.get(url + "/healthz", timeout=30).json() == {"status": "ok", "models": ["tiger", "ann"]}
    schema = http.get(url + "/openapi.json", timeout=30).json()
    assert {"/recommend", "/items/{item_id}", "/info", "/healthz"} <= set(schema["paths"])
    assert http.get(url + "/docs", timeout=30).status_code == 200


def test_long_history_is_cut_to_the_most_recent_window(service, http):
    url, _ = service
    rng = np.random.default_rng(0)
    history = rng.integers(1, 65, size=300).tolist()
    for model, window in (("tiger", 20), ("ann", 8)):
        full = _post(http, url, {"history": history, "user_id": 5, "model": model}).json()
        recent = _post(http, url, {"history": history[-window:], "user_id": 5, "model": model}).json()
        assert (full["history_length"], full["history_used"]) == (300, window)
        assert [r["item_id"] for r in full["items"]] == [r["item_id"] for r in recent["items"]]


def _send_all(url: str, bodies: list[dict], workers: int) -> list[requests.Response]:
    def send(body):
        with requests.Session() as session:
            session.trust_env = False
            return session.post(url + "/recommend", json=body, timeout=120)

    with futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(send, bodies))


@pytest.mark.parametrize("model", MODELS)
def test_concurrent_requests_are_batched_and_each_caller_gets_its_own_answer(service, http, model):
    url, _ = service
    rng = np.random.default_rng(7)
    bodies = [{"history": rng.integers(1, 65, size=int(rng.integers(1, 25))).tolist(), "user_id": u,
               "k": int(rng.choice([5, 10])), "model": model} for u in range(1, 33)]
    alone = [_post(http, url, body).json() for body in bodies]
    together = _send_all(url, bodies, workers=len(bodies))
    batch_sizes = []
    for body, single, response in zip(bodies, alone, together):
        assert response.status_code == 200, response.text
        got = response.json()
        assert got["user_id"] == body["user_id"] and len(got["items"]) == body["k"]
        assert [r["item_id"] for r in got["items"]] == [r["item_id"] for r in single["items"]]
        np.testing.assert_allclose([r["score"] for r in got["items"]],
                                   [r["score"] for r in single["items"]], rtol=1e-4, atol=1e-4)
        batch_sizes.append(got["batch_size"])
    assert max(batch_sizes) > 1, "concurrent requests were never batched together"
    assert all(b == 1 for b in (s["batch_size"] for s in alone))


def _replica_actor_ids() -> dict[str, set[str]]:
    """Live replica actors per deployment. Serve starts replicas with max_restarts=0, so a crashed
    replica is replaced by one with a new name."""
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    return {d: {n for n in names if n.startswith(f"SERVE_REPLICA::tiger#{d}#")}
            for d in ("RecommenderApi", "TigerModel", "AnnModel")}


def test_replicas_survive_a_burst_of_malformed_requests(service, http):
    url, _ = service
    valid = {"history": [2, 6, 10], "user_id": 9, "k": 5}
    before = _post(http, url, valid).json()
    replicas = _replica_actor_ids()
    assert all(len(ids) == 1 for ids in replicas.values()), replicas
    malformed = [
        {"history": [{"nested": [1] * 50}]}, {"history": [1] * 5000}, {"history": [-1, 10**40]},
        {"history": ["\u0000" * 10]}, {"history": [1], "k": 10**20}, {"history": [1], "temperature": -1e308},
        {"history": [1], "model": None}, {"history": [None] * 100}, "history", None, 12,
        {"history": [1], "model": "ann", "temperature": 1.0}, {"history": [1], "user_id": 2**70},
    ]
    responses = _send_all(url, malformed * 12, workers=24)
    statuses = [r.status_code for r in responses]
    assert all(400 <= s < 500 for s in statuses), sorted(set(statuses))
    raw = [b"\xff\xfe garbage", b'{"history": [1]' * 100, b"[" * 5000 + b"]" * 5000]
    for payload in raw * 5:
        response = http.post(url + "/recommend", data=payload, headers={"Content-Type": "application/json"},
                             timeout=30)
        assert 400 <= response.status_code < 500, response.text
    after = _post(http, url, valid)
    assert after.status_code == 200 and after.json()["items"] == before["items"]
    assert _replica_actor_ids() == replicas  # same replicas, none restarted


@pytest.mark.parametrize("model", MODELS)
def test_served_answers_equal_evaluate_retriever_predictions(service, serving_run, model):
    from tiger_ray.data.schema import read_sequences
    from tiger_ray.data.split import eval_example
    from tiger_ray.retrievers import load_retriever
    from tiger_ray.evaluation.retrieval import evaluate_retriever

    evaluate_retriever(load_retriever(serving_run, model), serving_run, "test", k=10, progress=False)
    predictions = pq.read_table(serving_run.eval_dir(model, "test") / "predictions.parquet").to_pylist()
    sequences = read_sequences(serving_run.sequences)
    users = {int(u): i for i, u in enumerate(sequences.user_ids)}
    chosen = predictions[:: len(predictions) // 16][:16]
    bodies = []
    for row in chosen:
        history, target = eval_example(sequences[users[row["user_id"]]], "test")
        assert target == row["target"]
        bodies.append({"history": history.tolist(), "user_id": row["user_id"], "k": 10, "model": model})
    for row, response in zip(chosen, _send_all(service[0], bodies, workers=8)):
        served = response.json()["items"]
        assert [r["item_id"] for r in served] == row["item_ids"], row["user_id"]
        np.testing.assert_allclose([r["score"] for r in served], row["scores"], rtol=1e-4, atol=1e-4)


def test_python_client(service):
    with TigerClient(service[0]) as client:
        result = client.recommend(["B000000001", 5], k=3, model="ann", user_id=1)
        assert len(result["items"]) == 3
        assert client.item(5)["asin"] == "B000000005"
        assert client.item_by_asin("B000000005")["item_id"] == 5
        assert client.health()["status"] == "ok"
        with pytest.raises(ServingError) as info:
            client.recommend([1, 70])
        assert info.value.status == 422 and info.value.fields[0]["field"] == "history[1]"
        assert "unknown item id 70" in str(info.value)


def test_load_tool_reports_both_models(service, serving_run):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "load_test.py"
    spec = importlib.util.spec_from_file_location("load_test", path)
    load_test = sys.modules["load_test"] = importlib.util.module_from_spec(spec)  # dataclasses need it
    spec.loader.exec_module(load_test)
    results = load_test.run_load_test(service[0], serving_run.root, ["tiger", "ann"], [1, 8],
                                      count=40, warmup=4, max_seconds=120)
    assert [(r.model, r.concurrency) for r in results] == [("tiger", 1), ("tiger", 8), ("ann", 1), ("ann", 8)]
    for r in results:
        assert r.requests == 40 and r.errors == 0, r.error_examples
        assert r.qps > 0 and 0 < r.p50_ms <= r.p95_ms <= r.p99_ms <= r.max_ms
        assert r.mean_batch_size >= 1
    with pytest.raises(ValueError, match="only loopback"):
        load_test.run_load_test("http://10.1.2.3:8000", serving_run.root, ["ann"], [1], count=1)

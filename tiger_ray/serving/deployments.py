"""Ray Serve deployments: one model deployment per retriever, and the FastAPI ingress before them.

    HTTP proxy -> RecommenderApi (FastAPI: validation, catalog lookups)
                    -> TigerModel  (ModelDeployment, @serve.batch, constrained beam search)
                    -> AnnModel    (ModelDeployment, @serve.batch, dual encoder + FAISS)

Dynamic batching: concurrent ``recommend`` calls reaching a model replica are collected by
``@serve.batch`` (up to ``max_batch_size`` or ``batch_wait_timeout_s``) and answered by one
``Retriever.recommend`` call per (k, temperature) group; every caller gets its own answer back.
Both batch settings are the deployment's ``user_config``, so ``serve deploy`` can change them on a
running cluster without restarting replicas.
"""

from __future__ import annotations

import asyncio
import logging

from ray import serve
from ray.serve.handle import DeploymentHandle

from tiger_ray.runs import RunDir
from tiger_ray.serving.catalog import Catalog
from tiger_ray.serving.models import Answer, Query, load_served_model
from tiger_ray.serving.schema import (
    MAX_HISTORY,
    MAX_K,
    ApiError,
    HealthResponse,
    InfoResponse,
    ItemDetails,
    ModelInfo,
    RankedItem,
    RecommendRequest,
    RecommendResponse,
)

log = logging.getLogger(__name__)

DEPLOYMENT_NAMES = {"tiger": "TigerModel", "ann": "AnnModel", "hybrid": "HybridModel"}
INGRESS_NAME = "RecommenderApi"
HEALTH_TIMEOUT_S = 10.0


@serve.deployment
class ModelDeployment:
    """One retriever (loaded via the model registry (tiger_ray/retrievers.py)) behind a batched ``recommend``."""

    def __init__(self, run_dir: str, model: str, options: dict | None = None,
                 loader: str | None = None, torch_threads: int = 1):
        import torch

        torch.set_num_threads(max(1, int(torch_threads)))
        if (options or {}).get("device") == "cuda" and not torch.cuda.is_available():
            # Typically a Serve config whose ray_actor_options (which replace ours) lack num_gpus.
            raise RuntimeError(f"{model}: use_gpu is set but this replica sees no CUDA device; give "
                               "the deployment ray_actor_options {num_gpus: 1}")
        self.served = load_served_model(RunDir(run_dir), model, options, loader)
        self.batching = {"max_batch_size": 32, "batch_wait_timeout_s": 0.005}  # as decorated below

    def reconfigure(self, user_config: dict) -> None:
        """Serve calls this with the deployment's ``user_config`` at start and on every update."""
        if "max_batch_size" in user_config:
            self.batching["max_batch_size"] = int(user_config["max_batch_size"])
            self.answer_batch.set_max_batch_size(self.batching["max_batch_size"])
        if "batch_wait_timeout_s" in user_config:
            self.batching["batch_wait_timeout_s"] = float(user_config["batch_wait_timeout_s"])
            self.answer_batch.set_batch_wait_timeout_s(self.batching["batch_wait_timeout_s"])

    def describe(self) -> dict:
        return {**self.served.describe(), **self.batching}

    async def recommend(self, query: Query) -> Answer:
        return await self.answer_batch(query)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def answer_batch(self, queries: list[Query]) -> list[Answer]:
        # Decode in a worker thread so the replica's event loop keeps accepting (and batching)
        # requests and answering health checks while the model runs.
        return await asyncio.to_thread(self.served.answer, queries)


@serve.deployment
@serve.ingress()
class RecommenderApi:
    """HTTP ingress: validates requests, maps ids/ASINs via the catalog, calls a model deployment."""

    def __init__(self, run_dir: str, models: dict[str, DeploymentHandle], settings: dict):
        self.run = RunDir(run_dir)
        self.catalog = Catalog.from_run(self.run)
        self.models = models
        self.settings = settings

    def __serve_build_asgi_app__(self):
        from tiger_ray.serving.api import build_http_app

        return build_http_app(self, max_body_bytes=int(self.settings["max_body_bytes"]))

    # ---- the service behind the routes (see api.py)
    async def recommend(self, body: RecommendRequest) -> RecommendResponse:
        handle = self.models.get(body.model)
        if handle is None:
            raise ApiError(422, [("model", f"{body.model!r} is not served here; served: "
                                               f"{', '.join(self.models)}")], error="model_not_served")
        history = self.catalog.resolve_history(body.history)
        query = Query(history=history, user_id=body.user_id or 0, k=body.k, temperature=body.temperature)
        answer: Answer = await handle.recommend.remote(query)
        if answer.error:
            raise ApiError(422, [(answer.error_field, answer.error)], error="rejected_by_model")
        items = [RankedItem(rank=rank, score=score, **meta) for rank, (meta, score) in
                 enumerate(zip(self.catalog.items(answer.item_ids), answer.scores), start=1)]
        return RecommendResponse(
            model=body.model, model_version=answer.model_version, user_id=body.user_id, k=body.k,
            history_length=len(history), history_used=answer.history_used,
            batch_size=answer.batch_size, items=items)

    def item(self, item_id: int) -> ItemDetails:
        details = self.catalog.details(item_id)
        if details is None:
            raise ApiError(404, [("item_id", f"unknown item id {item_id} (the catalog has ids "
                                                 f"1..{self.catalog.size})")], error="not_found")
        return ItemDetails(**details)

    def item_by_asin(self, asin: str) -> ItemDetails:
        item_id = int(self.catalog.ids_of_asins([asin])[0])
        if not item_id:
            raise ApiError(404, [("asin", f"unknown ASIN {asin!r}")], error="not_found")
        return self.item(item_id)

    async def info(self) -> InfoResponse:
        models = []
        for name, handle in self.models.items():
            described = await handle.describe.remote()  # one replica's live settings
            models.append(ModelInfo(
                model=name, version=described["version"], window=described["window"],
                replicas=int(self.settings[f"{name}_replicas"]),
                max_batch_size=described["max_batch_size"],
                batch_wait_timeout_s=described["batch_wait_timeout_s"],
                options=described["options"]))
        return InfoResponse(run=str(self.run.root), catalog_size=self.catalog.size, models=models,
                            limits={"max_history": MAX_HISTORY, "max_k": MAX_K,
                                    "max_body_bytes": int(self.settings["max_body_bytes"])})

    async def health(self) -> HealthResponse:
        try:
            await asyncio.wait_for(asyncio.gather(*(h.describe.remote() for h in self.models.values())),
                                   timeout=HEALTH_TIMEOUT_S)
        except Exception as err:  # noqa: BLE001 - any failure means "not healthy"
            raise ApiError(503, [("models", f"a model replica did not answer: {err!r}")],
                               error="unavailable") from err
        return HealthResponse(status="ok", models=list(self.models))

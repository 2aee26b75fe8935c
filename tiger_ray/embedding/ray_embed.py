"""`tiger embed` on Ray Data: items.parquet -> a pool of encoder actors -> Parquet shards + manifest.

    read_parquet(items.parquet) -> drop items already on disk -> blocks of shard_size rows
        -> map_batches(ShardEncoder, ActorPoolStrategy(min_size, max_size)): encode, write one shard
        -> a one-row summary per shard back to the driver (progress bar, then the manifest)

Each actor loads the model once and writes its shards itself, so embeddings never pass through
the driver. A re-run with the same model, normalisation and items.parquet keeps every complete
shard and encodes only the rest; anything else (another model, a half-written file) is replaced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import time
from pathlib import Path

import numpy as np

from tiger_ray import atomic
from tiger_ray.embedding.config import PRESETS, EmbedConfig
from tiger_ray.embedding.encoder import check_model, encode, load_encoder, resolve_model
from tiger_ray.embedding.plan import AliasMap, IdRanges, TextGroups, file_sha256, text_groups
from tiger_ray.embedding.store import (MANIFEST, ShardInfo, read_manifest_json, scan_shards,
                                       write_manifest, write_shard)
from tiger_ray.runs import RunDir

__all__ = ["EmbedConfig", "PRESETS", "ShardEncoder", "run_embed", "source_key"]

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"


def source_key(items: Path, config: EmbedConfig) -> dict:
    """What a shard's vectors depend on; shards with another key are never reused."""
    return {"model": resolve_model(config.model), "normalized": bool(config.normalize),
            "items_sha256": file_sha256(items)}


class ShardEncoderError(RuntimeError):
    """An encoder actor could not encode a batch (raised inside the actor)."""


class ShardEncoder:
    """Ray Data actor: loads the encoder once, then turns each batch of items into one shard file."""

    def __init__(self, directory: str, model: str, device: str, threads: int, batch_size: int,
                 normalize: bool, allow_download: bool, key: dict, aliases: AliasMap):
        import torch

        if device == "cpu":
            torch.set_num_threads(threads)
        self.encoder = load_encoder(model, device=device, allow_download=allow_download)
        self.directory, self.batch_size, self.normalize = Path(directory), batch_size, normalize
        self.key, self.aliases = key, aliases

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        ids = np.asarray(batch["item_id"], dtype=np.int64)
        try:
            vectors = encode(self.encoder, [str(t) for t in batch["text"]], self.batch_size, self.normalize)
        except Exception as err:  # name the items, so the bad input can be found
            raise ShardEncoderError(
                f"encoding the {len(ids)} items with item_id {ids.min()}..{ids.max()} with "
                f"{self.key['model']} failed: {type(err).__name__}: {err}") from err
        alias_ids, source = self.aliases.expand(ids)  # same text: an exact copy of the vector
        name = write_shard(self.directory, np.concatenate([ids, alias_ids]),
                           np.concatenate([vectors, vectors[source]]), self.key)
        return {"file": np.array([name]), "items": np.array([len(ids) + len(alias_ids)]),
                "encoded": np.array([len(ids)]), "dim": np.array([vectors.shape[1]]),
                "seconds": np.array([time.perf_counter() - start])}


def _keep(batch, skip: IdRanges):
    """Rows of a pyarrow batch whose item is neither on disk already nor an alias."""
    import pyarrow as pa

    return batch.filter(pa.array(~skip.contains(batch.column("item_id").to_numpy())))


@contextlib.contextmanager
def _quiet_ray_data():
    # Our own progress bar counts items; Ray Data's per-operator bars would interleave with it.
    from ray.data import DataContext

    ctx = DataContext.get_current()
    before = ctx.enable_progress_bars
    ctx.enable_progress_bars = False
    try:
        yield
    finally:
        ctx.enable_progress_bars = before


@dataclasses.dataclass(frozen=True)
class ActorPool:
    """The encoder actor pool to run, and what to ask a cluster's autoscaler for."""
    min_size: int  # actors that fit the cluster now (at least 1: the pool waits for its first)
    max_size: int  # actors wanted; the pool grows to this as the autoscaler adds nodes
    resources: dict  # Ray resources of one actor, as map_batches takes them
    request: list[dict]  # bundles for request_resources, one per actor; empty when all fit now


def plan_actor_pool(config: EmbedConfig, cluster: dict, can_autoscale: bool, shards: int) -> ActorPool:
    """Size the pool from the cluster's resources (``ray.cluster_resources()``).

    Actors that do not fit would wait forever on a Ray that cannot grow, so there it fails now;
    on a cluster that can add nodes it asks the autoscaler for them and lets the pool wait.
    """
    if config.use_gpu:
        have = int(cluster.get("GPU", 0))
        wanted = config.workers or have or 1  # 0 workers: one per GPU (one if there is none yet)
        per_actor, bundle = {"num_gpus": 1}, {"GPU": 1}  # Ray Data: num_cpus beside num_gpus is experimental
        fit_now = min(wanted, have)
        error = (f"--use-gpu with {config.workers or 'one per GPU'} encoder actors, but the Ray "
                 f"cluster has {have} GPUs; lower --workers or run without --use-gpu")
    else:
        have = float(cluster.get("CPU", 0))
        wanted, per = config.workers, config.cpus_per_worker
        per_actor, bundle = {"num_cpus": per}, {"CPU": per}
        fit_now = wanted if wanted * per <= have else int(have / per + 1e-9)
        error = (f"{config.workers} encoder actors x {per} CPUs do not fit in the Ray cluster's "
                 f"{have:g} CPUs; lower --workers or --cpus-per-worker")
    if wanted > fit_now and not can_autoscale:
        raise ValueError(error)
    # No more actors than shards: each one costs a process, torch imports and a model load.
    wanted = max(1, min(wanted, shards))
    fit_now = min(fit_now, wanted)
    request = [] if fit_now == wanted else [dict(bundle) for _ in range(wanted)]
    return ActorPool(max(1, fit_now), wanted, per_actor, request)


@contextlib.contextmanager
def _autoscaler_request(bundles: list[dict]):
    """Ask the autoscaler to fit ``bundles`` for this block, then withdraw the request (it would
    otherwise keep the nodes up: a request stays until the next one replaces it)."""
    if not bundles:
        yield
        return
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)
    log.info("asked the autoscaler to fit %d encoder actors (%s each); the actor pool grows as nodes "
             "join (on a cluster that cannot add nodes it waits: lower --workers)", len(bundles), bundles[0])
    try:
        yield
    finally:
        request_resources(bundles=[])


def _encode_pending(run: RunDir, config: EmbedConfig, key: dict, skip: IdRanges, aliases: AliasMap,
                    total: int) -> list[dict]:
    """The Ray Data pass: returns one summary per shard written."""
    import ray
    from tqdm.auto import tqdm

    from tiger_ray.ray_env import owns_local_ray

    shards_to_write = -(-(total - len(aliases.alias)) // config.shard_size)
    # A Ray this process started cannot add nodes; a cluster we connected to may autoscale.
    pool = plan_actor_pool(config, ray.cluster_resources(), can_autoscale=not owns_local_ray(),
                           shards=shards_to_write)
    with _quiet_ray_data():  # a Dataset keeps the DataContext it was created with
        ds = _pipeline(run, config, key, skip, aliases, pool)
    shards: list[dict] = []
    progress = tqdm(total=total, unit="item", desc="embed", smoothing=0.1)
    with _autoscaler_request(pool.request), progress as bar:
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for row in range(len(batch["file"])):
                    shards.append({k: np.asarray(batch[k][row]).item() for k in batch})
                    bar.update(shards[-1]["items"])
        except Exception as err:
            # Ray Data has stopped the actors; a writer killed mid-shard left only a temp file.
            for path in run.embeddings.glob(".part-*.tmp-*"):
                path.unlink(missing_ok=True)
            raise RuntimeError(
                f"embedding failed, the encoder actors failed: {_root_cause(err).rstrip('.')}. Shards finished "
                f"before the failure are complete and kept; once the cause is fixed, re-run `tiger "
                f"embed --run {run.root}` to encode the rest") from err
    return shards


def _root_cause(err: BaseException) -> str:
    """The actor's own error message, dug out of Ray's wrappers (their text holds the traceback)."""
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        chain.append(err)
        err = getattr(err, "cause", None) or err.__cause__
    errors = [m.groups() for e in chain for m in re.finditer(
        r"^\s*(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.+)$", str(e), re.MULTILINE)]
    ours = [msg for name, msg in errors if name in ("ShardEncoderError", "EncoderLoadError")]
    if ours:
        return ours[-1]
    return ": ".join(errors[-1]) if errors else f"{type(chain[-1]).__name__}: {chain[-1]}"


def _pipeline(run: RunDir, config: EmbedConfig, key: dict, skip: IdRanges, aliases: AliasMap,
              pool: ActorPool):
    import ray

    ds = ray.data.read_parquet(str(run.items)).select_columns(["item_id", "text"])
    if len(skip):
        ds = ds.map_batches(_keep, fn_kwargs={"skip": skip}, batch_format="pyarrow", batch_size=None)
    # Blocks of shard_size rows: each actor call gets one, and both actors get work even when
    # items.parquet is a single row group.
    ds = ds.repartition(target_num_rows_per_block=config.shard_size)
    ds = ds.map_batches(
        ShardEncoder, batch_size=config.shard_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=pool.min_size, max_size=pool.max_size),
        **pool.resources,
        fn_constructor_kwargs=dict(
            directory=str(run.embeddings), model=config.model,
            device="cuda" if config.use_gpu else "cpu", threads=config.threads_per_worker,
            batch_size=config.batch_size, normalize=config.normalize,
            allow_download=config.allow_download, key=key, aliases=aliases))
    return ds


def _trusted_shards(directory: Path, key: dict, groups: TextGroups) -> tuple[list[ShardInfo], list[Path]]:
    """Shards a re-run keeps, and the files it must delete first."""
    scan = scan_shards(directory, key)
    trusted, untrusted = list(scan.trusted), list(scan.untrusted)
    while trusted:
        done = np.concatenate([s.item_ids for s in trusted])
        # Our shards hold whole text groups and only catalog items; anything else is not ours.
        bad = np.concatenate([groups.partial_groups(done), done[~np.isin(done, groups.item_ids)]])
        if len(bad) == 0:
            break
        drop = [s for s in trusted if np.isin(s.item_ids, bad).any()]
        trusted = [s for s in trusted if s not in drop]
        untrusted += [directory / s.name for s in drop]
    return trusted, untrusted


def run_embed(run: RunDir, config: EmbedConfig) -> dict:
    """The `tiger embed` stage: embed every item of RUN/items.parquet into RUN/embeddings/."""
    from tiger_ray.ray_env import ray_session

    items = run.require(run.items, "tiger prepare")
    check_model(config.model, config.allow_download)  # a missing model fails here, before Ray
    start = time.perf_counter()
    directory = run.embeddings
    directory.mkdir(parents=True, exist_ok=True)
    key = source_key(items, config)
    groups = text_groups(items)
    total = len(groups.item_ids)
    if total == 0:
        raise ValueError(f"{items}: no items to embed")

    trusted, untrusted = _trusted_shards(directory, key, groups)
    done = np.concatenate([s.item_ids for s in trusted]) if trusted else np.zeros(0, np.int64)
    manifest = read_manifest_json(directory)
    files = sorted(s.name for s in trusted)
    up_to_date = (not untrusted and len(done) == total and manifest is not None
                  and manifest.get("source") == key and manifest.get("files") == files)
    if not up_to_date:
        # The manifest goes first: from here until it is rewritten, readers see "not embedded yet".
        (directory / MANIFEST).unlink(missing_ok=True)
        for path in untrusted:
            log.info("removing %s (not a complete shard of %s)", path.name, key["model"])
            path.unlink(missing_ok=True)
    shards: list[dict] = []
    pending = total - len(done)
    if pending and trusted:
        log.info("keeping %d complete shards (%d items) from an earlier run", len(trusted), len(done))
    if pending:
        aliases = groups.aliases
        skip = IdRanges.from_ids(np.concatenate([done, aliases.alias]))
        todo = ~np.isin(aliases.canonical, done)
        log.info("embedding %d of %d items with %s on %s %s actors", pending, total, key["model"],
                 config.workers or "one per GPU:", "GPU" if config.use_gpu else "CPU")
        with ray_session():
            shards = _encode_pending(run, config, key, skip,
                                     AliasMap(aliases.alias[todo], aliases.canonical[todo]), pending)
        files = sorted(files + [s["file"] for s in shards])
        written = sum(s["items"] for s in shards)
        if written != pending:
            raise RuntimeError(f"{directory}: {pending} items to embed, the encoder actors wrote "
                               f"{written}; re-run `tiger embed` to repair (overlapping shards are dropped)")
    dims = {s["dim"] for s in shards} | {s.dim for s in trusted}
    if len(dims) != 1:
        raise RuntimeError(f"{directory}: shards of different dimensions {sorted(dims)}")
    dim = dims.pop()
    seconds = time.perf_counter() - start
    if not up_to_date:
        atomic.write_json(directory / CONFIG_FILE, dataclasses.asdict(config))
        write_manifest(directory, files, model=key["model"], dim=dim, normalized=config.normalize,
                       count=total, source=key)
    encoded = sum(s["encoded"] for s in shards)
    summary = {"items": total, "distinct_texts": groups.num_texts, "dim": dim, "model": key["model"],
               "normalized": config.normalize, "shards": len(files), "encoded": encoded,
               "copied_duplicates": pending - encoded, "reused": int(len(done)),
               "seconds": round(seconds, 2),
               "items_per_s": round(pending / seconds, 1) if pending else None,
               "embeddings": str(directory)}
    log.info("embeddings: %s", summary)
    return summary

"""Embeddings on disk: Parquet shards plus a manifest, and readers for later stages.

    RUN/embeddings/part-00000.parquet ...   item_id int64, embedding fixed_size_list<float32>[dim]
    RUN/embeddings/manifest.json            model, dim, normalized, count, files

Small catalogs load as one numpy matrix (``load_embeddings``); large ones stream as a Ray Dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tiger_ray import atomic
from tiger_ray.runs import RunDir

MANIFEST = "manifest.json"


def embeddings_schema(dim: int) -> pa.Schema:
    return pa.schema([
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
    ])


def embeddings_table(item_ids: np.ndarray, vectors: np.ndarray) -> pa.Table:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    dim = vectors.shape[1]
    flat = pa.array(vectors.reshape(-1), type=pa.float32())
    return pa.table({
        "item_id": pa.array(np.asarray(item_ids, dtype=np.int64)),
        "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
    }, schema=embeddings_schema(dim))


@dataclass(frozen=True)
class Manifest:
    model: str
    dim: int
    normalized: bool
    count: int
    files: list[str]

    @classmethod
    def read(cls, directory: Path) -> "Manifest":
        data = atomic.read_json(directory / MANIFEST)
        return cls(**{k: data[k] for k in ("model", "dim", "normalized", "count", "files")})


def write_embeddings(run: RunDir, item_ids: np.ndarray, vectors: np.ndarray, model: str,
                     normalized: bool = True) -> Manifest:
    """Write a whole (small) embedding matrix as one shard; used by tests and small catalogs."""
    directory = run.embeddings
    directory.mkdir(parents=True, exist_ok=True)
    name = "part-00000.parquet"
    atomic.write_parquet(directory / name, embeddings_table(item_ids, vectors))
    manifest = Manifest(model=model, dim=int(vectors.shape[1]), normalized=normalized,
                        count=int(len(item_ids)), files=[name])
    atomic.write_json(directory / MANIFEST, manifest.__dict__)
    return manifest


def load_embeddings(run: RunDir) -> tuple[np.ndarray, np.ndarray]:
    """(item_ids [N], vectors [N, dim] float32) sorted by item_id, checked against the manifest."""
    directory = run.require(run.embeddings / MANIFEST, "tiger embed").parent
    manifest = Manifest.read(directory)
    tables = [pq.read_table(directory / f) for f in manifest.files]
    table = pa.concat_tables(tables) if tables else embeddings_schema(manifest.dim).empty_table()
    if table.num_rows != manifest.count:
        raise ValueError(f"{directory}: manifest says {manifest.count} embeddings, shards hold {table.num_rows}")
    item_ids = table.column("item_id").to_numpy()
    col = table.column("embedding").combine_chunks()
    vectors = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, manifest.dim).astype(np.float32)
    order = np.argsort(item_ids, kind="stable")
    return item_ids[order], vectors[order]

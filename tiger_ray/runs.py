"""The run directory: one folder holds every artefact of a pipeline run, stage by stage.

    RUN/items.parquet, sequences.parquet, stats.json    tiger prepare (or tiger synth); each
                                                         table one file or a directory of parts
    RUN/embeddings/part-*.parquet, manifest.json         tiger embed (vectors.npy: mmap, on demand)
    RUN/semantic_ids/codes.npy, index_*.npy,             tiger train-rqvae (memory-mapped table
        semantic_ids.json, report.json                   and decoding index; .parquet an export)
    RUN/seq2seq/                                         tiger train-seq2seq
    RUN/baseline/                                        tiger train-baseline
    RUN/eval/<model>/<split>/metrics.json, predictions.parquet   tiger evaluate (parquet: a file
                                                         or, with --workers, parts)
    RUN/serving/catalog/                                 tiger serve (mmapped item lookup)
    RUN/compare/                                         tiger compare
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path


# Names that differ between two runs of the same pipeline: Ray Train's checkpoint folders carry
# their creation time, embedding shards the item-id range of the rows a worker happened to get.
_GENERATED_NAMES = (
    (re.compile(r"checkpoint_\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}\.\d+"), "checkpoint_*"),
    (re.compile(r"part-\d+-\d+\.parquet$"), "part-*.parquet"),
)


class MissingArtifactError(FileNotFoundError):
    """A stage was asked to run before the stage that produces its input."""


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", Path(root).expanduser().resolve())

    # tiger prepare
    @property
    def items(self) -> Path:
        return self.root / "items.parquet"

    @property
    def sequences(self) -> Path:
        return self.root / "sequences.parquet"

    @property
    def stats(self) -> Path:
        return self.root / "stats.json"

    # later stages, one folder each
    @property
    def embeddings(self) -> Path:
        return self.root / "embeddings"

    @property
    def semantic_ids(self) -> Path:
        return self.root / "semantic_ids"

    @property
    def seq2seq(self) -> Path:
        return self.root / "seq2seq"

    @property
    def baseline(self) -> Path:
        return self.root / "baseline"

    @property
    def compare(self) -> Path:
        return self.root / "compare"

    def eval_dir(self, model: str, split: str) -> Path:
        return self.root / "eval" / model / split

    def require(self, path: Path, produced_by: str) -> Path:
        """Return ``path`` or fail with a message naming the command that creates it."""
        if not path.exists():
            raise MissingArtifactError(
                f"{path} does not exist; run `{produced_by} --run {self.root}` first"
            )
        return path

    def layout(self) -> set[str]:
        """Every file under the run as a relative path, generated names replaced by a pattern:
        two runs of the same stages have the same layout wherever and however they ran."""
        paths = set()
        for path in self.root.rglob("*"):
            if path.is_file():
                relative = path.relative_to(self.root).as_posix()
                for pattern, replacement in _GENERATED_NAMES:
                    relative = pattern.sub(replacement, relative)
                paths.add(relative)
        return paths

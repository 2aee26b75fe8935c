"""The run directory: one folder holds every artefact of a pipeline run, stage by stage.

    RUN/items.parquet, sequences.parquet, stats.json    tiger prepare
    RUN/embeddings/part-*.parquet, manifest.json         tiger embed
    RUN/semantic_ids/semantic_ids.parquet, report.json   tiger train-rqvae
    RUN/seq2seq/                                         tiger train-seq2seq
    RUN/baseline/                                        tiger train-baseline
    RUN/eval/<model>/<split>/metrics.json, predictions.parquet   tiger evaluate
    RUN/compare/                                         tiger compare
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


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

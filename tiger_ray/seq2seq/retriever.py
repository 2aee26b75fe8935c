"""TIGER as a ``Retriever``: histories in, top-k real items out, via trie-constrained beam search.

    retriever = load_retriever(RunDir("runs/beauty"), beam_size=20)
    recs = retriever.recommend([np.array([3, 17, 42])], np.array([7]), k=10)

The same object serves evaluation (``tiger evaluate``) and online serving.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tiger_ray.evaluation.retrieval import Recommendations
from tiger_ray.runs import RunDir
from tiger_ray.seq2seq.beam_search import beam_search
from tiger_ray.seq2seq.model import TigerSeq2Seq, load_model
from tiger_ray.seq2seq.tokenizer import BOS, SemanticIdTokenizer
from tiger_ray.seq2seq.trie import SemanticIdTrie

BEST_DIR = ("seq2seq", "best")  # RUN/seq2seq/best/{model.pt,config.json,codes.npy,index_*.npy,...}


class TigerRetriever:
    name = "tiger"

    def __init__(self, model: TigerSeq2Seq, tokenizer: SemanticIdTokenizer,
                 trie: SemanticIdTrie | None = None, beam_size: int = 20, temperature: float = 0.0,
                 device: str | torch.device = "cpu", chunk_size: int = 64, seed: int = 0,
                 precision: str = "fp32"):
        """``trie`` defaults to every item of the tokenizer's table; pass a smaller one to restrict
        the candidates (e.g. without cold-start items). Users are decoded ``chunk_size`` at a time,
        sorted by history length so chunks carry little padding. ``precision="bf16"`` runs the
        matmuls in bfloat16 (autocast; about 2x faster on CPUs with AVX512-BF16/AMX and on GPUs);
        scores are still accumulated in float32."""
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        self.precision = precision
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.trie = (trie or SemanticIdTrie.from_semantic_ids(tokenizer.semantic_ids)).to(self.device)
        self.beam_size = int(beam_size)
        self.temperature = float(temperature)
        self.chunk_size = int(chunk_size)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)  # sampling only

    def decode(self, histories: list[np.ndarray], user_ids: np.ndarray, width: int,
               temperature: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Beam search for every user: (items [B, width], tokens [B, width, 4], scores [B, width])."""
        temperature = self.temperature if temperature is None else float(temperature)
        user_ids = np.asarray(user_ids, dtype=np.int64)
        B, L = len(histories), self.tokenizer.tokens_per_item
        items = np.full((B, width), -1, dtype=np.int64)
        tokens = np.zeros((B, width, L), dtype=np.int64)
        scores = np.full((B, width), -np.inf, dtype=np.float32)
        lengths = np.fromiter((min(len(h), self.tokenizer.max_history) for h in histories), np.int64, B)
        order = np.argsort(lengths, kind="stable")
        for lo in range(0, B, self.chunk_size):
            rows = order[lo:lo + self.chunk_size]
            source, pad = self.tokenizer.encode_batch([histories[r] for r in rows], user_ids[rows])
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                result = beam_search(self.model, self.trie, self.tokenizer.offsets,
                                     torch.from_numpy(source).to(self.device),
                                     torch.from_numpy(pad).to(self.device),
                                     beam_size=width, temperature=temperature, generator=self.generator)
            items[rows] = result.items.cpu().numpy()
            tokens[rows] = result.tokens.cpu().numpy()
            scores[rows] = result.scores.cpu().numpy()
        return items, tokens, scores

    def recommend(self, histories: list[np.ndarray], user_ids: np.ndarray, k: int,
                  temperature: float | None = None) -> Recommendations:
        """Top-k items per history (``temperature`` > 0 overrides the default: diverse sampling).
        ``extras['invalid_id_rate']`` counts returned IDs that the tokenizer's own item table does
        not know (checked independently of the trie), as a fraction of the k slots, summed over
        users."""
        items, tokens, scores = self.decode(histories, user_ids, max(k, self.beam_size), temperature)
        items, tokens, scores = items[:, :k], tokens[:, :k], scores[:, :k]
        filled = items >= 0
        invalid = filled & (self.tokenizer.items_from_tokens(tokens) != items)
        return Recommendations(item_ids=items, scores=scores.astype(np.float32),
                               extras={"invalid_id_rate": float(invalid.sum()) / k})


    @torch.inference_mode()
    def score_items(self, histories: list[np.ndarray], user_ids: np.ndarray,
                    items: np.ndarray) -> np.ndarray:
        """log P(item | history) [B, C] of given candidate items [B, C] (-1: no candidate, scored
        -inf), by teacher forcing their Semantic IDs: the score beam search gives the same item."""
        items = np.asarray(items, dtype=np.int64)
        user_ids = np.asarray(user_ids, dtype=np.int64)
        B, C = items.shape
        L = self.tokenizer.tokens_per_item
        out = np.full((B, C), -np.inf, dtype=np.float32)
        offsets = [int(o) for o in self.tokenizer.offsets]
        sizes = self.trie.codebook_sizes
        for lo in range(0, B, self.chunk_size):
            rows = np.arange(lo, min(lo + self.chunk_size, B))
            cand = items[rows]
            real = cand > 0
            tokens = np.zeros((len(rows), C, L), dtype=np.int64)
            tokens[real] = self.tokenizer.item_tokens(cand[real])
            source, pad = self.tokenizer.encode_batch([histories[r] for r in rows], user_ids[rows])
            source = torch.from_numpy(source).to(self.device)
            pad = torch.from_numpy(pad).to(self.device)
            target = torch.from_numpy(tokens).to(self.device)
            target_in = torch.cat([torch.full_like(target[..., :1], BOS), target[..., :-1]], dim=-1)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                logits = self.model.decode(self.model.encode(source, pad), pad, target_in).float()
            logp = torch.zeros(len(rows), C, device=self.device)
            for level in range(L):  # each position normalised over its own code range, as in beam search
                first, size = offsets[level], int(sizes[level])
                level_logp = torch.log_softmax(logits[:, :, level, first:first + size], dim=-1)
                code = (target[..., level] - first).clamp(0, size - 1)
                logp += level_logp.gather(-1, code[..., None])[..., 0]
            out[rows] = np.where(real, logp.cpu().numpy(), -np.inf)
        return out


def model_dir(run: RunDir) -> Path:
    return run.root.joinpath(*BEST_DIR)


def load_retriever(run: RunDir, beam_size: int = 20, temperature: float = 0.0,
                   device: str = "cpu", chunk_size: int = 64, seed: int = 0, precision: str = "fp32",
                   directory: str | Path | None = None) -> TigerRetriever:
    """The best checkpoint of ``tiger train-seq2seq`` (RUN/seq2seq/best, or ``directory``)."""
    directory = Path(directory) if directory is not None else model_dir(run)
    if not (directory / "config.json").exists():
        raise FileNotFoundError(f"{directory / 'config.json'} does not exist; "
                                f"run `tiger train-seq2seq --run {run.root}` first")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    model, tokenizer = load_model(directory, map_location=device)
    return TigerRetriever(model, tokenizer, beam_size=beam_size, temperature=temperature,
                          device=device, chunk_size=chunk_size, seed=seed, precision=precision)

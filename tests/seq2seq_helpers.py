"""Helpers for the evaluation tests: Semantic IDs and a tiny trained TIGER for a synthetic run."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tiger_ray.data.schema import read_sequences
from tiger_ray.data.split import Examples, build_examples
from tiger_ray.runs import RunDir
from tiger_ray.semantic_ids.table import read_semantic_ids, write_semantic_ids
from tiger_ray.seq2seq.data import collate_rows, training_windows
from tiger_ray.seq2seq.model import Seq2SeqConfig, TigerSeq2Seq, save_model
from tiger_ray.seq2seq.retriever import model_dir
from tiger_ray.seq2seq.tokenizer import BOS, PAD, SemanticIdTokenizer


@pytest.fixture
def one_thread():
    """Tiny models: a second intra-op thread only adds synchronisation on a shared machine.
    Import it into a test module and mark the module ``usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_topic_semantic_ids(run: RunDir, n_topics: int = 4) -> None:
    """c0 = the synthetic topic, c1/c2 = position within it: a learnable, unique 4-code table."""
    items = pq.read_table(run.items, columns=["item_id"]).column("item_id").to_numpy()
    rank = (items - 1) // n_topics
    codes = np.stack([(items - 1) % n_topics, rank % 4, (rank // 4) % 4, rank // 16], axis=1)
    write_semantic_ids(run, items, codes)


def train_tiny_tiger(run: RunDir, steps: int = 40, examples: Examples | None = None,
                     cold_items: np.ndarray | None = None, seed: int = 0,
                     all_positions: bool = False) -> TigerSeq2Seq:
    """Full-batch Adam on every training example; saved where `tiger evaluate` looks.
    ``all_positions``: the item-causal model on the run's all-positions windows (the same
    examples, without ``cold_items``) instead."""
    torch.manual_seed(seed)
    tok = SemanticIdTokenizer(read_semantic_ids(run), num_user_buckets=16, max_history=8)
    if all_positions:
        s = read_sequences(run.sequences)
        windows = training_windows(s.user_ids, s.offsets, s.flat, tok, cold_items)
        b = collate_rows(windows, np.arange(len(windows["source_len"])), pad_id=PAD, bos_id=BOS)
        tensors = [b.source, b.source_pad, b.target_in, b.target_out, b.visible]
    else:
        if examples is None:
            examples = build_examples(read_sequences(run.sequences), "train", max_history=tok.max_history)
        source, pad = tok.encode_batch([examples.history(i) for i in range(len(examples))],
                                       examples.user_ids)
        target = tok.item_tokens(examples.targets)
        target_in = np.c_[np.full(len(target), BOS), target[:, :3]]
        tensors = [torch.from_numpy(a) for a in (source, pad, target_in, target)]
    config = Seq2SeqConfig(vocab_size=tok.vocab_size, d_model=32, num_heads=2, head_dim=16,
                           encoder_layers=1, decoder_layers=1, mlp_dim=64, dropout=0.0,
                           max_source_len=tok.max_source_len,
                           encoder_attention="item_causal" if all_positions else "bidirectional")
    model = TigerSeq2Seq(config)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(steps):
        loss = model.loss(*tensors)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    save_model(model_dir(run), model, config, tok, extra={"steps": steps}, cold_items=cold_items)
    return model

"""Training throughput: our seq2seq step against Hugging Face T5 of the same size, same batches.

Both models get the paper's sizes (d_model 128, 6 heads x 64 (T5: d_kv=64), MLP 1024 (d_ff),
4 + 4 layers, ReLU, dropout 0.1, untied output layer), the same vocabulary, the same
length-bucketed batches, the same fused AdamW, clipping and loss, interleaved batch by batch in
one process on this machine. A step is forward + backward + optimizer + LR schedule. We report
training examples per second (wall clock, and per CPU-second, which other load on a shared
machine distorts less) and the ratios.

    python benchmarks/bench_seq2seq_vs_t5.py                       # Beauty-shaped synthetic data
    python benchmarks/bench_seq2seq_vs_t5.py --run runs/beauty      # the real training examples
    python benchmarks/bench_seq2seq_vs_t5.py --precision fp32       # ours in fp32 too
    python benchmarks/bench_seq2seq_vs_t5.py --compile              # ours also under torch.compile
    python benchmarks/bench_seq2seq_vs_t5.py --bernoulli            # ours also with nn.Dropout masks

Our step runs in the precision the trainer would pick (``auto``: bf16 autocast on CPUs with native
bf16); T5 runs in fp32 (what HF training does by default) and, when ours differs, also under the
same autocast, so both the as-shipped and the like-for-like ratios are printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiger_ray import atomic  # noqa: E402
from tiger_ray.data.schema import Sequences, read_sequences  # noqa: E402
from tiger_ray.data.split import build_examples  # noqa: E402
from tiger_ray.semantic_ids.table import SemanticIds, read_semantic_ids  # noqa: E402
from tiger_ray.seq2seq.data import bucketed_batches, collate, padding_fraction, tokenize_examples  # noqa: E402
from tiger_ray.seq2seq.model import TigerSeq2Seq  # noqa: E402
from tiger_ray.seq2seq.presets import Seq2SeqTrainConfig  # noqa: E402
from tiger_ray.seq2seq.schedule import inverse_sqrt_schedule  # noqa: E402
from tiger_ray.seq2seq.tokenizer import SemanticIdTokenizer  # noqa: E402
from tiger_ray.seq2seq.train import (compile_for_training, make_optimizer, model_config,  # noqa: E402
                                     resolve_precision, training_step)


def beauty_like(n_users: int = 22363, n_items: int = 12101, seed: int = 0) -> tuple[Sequences, SemanticIds]:
    """Random sequences with Beauty's shape (22k users, 12k items, 5-core, mean length ~8.9)."""
    rng = np.random.default_rng(seed)
    lengths = np.minimum(5 + rng.geometric(1 / 4.9, size=n_users) - 1, 200)
    offsets = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = rng.integers(1, n_items + 1, size=int(offsets[-1]))
    seqs = Sequences(user_ids=np.arange(1, n_users + 1), offsets=offsets, flat=flat)
    codes = np.zeros((n_items, 4), dtype=np.int64)
    codes[:, :3] = rng.integers(0, 256, size=(n_items, 3))
    _, inverse = np.unique(codes[:, :3], axis=0, return_inverse=True)
    for group in np.unique(inverse):  # c3 disambiguates collisions, as in the real table
        rows = np.flatnonzero(inverse == group)
        codes[rows, 3] = np.arange(len(rows))
    sids = SemanticIds(item_ids=np.arange(1, n_items + 1), codes=codes,
                       codebook_sizes=(256, 256, 256, int(codes[:, 3].max()) + 1))
    return seqs, sids


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def t5_model(vocab_size: int, cfg: Seq2SeqTrainConfig):
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=vocab_size, d_model=cfg.d_model, d_kv=cfg.head_dim,
                      d_ff=cfg.mlp_dim, num_layers=cfg.encoder_layers,
                      num_decoder_layers=cfg.decoder_layers, num_heads=cfg.num_heads,
                      dropout_rate=cfg.dropout, feed_forward_proj="relu",
                      tie_word_embeddings=False, pad_token_id=0, eos_token_id=2,
                      decoder_start_token_id=1, use_cache=False)
    return T5ForConditionalGeneration(config)


class T5Adapter(torch.nn.Module):
    """T5 behind our call signature, so both models go through the same ``training_step``."""

    def __init__(self, t5):
        super().__init__()
        self.t5 = t5

    def forward(self, source, source_pad, target_in):
        return self.t5(input_ids=source, attention_mask=(~source_pad).long(),
                       decoder_input_ids=target_in, use_cache=False).logits


def time_interleaved(models: dict, batches, cfg, warmup: int) -> dict:
    """Each batch goes through every model in turn, so load changes on a shared machine hit all
    models alike. Wall time and process CPU time are summed per model over the timed steps.
    ``models`` maps a name to (model, precision)."""
    opt = {}
    for name, (model, _) in models.items():
        optimizer = make_optimizer(model, cfg)
        opt[name] = (optimizer, inverse_sqrt_schedule(optimizer, cfg.warmup_steps, cfg.decay_start))
    stats = {name: {"seconds": 0.0, "cpu_seconds": 0.0, "examples": 0, "losses": []} for name in models}
    for i, batch in enumerate(batches):
        for name, (model, precision) in models.items():
            wall, cpu = time.perf_counter(), time.process_time()
            loss = training_step(model, *opt[name], batch, precision=precision, grad_clip=cfg.grad_clip)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if i >= warmup:
                s = stats[name]
                s["seconds"] += wall
                s["cpu_seconds"] += cpu
                s["examples"] += len(batch)
                s["losses"].append(loss)
    return stats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="run directory with sequences.parquet + semantic_ids (default: synthetic)")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per model first")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="our training step's precision, resolved as the trainer does (auto = "
                             "bf16 where native); T5 runs in fp32 and, if different, also in this")
    parser.add_argument("--compile", action="store_true",
                        help="also time our model under torch.compile (the trainer's --compile); "
                             "ratios are then printed for the eager and the compiled step")
    parser.add_argument("--bernoulli", action="store_true",
                        help="also time our model with dropout_masks=bernoulli (nn.Dropout and SDPA "
                             "attention dropout), to show what the random-bits masks buy")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.run:
        from tiger_ray.runs import RunDir

        run = RunDir(args.run)
        sequences, sids = read_sequences(run.sequences), read_semantic_ids(run)
        source = str(run.root)
    else:
        sequences, sids = beauty_like()
        source = "synthetic Beauty-shaped data"
    cfg = Seq2SeqTrainConfig(batch_size=args.batch_size, precision=args.precision)
    tokenizer = SemanticIdTokenizer(sids, num_user_buckets=cfg.num_user_buckets,
                                    max_history=cfg.max_history)
    data = tokenize_examples(build_examples(sequences, "train", cfg.max_history), tokenizer)
    plan = bucketed_batches(data.lengths, cfg.batch_size, seed=0, epoch=0,
                            chunk_batches=cfg.bucket_chunk_batches)
    plan = plan[:args.warmup + args.steps]
    batches = [collate(data, b, pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id) for b in plan]

    ours_precision = resolve_precision(args.precision, torch.device("cpu"))
    models = {}
    torch.manual_seed(0)
    models["tiger_ray"] = (TigerSeq2Seq(model_config(cfg, tokenizer)), ours_precision)
    if args.compile:
        torch.manual_seed(0)
        models["tiger_ray_compiled"] = (compile_for_training(TigerSeq2Seq(model_config(cfg, tokenizer))),
                                        ours_precision)
    if args.bernoulli:
        torch.manual_seed(0)
        bernoulli_cfg = model_config(dataclasses.replace(cfg, dropout_masks="bernoulli"), tokenizer)
        models["tiger_ray_bernoulli"] = (TigerSeq2Seq(bernoulli_cfg), ours_precision)
    for precision in dict.fromkeys(["fp32", ours_precision]):  # T5 at fp32, and at ours if other
        torch.manual_seed(0)
        models[f"hf_t5_{precision}"] = (T5Adapter(t5_model(tokenizer.vocab_size, cfg)), precision)
    results = {"source": source, "dropout_masks": cfg.dropout_masks, "examples": len(data),
               "vocab_size": tokenizer.vocab_size, "batch_size": cfg.batch_size,
               "timed_steps": len(batches) - args.warmup,
               "padding_fraction": padding_fraction(data, plan), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "transformers": transformers_version()}
    stats = time_interleaved(models, batches, cfg, args.warmup)
    for name, (model, precision) in models.items():
        s = stats[name]
        params = sum(p.numel() for p in model.parameters())
        steps = len(s["losses"])
        results[name] = {"precision": precision, "parameters": params, "seconds": s["seconds"],
                         "cpu_seconds": s["cpu_seconds"], "examples": s["examples"],
                         "examples_per_second": s["examples"] / s["seconds"],
                         "examples_per_cpu_second": s["examples"] / s["cpu_seconds"],
                         "ms_per_step": 1000 * s["seconds"] / steps,
                         "loss_first": s["losses"][0], "loss_last": s["losses"][-1]}
        print(f"{name:18s} {precision}  {params / 1e6:5.2f}M params {s['examples'] / s['seconds']:7.0f} "
              f"examples/s ({s['examples'] / s['cpu_seconds']:6.0f} per CPU-second) "
              f"{1000 * s['seconds'] / steps:7.1f} ms/step  loss {s['losses'][0]:.3f} -> {s['losses'][-1]:.3f}")
    print(f"({source}; batch {cfg.batch_size}, {results['timed_steps']} timed steps, "
          f"{torch.get_num_threads()} threads, padding {100 * results['padding_fraction']:.1f}%)")
    ours_names = [name for name in models if name.startswith("tiger_ray")]
    for ours in ours_names:
        suffix = ours[len("tiger_ray"):]  # "" for the default step, "_compiled", "_bernoulli"
        for name in models:
            if name in ours_names:
                continue
            wall = results[ours]["examples_per_second"] / results[name]["examples_per_second"]
            cpu = results[ours]["examples_per_cpu_second"] / results[name]["examples_per_cpu_second"]
            results[f"speedup{suffix}_vs_{name}"] = {"wall_clock": wall, "cpu_time": cpu}
            print(f"speed-up {ours} ({ours_precision}) / {name}: {wall:.2f}x wall-clock, "
                  f"{cpu:.2f}x CPU time")
    if args.json:
        atomic.write_json(args.json, results)  # creates the directory, writes via a temp name
    return 0


if __name__ == "__main__":
    sys.exit(main())

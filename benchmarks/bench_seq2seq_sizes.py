"""Training cost of candidate seq2seq sizes: examples per CPU-second, fp32 and bf16 autocast.

The numbers behind the ``cpu`` preset's model (docs/RESULTS.md#model-size-at-a-fixed-cpu-budget).
One thread and process CPU time, so other load on a shared machine does not distort them; the real
training examples of a
run (or Beauty-shaped synthetic ones), length-bucketed batches of 256, the full training step
(forward, loss, backward, clipping, fused AdamW, schedule). Batches are a sample, so the rate is
rescaled to the epoch's mean source length (cost is close to linear in tokens at these lengths).

    python benchmarks/bench_seq2seq_sizes.py --run runs/beauty
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_seq2seq_vs_t5 import beauty_like  # noqa: E402
from tiger_ray.data.schema import read_sequences  # noqa: E402
from tiger_ray.data.split import build_examples  # noqa: E402
from tiger_ray.semantic_ids.table import read_semantic_ids  # noqa: E402
from tiger_ray.seq2seq.data import bucketed_batches, collate, tokenize_examples  # noqa: E402
from tiger_ray.seq2seq.model import TigerSeq2Seq  # noqa: E402
from tiger_ray.seq2seq.presets import Seq2SeqTrainConfig  # noqa: E402
from tiger_ray.seq2seq.schedule import inverse_sqrt_schedule  # noqa: E402
from tiger_ray.seq2seq.tokenizer import SemanticIdTokenizer  # noqa: E402
from tiger_ray.seq2seq.train import make_optimizer, model_config, training_step  # noqa: E402

SIZES = {
    "paper 4+4 6x64 mlp1024": {},
    "2+2 6x64 mlp1024": dict(encoder_layers=2, decoder_layers=2),
    "3+3 4x32 mlp512": dict(num_heads=4, head_dim=32, mlp_dim=512, encoder_layers=3, decoder_layers=3),
    "2+2 4x32 mlp512 (cpu preset)": dict(num_heads=4, head_dim=32, mlp_dim=512, encoder_layers=2,
                                         decoder_layers=2),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="run directory with sequences.parquet + semantic_ids (default: synthetic)")
    parser.add_argument("--batches", type=int, default=12, help="timed batches per size and precision")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.run:
        from tiger_ray.runs import RunDir

        run = RunDir(args.run)
        sequences, sids = read_sequences(run.sequences), read_semantic_ids(run)
    else:
        sequences, sids = beauty_like()
    tokenizer = SemanticIdTokenizer(sids)
    data = tokenize_examples(build_examples(sequences, "train", 20), tokenizer)
    plan = bucketed_batches(data.lengths, 256, seed=0, epoch=0)[:args.batches + 1]
    batches = [collate(data, b, pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id) for b in plan]
    timed_tokens = sum(int((~b.source_pad).sum()) for b in batches[1:])
    timed_examples = sum(len(b) for b in batches[1:])
    # cost per example scales with its source length: rescale the sample to the epoch's mean
    scale = (timed_tokens / timed_examples) / float(data.lengths.mean())
    results = []
    for name, sizes in SIZES.items():
        for precision in ("fp32", "bf16"):
            cfg = Seq2SeqTrainConfig(precision=precision, **sizes)
            torch.manual_seed(0)
            model = TigerSeq2Seq(model_config(cfg, tokenizer))
            optimizer = make_optimizer(model, cfg)
            scheduler = inverse_sqrt_schedule(optimizer, cfg.warmup_steps, cfg.decay_start)
            training_step(model, optimizer, scheduler, batches[0], precision=precision)  # warm-up
            cpu = time.process_time()
            for batch in batches[1:]:
                training_step(model, optimizer, scheduler, batch, precision=precision,
                              grad_clip=cfg.grad_clip)
            cpu = time.process_time() - cpu
            rate = timed_examples / cpu * scale
            epoch_minutes = len(data) / (2 * rate) / 60
            results.append({"model": name, "precision": precision, "parameters": model.num_parameters(),
                            "examples_per_cpu_second": rate, "epoch_minutes_on_2_cores": epoch_minutes})
            print(f"{name:30s} {precision}  {model.num_parameters() / 1e6:5.2f}M params  "
                  f"{rate:6.1f} examples/CPU-s  epoch on 2 cores ~{epoch_minutes:4.1f} min", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"examples": len(data), "mean_source_length":
                                               float(data.lengths.mean()), "results": results},
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

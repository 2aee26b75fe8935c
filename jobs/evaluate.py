"""Ray job entrypoint of `tiger evaluate`: Recall@K / NDCG@K of a trained model on a split.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env jobs/runtime_env.yaml --entrypoint-num-gpus 1 -- \\
        python jobs/evaluate.py --run s3://BUCKET/runs/beauty --model tiger --device cuda

The flags are those of `tiger evaluate` (see --help); --run may be a URI (s3://, gs://, file://).

The evaluation runs in the job's driver: `--entrypoint-num-gpus 1` (before `--`) places the
driver on a GPU node for `--device cuda`.
See jobs/_job.py.
"""

import sys

from _job import main

if __name__ == "__main__":
    sys.exit(main("evaluate"))

"""Ray job entrypoint of `tiger train-baseline`: train the dual-encoder baseline, build its FAISS index.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env jobs/runtime_env.yaml -- \\
        python jobs/train_baseline.py --run s3://BUCKET/runs/beauty --preset paper --use-gpu

The flags are those of `tiger train-baseline` (see --help); --run may be a URI (s3://, gs://, file://).
See jobs/_job.py.
"""

import sys

from _job import main

if __name__ == "__main__":
    sys.exit(main("train-baseline"))

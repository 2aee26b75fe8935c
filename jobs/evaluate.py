"""Ray job entrypoint for `tiger evaluate`. Evaluate a trained model (Recall@K, NDCG@K) on the validation or test split.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/evaluate.py --run s3://BUCKET/runs/beauty

Same flags as `tiger evaluate` (see --help); --run may be a URI. See jobs/_job.py.
"""

import sys

from _job import main

if __name__ == "__main__":
    sys.exit(main("evaluate"))

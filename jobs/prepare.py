"""Ray job entrypoint of `tiger prepare`: read a dataset, write items.parquet, sequences.parquet, stats.json.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env jobs/runtime_env.yaml -- \\
        python jobs/prepare.py --dataset beauty --run s3://BUCKET/runs/beauty

The flags are those of `tiger prepare` (see --help); --run may be a URI (s3://, gs://, file://).
See jobs/_job.py.
"""

import sys

from _job import main

if __name__ == "__main__":
    sys.exit(main("prepare"))

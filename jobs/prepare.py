"""Ray job entrypoint for `tiger prepare`. Read a dataset and write items.parquet, sequences.parquet, stats.json.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/prepare.py --dataset beauty --run s3://BUCKET/runs/beauty

Same flags as `tiger prepare` (see --help); --run may be a URI. See jobs/_job.py.
"""

import sys

from _job import main

if __name__ == "__main__":
    sys.exit(main("prepare"))

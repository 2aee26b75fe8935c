"""Ray job entrypoint of `tiger compare`: TIGER against the baseline: one table and plots.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env jobs/runtime_env.yaml -- \\
        python jobs/compare.py --run s3://BUCKET/runs/beauty

The flags are those of `tiger compare` (see --help); --run may be a URI (s3://, gs://, file://).
See jobs/_job.py.
"""

import sys

from _job import main

if __name__ == "__main__":
    sys.exit(main("compare"))

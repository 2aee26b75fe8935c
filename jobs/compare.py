"""Ray job entrypoint for `tiger compare`. Compare TIGER with the baseline: one table and plots.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/compare.py --run s3://BUCKET/runs/beauty

Same flags as `tiger compare` (see --help); --run may be a URI. See jobs/_job.py.
"""

import sys

from _job import main

if __name__ == "__main__":
    sys.exit(main("compare"))

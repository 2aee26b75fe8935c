"""Ray job entrypoint of `tiger tune-hybrid`: the TIGER + dual-encoder hybrid's weight, on validation.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env jobs/runtime_env.yaml -- \\
        python jobs/tune_hybrid.py --run s3://BUCKET/runs/beauty

The flags are those of `tiger tune-hybrid` (see --help); --run may be a URI (s3://, gs://, file://).
See jobs/_job.py.
"""

import sys

from _job import main

if __name__ == "__main__":
    sys.exit(main("tune-hybrid"))

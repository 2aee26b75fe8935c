"""Ray job entrypoint of `tiger pipeline`: the whole chain, prepare to compare, resumable.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env jobs/runtime_env.yaml -- \\
        python jobs/pipeline.py --dataset beauty --run s3://BUCKET/runs/beauty --preset paper \\
           --use-gpu --no-serve-demo

The flags are those of `tiger pipeline` (see --help); --run may be a URI (s3://, gs://, file://).
See jobs/_job.py.
"""

import sys

from _job import main

if __name__ == "__main__":
    sys.exit(main("pipeline"))

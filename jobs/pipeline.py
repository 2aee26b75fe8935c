"""Ray job entrypoint for `tiger pipeline`. The whole chain: prepare -> embed -> train-rqvae -> train-seq2seq -> train-baseline -> evaluate -> compare.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/pipeline.py --dataset beauty --run s3://BUCKET/runs/beauty --preset paper --use-gpu

Same flags as `tiger pipeline` (see --help); --run may be a URI. See jobs/_job.py.
"""

import sys

from _job import main

if __name__ == "__main__":
    sys.exit(main("pipeline"))

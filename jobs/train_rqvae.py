"""Ray job entrypoint of `tiger train-rqvae`: train the RQ-VAE with Ray Train and assign semantic ids.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env jobs/runtime_env.yaml -- \\
        python jobs/train_rqvae.py --run s3://BUCKET/runs/beauty --preset paper --use-gpu

The flags are those of `tiger train-rqvae` (see --help); --run may be a URI (s3://, gs://, file://).
See jobs/_job.py.
"""

import sys

from _job import main

if __name__ == "__main__":
    sys.exit(main("train-rqvae"))

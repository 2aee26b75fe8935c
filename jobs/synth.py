"""Ray job entrypoint of `tiger synth`: a synthetic catalog of any size (items, sequences, embeddings).

    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env jobs/runtime_env.yaml -- \\
        python jobs/synth.py --items 10000000 --users 5000000 --dim 64 --out s3://BUCKET/runs/synth-10m

The flags are those of `tiger synth` (see --help); --out may be a URI (s3://, gs://, file://).
Generation runs as Ray Data tasks across the cluster. See jobs/_job.py.
"""

import sys

from _job import main

if __name__ == "__main__":
    sys.exit(main("synth"))

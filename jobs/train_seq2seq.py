"""Ray job entrypoint of `tiger train-seq2seq`: train the TIGER encoder-decoder with Ray Train.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env jobs/runtime_env.yaml -- \\
        python jobs/train_seq2seq.py --run s3://BUCKET/runs/beauty --preset paper \\
           --use-gpu --workers 4

The flags are those of `tiger train-seq2seq` (see --help); --run may be a URI (s3://, gs://, file://).
See jobs/_job.py.
"""

import sys

from _job import main

if __name__ == "__main__":
    sys.exit(main("train-seq2seq"))

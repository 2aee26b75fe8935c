"""Ray job entrypoint for `tiger train-seq2seq`. Train the TIGER encoder-decoder on semantic-id sequences with Ray Train.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/train_seq2seq.py --run s3://BUCKET/runs/beauty --preset paper --use-gpu --workers 4

Same flags as `tiger train-seq2seq` (see --help); --run may be a URI. See jobs/_job.py.
"""

import sys

from _job import main

if __name__ == "__main__":
    sys.exit(main("train-seq2seq"))

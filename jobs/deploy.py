"""Ray job entrypoint of `tiger serve`: deploy the recommendation API on Ray Serve and leave it running.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env jobs/runtime_env.yaml -- \\
        python jobs/deploy.py --run /mnt/tiger/runs/beauty --preset paper --detach

The flags are those of `tiger serve` (see --help); --run may be a URI (s3://, gs://, file://).

With --detach the service outlives the job (`python jobs/deploy.py --run RUN --stop` removes
it, leaving other Serve applications alone); without it, the service
lives as long as the job (`ray job stop` ends both). A --run URI needs --stage-dir (cluster.yaml
sets $TIGER_STAGE_DIR): the replicas keep reading the working copy.
See jobs/_job.py.
"""

import sys

from _job import main

if __name__ == "__main__":
    sys.exit(main("serve"))

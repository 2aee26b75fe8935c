"""Ray job entrypoint of `tiger embed`: embed every item's text on a Ray Data actor pool.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env jobs/runtime_env.yaml -- \\
        python jobs/embed.py --run s3://BUCKET/runs/beauty --preset paper

The flags are those of `tiger embed` (see --help); --run may be a URI (s3://, gs://, file://).
See jobs/_job.py.
"""

import sys

from _job import main

if __name__ == "__main__":
    sys.exit(main("embed"))

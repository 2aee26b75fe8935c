"""Ray job entrypoint for `tiger embed`. Embed every item's text with a sentence encoder on a Ray Data actor pool.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/embed.py --run s3://BUCKET/runs/beauty --preset paper

Same flags as `tiger embed` (see --help); --run may be a URI. See jobs/_job.py.
"""

import sys

from _job import main

if __name__ == "__main__":
    sys.exit(main("embed"))

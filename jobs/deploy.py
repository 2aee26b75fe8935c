"""Ray job entrypoint for `tiger serve`. Deploy the retrieval service on Ray Serve (`tiger serve`).

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/deploy.py --run /mnt/tiger/runs/beauty

Same flags as `tiger serve` (see --help); --run may be a URI. See jobs/_job.py.
"""

import sys

from _job import main

if __name__ == "__main__":
    sys.exit(main("serve"))

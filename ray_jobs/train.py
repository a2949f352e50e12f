"""Entry point for `ray job submit --working-dir . -- python ray_jobs/train.py --config PATH`.

Thin by design: the same code path as `sparsebk train` (parse, validate, connect, run).
Inside a Ray job, RAY_ADDRESS points at the cluster, so no local Ray is started.
"""

import os
import sys

# With --working-dir the job runs from a copy of the repository: make it importable even
# where the package is not installed on the cluster's Python.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sparsebk.train.ray_train.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

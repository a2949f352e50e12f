"""Entry point for `ray job submit --working-dir . -- python ray_jobs/sweep.py --config PATH`.

Thin by design: the same code path as `sparsebk sweep` (parse, validate, connect, run).
Inside a Ray job, RAY_ADDRESS points at the cluster, so no local Ray is started. Submitting
the same sweep again resumes it from its storage folder.
"""

import os
import sys

# With --working-dir the job runs from a copy of the repository: make it importable even
# where the package is not installed on the cluster's Python.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sparsebk.tune.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

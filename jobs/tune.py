#!/usr/bin/env python
"""Hyperparameter search (Ray Tune + Optuna TPE + ASHA); the winner is published as a versioned model.

    python jobs/tune.py --config configs/tune.yaml                    # local Ray on 127.0.0.1
    ray job submit --working-dir . -- python jobs/tune.py --config configs/tune.yaml   # on a cluster
    python jobs/tune.py --smoke-test --data runs/synth-smoke          # tiny search (tests/CI)

Re-running the same command (same name and storage_path) resumes an interrupted search.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from leukray.search import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

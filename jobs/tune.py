#!/usr/bin/env python
"""Hyperparameter search (Ray Tune + Optuna TPE + ASHA); the winner is published as a versioned model.

    python jobs/tune.py --config configs/tune.yaml                    # local Ray on 127.0.0.1
    ray job submit --working-dir . -- python jobs/tune.py --config configs/tune.yaml   # on a cluster
    python jobs/tune.py --smoke-test          # tiny search (tests/CI); generates runs/synth-smoke when absent

Re-running the same command (same name and storage_path) resumes an interrupted search.
"""

import sys

from leukray.search import main

if __name__ == "__main__":
    sys.exit(main())

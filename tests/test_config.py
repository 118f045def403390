import pytest

from itr.config import ConfigError, describe, flatten, load_recipe, to_dict

from conftest import ROOT

DEMO = ROOT / "recipes" / "synthetic" / "vsepp_gru.yaml"


def test_recipe_loads_with_typed_overrides():
    r = load_recipe(DEMO, ["optim.lr=2e-4", "train.epochs=3", "loss.max_violation=false", "model.text.word_dim=64",
                           "tracking.uri=null"])
    assert r.optim.lr == pytest.approx(2e-4) and isinstance(r.optim.lr, float)  # YAML reads "2e-4" as a string
    assert r.train.epochs == 3 and r.loss.max_violation is False
    assert to_dict(r.model)["text"] == {"name": "gru", "word_dim": 64, "num_layers": 1, "bidirectional": False, "min_count": 4}
    assert r.tracking.uri is None


def test_unknown_top_level_and_section_keys_list_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_recipe(DEMO, ["train.epoch=3"])
    assert "train.epoch" in str(e.value) and "epochs" in str(e.value) and "batch_size" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_recipe(raw={"trian": {}})
    assert "trian" in str(e.value) and "train" in str(e.value)


def test_unknown_component_keys_are_checked_against_the_component():
    with pytest.raises(ConfigError) as e:
        load_recipe(DEMO, ["model.text.hidden=5"])
    assert "model.text.hidden" in str(e.value) and "word_dim" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_recipe(DEMO, ["model.text.name=lstm"])
    assert "lstm" in str(e.value) and "gru" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_recipe(DEMO, ["model.name=nope"])
    assert "vsepp" in str(e.value)


def test_switching_the_text_encoder_validates_its_own_keys():
    r = load_recipe(DEMO, ["model.text={name: hf, path: /x, pool: cls}"])
    assert to_dict(r.model)["text"]["pool"] == "cls" and "word_dim" not in to_dict(r.model)["text"]


@pytest.mark.parametrize("override,needle", [
    ("train.epochs=abc", "train.epochs"),
    ("train.mixed_precision=fp8", "train.mixed_precision"),
    ("train.batch_size=0", "train.batch_size"),
    ("epochs", "key=value"),
    ("eval.protocol=2k", "eval.protocol"),
])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_recipe(DEMO, [override])
    assert needle in str(e.value)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_recipe(tmp_path / "nope.yaml")


def test_flatten_and_describe_cover_every_key():
    r = load_recipe(DEMO)
    flat = flatten(to_dict(r))
    assert flat["model.text.name"] == "gru" and flat["loss.margin"] == 0.2
    lines = describe(values=r)
    keys = {line.split(" = ")[0] for line in lines}
    assert set(flat) <= keys
    assert all("#" in line for line in lines)

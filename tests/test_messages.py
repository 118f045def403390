"""Messages that say what to do: YAML's boolean words read as the schema's type, "did you mean" for keys, model
and split names, the transposed score matrix, and `itr config --yaml`, a complete recipe that loads back."""
import numpy as np
import pytest

from itr.cli import main
from itr.config import ConfigError, load_recipe

from conftest import ROOT, tiny_overrides

DEMO = ROOT / "recipes" / "synthetic" / "vsepp_gru.yaml"


def _err(capsys, *argv):
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    last = err.rstrip("\n").split("\n")[-1].split("\r")[-1]
    assert last.startswith(f"itr {argv[0]}: error: "), err
    return last


@pytest.mark.parametrize("word", ["no", "yes", "on", "off", "true", "false", "No", "OFF"])
def test_boolean_words_are_strings_where_the_schema_wants_one(word):
    r = load_recipe(DEMO, [f"data.name={word}", f"tracking.run_name={word}"])
    assert r.data.name == word.lower() if word.lower() in ("true", "false") else r.data.name == word
    assert r.tracking.run_name == r.data.name


def test_boolean_words_are_booleans_where_the_schema_wants_one():
    for word, value in (("no", False), ("off", False), ("false", False), ("yes", True), ("on", True), ("True", True)):
        r = load_recipe(DEMO, [f"tracking.enabled={word}", f"loss.max_violation={word}"])
        assert r.tracking.enabled is value and r.loss.max_violation is value, word


def test_mixed_precision_no_as_an_override_and_in_a_recipe_file(tmp_path, capsys):
    assert load_recipe(DEMO, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert load_recipe(DEMO, ["train.mixed_precision=bf16"]).train.mixed_precision == "bf16"
    f = tmp_path / "r.yaml"
    f.write_text("model: vsepp\ntrain:\n  mixed_precision: no\ntracking:\n  enabled: off\n  run_name: yes\n")
    r = load_recipe(f)
    assert (r.train.mixed_precision, r.tracking.enabled, r.tracking.run_name) == ("no", False, "yes")
    assert main(["config", str(DEMO), "train.mixed_precision=no"]) == 0
    assert "train.mixed_precision = 'no'" in capsys.readouterr().out


@pytest.mark.parametrize("override,named,suggestion", [
    ("train.epoch=3", "train.epoch", "(did you mean train.epochs?)"),
    ("trian.epochs=3", "trian", "(did you mean train?)"),
    ("train.mixed_precison=bf16", "train.mixed_precison", "(did you mean train.mixed_precision?)"),
    ("model.text.word_dimm=3", "model.text.word_dimm", "(did you mean model.text.word_dim?)"),
    ("model.name=vsep", "'vsep'", "(did you mean vsepp?)"),
    ("model.text.name=hff", "'hff'", "(did you mean hf?)"),
])
def test_unknown_keys_and_names_suggest_the_closest(override, named, suggestion):
    with pytest.raises(ConfigError) as e:
        load_recipe(DEMO, [override])
    assert f"{named} {suggestion}" in str(e.value)


def test_nothing_close_suggests_nothing():
    with pytest.raises(ConfigError) as e:
        load_recipe(DEMO, ["train.zzzzzz=3"])
    assert "did you mean" not in str(e.value) and "valid keys in train" in str(e.value)


def test_a_missing_split_names_the_closest_and_lists_the_splits(capsys, tmp_path, tiny_data):
    err = _err(capsys, "train", DEMO, *tiny_overrides(tiny_data), "data.dev_split=dve", "tracking.enabled=false",
               "--out", tmp_path / "r")
    assert "'dve' (did you mean dev?)" in err and "splits there: dev, test, train" in err
    from itr.data.manifest import load_manifest
    from itr.data.precomp import DataError, open_precomp
    from itr.shards.precomp import shard_precomp

    with pytest.raises(DataError) as e:
        open_precomp(tiny_data, "tset")
    assert "(did you mean test?)" in str(e.value) and "dev, test, train" in str(e.value)
    shard_precomp(tiny_data, "test", tmp_path / "shards", progress=False)
    with pytest.raises(DataError) as e:
        load_manifest(tmp_path / "shards", "tst")
    assert "(did you mean test?)" in str(e.value) and "splits there: test" in str(e.value)


def test_a_transposed_score_matrix_says_to_transpose(capsys, tmp_path):
    np.save(tmp_path / "sims.npy", np.random.default_rng(0).random((20, 4), dtype=np.float32))
    err = _err(capsys, "score", tmp_path / "sims.npy")
    assert "(20, 4)" in err and "transpose" in err and ".T" in err
    np.save(tmp_path / "sims.npy", np.load(tmp_path / "sims.npy").T)
    assert main(["score", str(tmp_path / "sims.npy")]) == 0


@pytest.mark.parametrize("recipe", ["synthetic/vsepp_gru.yaml", "f30k/vse_infty.yaml", "coco/sentence_matcher.yaml",
                                    "f8k/vsepp_minilm.yaml", "coco/dime_t2i.yaml"])
def test_config_yaml_is_a_complete_recipe_that_loads_back(recipe, capsys, tmp_path):
    path = ROOT / "recipes" / recipe
    assert main(["config", str(path), "--yaml"]) == 0
    out = capsys.readouterr().out
    (tmp_path / "full.yaml").write_text(out)
    assert load_recipe(tmp_path / "full.yaml") == load_recipe(path)
    from itr.config import flatten, to_dict
    from itr.recipe_yaml import load_yaml

    # every key written out, defaults included (the recipe files set only some)
    assert flatten(load_yaml(out)) == flatten(to_dict(load_recipe(path)))
    assert len(flatten(load_yaml(path.read_text()))) < len(flatten(load_yaml(out)))


def test_config_yaml_marks_the_values_that_differ_from_the_defaults(capsys, tmp_path):
    path = ROOT / "recipes" / "f30k" / "vse_infty.yaml"
    assert main(["config", str(path), "--yaml", "train.grad_accum=2"]) == 0
    out = capsys.readouterr().out.splitlines()
    lines = {line.split(":")[0].strip(): line for line in out}
    assert "# set (default: 1)" in lines["grad_accum"]  # an override
    assert "# set (default: 30)" in lines["epochs"]  # the recipe file's value
    assert "set" not in lines["grad_clip"].split("#")[1]  # left at its default
    text = [line for line in out if line.strip().startswith("name: hf_words")]
    assert text and "# set (default: gru_words)" in text[0]  # the text encoder chosen, against the model's default
    assert "set" not in lines["freeze_layers"].split("#")[1]  # the chosen encoder's own default

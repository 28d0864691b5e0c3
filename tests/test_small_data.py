"""The finetune stage's small-data recipe (dermfast.train.small_data): when it applies, that it fills only the
options the user did not set (an explicit --model / --preset / --init keeps its model; an explicit schedule keeps
its length), and a run on the real mini set with no other option that uses it end to end (threshold from the
validation split in the checkpoint)."""
import json
from pathlib import Path

import pytest

from dermfast.train.config import build_config
from dermfast.train.finetune import FinetuneConfig
from dermfast.train.small_data import SMALL_DATA_IMAGES, apply_recipe, choose_recipe, recipe_values

MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "isic-cc0-mini"
ALL = {"model": "resnet18", "img_size": 64, "layer_decay": 1.0, "min_steps": 300, "warmup_steps": 30,
       "batch_size": 16, "dihedral": True, "select": "last", "eval_every": 50, "checkpoint_every": 50,
       "epoch_checkpoints": False}


def cfg_of(tmp_path, **cli):
    return build_config(FinetuneConfig, {}, {"data": str(tmp_path), **cli})


def test_nothing_set_gets_the_whole_recipe():
    assert recipe_values(frozenset({"data"}), has_init=False) == ALL


@pytest.mark.parametrize("explicit,has_init,kept", [
    ({"model"}, False, {"model", "img_size", "layer_decay"}),           # explicit --model keeps its model
    ({"preset"}, False, {"model", "img_size", "layer_decay"}),          # --preset names a mae_vit encoder
    (set(), True, {"model", "img_size", "layer_decay"}),                # --init (MAE -> finetune) keeps it
    ({"epochs"}, False, {"min_steps", "warmup_steps"}),                 # an explicit schedule keeps its length
    ({"max_steps"}, False, {"min_steps", "warmup_steps"}),
    ({"img_size", "batch_size", "dihedral"}, False, {"img_size", "batch_size", "dihedral"}),
])
def test_explicit_options_are_never_overridden(explicit, has_init, kept):
    got = recipe_values(frozenset(explicit | {"data"}), has_init)
    assert set(got) == set(ALL) - kept
    assert all(got[k] == ALL[k] for k in got)


def test_explicit_min_steps_still_gets_a_warmup_in_steps():
    assert recipe_values(frozenset({"data", "min_steps"}), False)["warmup_steps"] == 30


def test_when_the_recipe_applies(tmp_path):
    small = choose_recipe(cfg_of(tmp_path), n_images=111)
    assert small.name == "small-data" and small.filled == ALL
    assert "111 labelled images < 2000" in small.line() and "--model resnet18" in small.line()
    assert "--dihedral true" in small.line()
    assert choose_recipe(cfg_of(tmp_path), n_images=SMALL_DATA_IMAGES).name == "none"
    assert choose_recipe(cfg_of(tmp_path, recipe="none"), n_images=10).name == "none"
    embedded = build_config(FinetuneConfig, {}, {})
    assert choose_recipe(embedded).name == "none"  # the embedded smoke-test set keeps the plain defaults
    forced = build_config(FinetuneConfig, {}, {"recipe": "small-data"})
    assert choose_recipe(forced).name == "small-data"


def test_apply_keeps_explicit_values_and_drops_the_vit_preset(tmp_path):
    cfg = cfg_of(tmp_path, img_size=96, epochs=40)
    apply_recipe(cfg, choose_recipe(cfg, n_images=111))
    assert (cfg.model, cfg.preset, cfg.img_size, cfg.epochs, cfg.min_steps) == ("resnet18", None, 96, 40, 0)
    assert (cfg.ema, cfg.tta, cfg.dihedral, cfg.batch_size, cfg.layer_decay) == (0.0, "none", True, 16, 1.0)
    vit = cfg_of(tmp_path, model="mae_vit")
    apply_recipe(vit, choose_recipe(vit, n_images=111))
    assert (vit.model, vit.preset, vit.img_size, vit.layer_decay) == ("mae_vit", "demo", None, 0.75)


def test_a_config_built_in_code_is_all_explicit(tmp_path):
    cfg = FinetuneConfig(data=str(tmp_path))   # not through build_config: nothing may be overridden
    assert choose_recipe(cfg, n_images=5).filled == {}


@pytest.mark.slow
@pytest.mark.skipif(not MINI.is_dir(), reason="../shared/data/isic-cc0-mini is absent")
def test_mini_set_with_no_other_option_runs_the_recipe(cache, tmp_path, capsys):
    from safetensors import safe_open

    from dermfast.train.cli import main as train_main
    from dermfast.train.small_data import count_real_images
    assert count_real_images(str(MINI)) == 111
    out = tmp_path / "ft"
    # --max-steps keeps the test short (it is explicit, so the recipe leaves the schedule alone)
    assert train_main(["--stage", "finetune", "--data", str(MINI), "--max-steps", "2", "--out", str(out),
                       "--loader", "torch", "--workers", "0", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "finetune: recipe small-data (111 labelled images < 2000); filled: --model resnet18" in printed
    assert json.loads((out / "recipe.json").read_text())["filled"]["dihedral"] is True
    with safe_open(str(out / "checkpoint.safetensors"), framework="pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
    assert meta["model"]["arch"] == "resnet18" and meta["img_size"] == 64
    assert meta["tta"] == "none" and meta["ema"] is None and meta["recipe"] == "small-data"
    # the mini set's validation split holds ~4 melanomas: too few to choose a threshold (MIN_PER_CLASS), so the
    # checkpoint keeps the arg-max rule
    splits = (out / "splits.csv").read_text().splitlines()
    assert sum(1 for r in splits if r.endswith(",val") and ",melanoma," in r) < 10
    assert "threshold" not in meta or meta["threshold"] is None
    assert meta["config"]["min_steps"] == 0 and meta["config"]["dihedral"] is True
    assert not (out / "best.safetensors").exists()  # --select last: the final EMA weights are the model

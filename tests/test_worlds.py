"""Teacher worlds (teachers.WORLDS): the base and conflict setting a recipe trains in, and where its
teachers are shipped."""
import json

import pytest
import yaml

from flowopd_lib import teachers
from flowopd_lib.cli import UserError


def test_a_world_sets_the_recipes_base_and_conflict_and_an_override_still_wins():
    toy, dial = (teachers.recipe_config("pickscore", "runs/x", world_name=w) for w in ("toy", "dial"))
    assert (toy.base, toy.conflict) == ("toy", 0.0) and (dial.base, dial.conflict) == ("toy_glyph", 0.5)
    assert teachers.recipe_config("pickscore", "runs/x", {"updates": 5}, "dial").updates == 5
    with pytest.raises(UserError, match="unknown world 'dail'"):
        teachers.recipe_config("pickscore", "runs/x", world_name="dail")


def test_worlds_ship_beside_each_other_and_follow_a_moved_assets_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(teachers, "ASSETS", tmp_path / "teachers")
    assert teachers.assets_of("toy") == tmp_path / "teachers"
    assert teachers.assets_of("dial") == tmp_path / "teachers_dial"
    (tmp_path / "teachers_dial" / "geneval").mkdir(parents=True)
    (tmp_path / "teachers_dial" / "geneval" / "adapter.json").write_text("{}")
    assert list(teachers.shipped(world_name="dial")) == ["geneval"] and teachers.shipped() == {}


def test_the_dial_is_no_recipe_change_for_a_teacher_whose_rewards_do_not_read_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for task, refused in (("geneval", False), ("pickscore", True)):
        cfg = teachers.recipe_config(task, str(run), {"conflict": 0.0}, "dial")  # trained at 0 in the dial world
        (run / "config.yaml").write_text(cfg.to_yaml())
        if refused:
            with pytest.raises(UserError, match=r"conflict: run 0\.0, recipe 0\.5"):
                teachers.check_run_follows_recipe(task, run, "dial")
        else:
            teachers.check_run_follows_recipe(task, run, "dial")
    assert yaml.safe_load((run / "config.yaml").read_text())["base"] == "toy_glyph"


def test_a_world_changes_a_recipe_only_where_it_says(tmp_path):
    """WORLD_CHANGES: the dial world's OCR teacher trains 100 updates (the glyph base learns OCR fast),
    the toy world's keeps its 300; a run at the other budget is not the world's recipe."""
    assert teachers.recipe_config("ocr", "x", world_name="dial").updates == 100
    assert teachers.recipe_config("ocr", "x").updates == teachers.RECIPES["ocr"][1]["updates"] == 300
    assert teachers.recipe_config("geneval", "x", world_name="dial").updates == teachers.RECIPES["geneval"][1]["updates"]
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(teachers.recipe_config("ocr", str(run), {"updates": 300}, "dial").to_yaml())
    with pytest.raises(UserError, match=r"updates: run 300, recipe 100.*WORLD_CHANGES\['dial'\]"):
        teachers.check_run_follows_recipe("ocr", run, "dial")


def test_the_cross_task_matrix_is_each_teachers_record_in_task_order(tmp_path, monkeypatch):
    monkeypatch.setattr(teachers, "ASSETS", tmp_path / "teachers")
    changes = {"pickscore": {"geneval": (-0.1, -0.15, -0.05), "pickscore": (0.2, 0.15, 0.25)},
               "geneval": {"geneval": (0.18, 0.12, 0.23), "pickscore": (0.01, -0.02, 0.04)}}
    for task, change in changes.items():
        (tmp_path / "teachers_dial" / task).mkdir(parents=True)
        (tmp_path / "teachers_dial" / task / "adapter.json").write_text(json.dumps({"metrics": {"change": {
            m: dict(zip(("diff", "low", "high"), v)) for m, v in change.items()}}}))
    table = teachers.matrix(world_name="dial")
    assert list(table.index) == ["geneval teacher", "pickscore teacher"]  # RECIPES' order, not the folders'
    assert table.loc["pickscore teacher", "geneval"] == "-0.100 [-0.150, -0.050]*"
    assert table.loc["geneval teacher", "pickscore"] == "+0.010 [-0.020, +0.040]"  # covers 0: no mark
    (tmp_path / "teachers_dial" / "geneval" / "adapter.json").write_text("{}")
    with pytest.raises(UserError, match=r"geneval/adapter.json has no recorded changes"):
        teachers.matrix(world_name="dial")

"""The GRPO probes behind the diagnosis in docs/findings.md (flowopd_lib/diagnostics/probe.py)."""
import torch

from flowopd_lib import rewards, toy
from flowopd_lib.diagnostics import probe


def test_probe_rewards_on_known_images():
    red = torch.zeros(2, 3, 8, 8)
    red[:, 0] = 1
    assert torch.allclose(rewards.score("probe_redness", red, ["a", "b"])["reward"], torch.ones(2))
    assert rewards.score("probe_redness", torch.ones(2, 3, 8, 8), ["a", "b"])["reward"].abs().max() == 0
    prompts = [p for p in toy.sample_prompts("geneval", n=64, split="test", seed=0) if probe.named_colour(p)][:8]
    images = toy.render(prompts, seed=0)
    area = rewards.score("probe_colour_area", images, prompts)["reward"]
    assert (area > 0.01).all()  # every render shows its named colour
    assert (rewards.score("probe_colour_area", torch.zeros_like(images), prompts)["reward"] < area).all()


def test_train_reports_before_and_after_and_cosine_is_a_cosine(tmp_path, monkeypatch):
    monkeypatch.setattr(probe, "EVAL_PROMPTS", 8)
    tiny = dict(prompts_per_update=2, group_size=4, sde_steps=3, lr=0.01, minibatches=1, beta=0.0)
    before, after = probe.train("probe_redness", 1, str(tmp_path / "run"), **tiny)
    assert set(before) == set(after) == {"probe_redness"} and before != after
    assert (tmp_path / "run" / "probe.json").exists()
    cosines = probe.gradient_cosines("probe_redness", batches=3, **{k: v for k, v in tiny.items()
                                                                    if k not in ("lr", "minibatches", "beta")})
    assert len(cosines) == 3 and all(-1 <= c <= 1 for c in cosines)


def test_distill_trains_teachers_merge_mix_and_student(tmp_path, monkeypatch):
    monkeypatch.setattr(probe, "EVAL_PROMPTS", 4)
    shared = dict(prompts_per_update=2, group_size=2, sde_steps=2)
    table = probe.distill(str(tmp_path), n_updates=1, shared=shared)
    assert list(table.columns) == ["probe_redness", "probe_colour_area"] and len(table) == 6
    assert table.notna().all().all()
    assert table.loc["base"].tolist() != table.loc["Flow-OPD (merge init)"].tolist()
    assert (tmp_path / "distill.csv").exists() and (tmp_path / "opd" / "adapter").is_dir()
    # a student variant reuses the finished teachers (same numbers) and trains into its own folder
    variant = probe.distill(str(tmp_path), n_updates=1, shared=shared, mar_lambda=0.0)
    assert variant.iloc[:5].equals(table.iloc[:5])
    assert variant.index[-1] == "Flow-OPD (merge init, mar_lambda=0.0)"
    assert (tmp_path / "opd_mar_lambda=0.0" / "adapter").is_dir()
    assert all(probe.named_colour(p) for p in probe.colour_prompts(5, "train", 0))
    assert probe._slug({"geneval": 3, "pickscore": 1}) == "geneval:3,pickscore:1"


def test_line_search_steps_along_the_averaged_gradient():
    tiny = dict(prompts_per_update=2, group_size=4, sde_steps=3)
    table = probe.gradient_line_search("probe_redness", batches=3, step_lrs=(1e-3, 1.0), n_eval=4, **tiny)
    assert table["direction"].tolist() == ["none"] + ["mean of 3 batches"] * 2 + ["one batch"] * 2
    assert table["step_lr"].tolist() == [0.0, 1e-3, 1.0, 1e-3, 1.0]
    base = probe.eval_reward(probe.models.load_base("toy"), "probe_redness",
                             probe.data.prompts("pickscore", 4, "test", 0))["probe_redness"]
    assert table["probe_redness"][0] == base  # the zero step is the base itself
    assert table["probe_redness"][2] != base  # a step of norm sqrt(#params) changes the samples
    loo = table.attrs["loo_cosines"]
    assert len(loo) == 3 and all(-1 <= c <= 1 for c in loo)
    scores = probe.eval_reward(probe.models.load_base("toy"), "pickscore", probe.data.prompts("pickscore", 2, "test", 0))
    assert set(scores) == {"pickscore", "true"}  # the learned proxy and the hidden taste it stands for

"""The evaluation table: columns, the Avg column, determinism, ground truth scores high."""
import pandas as pd
import pytest
import torch

from flowopd_lib import evaluation, toy
from flowopd_lib.models import ToyFlowModel


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return ToyFlowModel("tiny")


def test_table_has_every_metric_and_the_average(tiny):
    table = evaluation.evaluate({"a": tiny}, n_prompts=12, steps=2, cfg_scale=2.0, seed=1)
    row = table.loc["a"]
    for col in ("geneval", "ocr", "pickscore", "pickscore_true", "deqa", "Avg", "geneval_partial"):
        assert col in table.columns
    assert any(c.startswith("geneval/") for c in table.columns)
    expected = (row.geneval + row.ocr + row.pickscore + row.deqa / 5) / 4
    assert row.Avg == pytest.approx(expected)
    assert 1 <= row.deqa <= 5 and 0 <= row.geneval <= 1
    again = evaluation.evaluate({"a": tiny}, n_prompts=12, steps=2, cfg_scale=2.0, seed=1)
    assert table.equals(again)


def test_task_metrics_on_ground_truth_renders_are_high():
    prompts = toy.sample_prompts("geneval", n=60, split="test", seed=0)
    metrics = evaluation.task_metrics("geneval", prompts, toy.render(prompts, seed=0))
    assert metrics["geneval"] >= 0.98 and metrics["geneval/counting"] >= 0.98
    prompts = toy.sample_prompts("ocr", n=30, split="test", seed=0)
    assert evaluation.task_metrics("ocr", prompts, toy.render(prompts, seed=0))["ocr"] >= 0.98


def test_cache_reuses_the_same_weights_and_misses_changed_ones(tmp_path, monkeypatch):
    from flowopd_lib import adapters, rollout
    from tiny import tiny_model

    model = tiny_model()
    adapters.add(model, "a", rank=2)
    calls = []
    generate = rollout.generate
    monkeypatch.setattr(rollout, "generate", lambda *a, **k: calls.append(1) or generate(*a, **k))
    protocol = dict(tasks=("geneval", "ocr"), n_prompts=6, steps=2, cfg_scale=2.0, seed=1, cache_dir=tmp_path)
    views = {"base": adapters.view(model, None), "a": adapters.view(model, "a")}
    first = evaluation.evaluate(views, **protocol)
    assert len(calls) == 4 and len(list(tmp_path.glob("*.json"))) == 4

    adapters.add(model, "b", rank=2)  # another adapter on the base changes neither view's samples
    again = evaluation.evaluate(views, **protocol)
    assert len(calls) == 4
    pd.testing.assert_frame_equal(first, again)

    with torch.no_grad():  # new weights for "a": measured anew; the base view still cached
        adapters.parameters(model, "a")[0].add_(1.0)
        adapters.parameters(model, "a")[1].add_(1.0)
    evaluation.evaluate(views, **protocol)
    assert len(calls) == 6
    evaluation.evaluate(views, **{**protocol, "steps": 3})  # another protocol: no reuse
    assert len(calls) == 10

    adapters.save(model, "a", tmp_path / "saved_a")  # the same weights under another name: reused
    adapters.load(model, tmp_path / "saved_a", "a_again")
    evaluation.evaluate({"a": adapters.view(model, "a_again")}, **protocol)
    assert len(calls) == 10
    fresh = tiny_model()  # the base alone, before any adapter wraps its layers: reused
    evaluation.evaluate({"base": adapters.view(fresh, None)}, **protocol)
    assert len(calls) == 10
    evaluation.evaluate({"plain": fresh}, **protocol)  # a plain model: all its weights count, reused when unchanged
    evaluation.evaluate({"plain": fresh}, **protocol)
    assert len(calls) == 12


def test_cache_misses_when_the_judging_scorer_is_retrained(tmp_path, monkeypatch):
    from flowopd_lib import rewards, rollout

    model = ToyFlowModel("tiny")
    calls = []
    generate = rollout.generate
    monkeypatch.setattr(rollout, "generate", lambda *a, **k: calls.append(1) or generate(*a, **k))
    protocol = dict(tasks=("pickscore",), n_prompts=4, steps=2, cfg_scale=2.0, seed=1, cache_dir=tmp_path)
    assert len(rewards.version("pickscore")) == 16 and rewards.version("geneval") == ""
    evaluation.evaluate(model, **protocol)
    evaluation.evaluate(model, **protocol)
    assert len(calls) == 1
    monkeypatch.setitem(rewards._VERSIONS, "pickscore", lambda: "retrained")  # new scorer weights
    evaluation.evaluate(model, **protocol)
    assert len(calls) == 2

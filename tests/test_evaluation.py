"""The evaluation table: columns, the Avg column, determinism, ground truth scores high."""
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

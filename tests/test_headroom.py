"""pass@k and headroom: the estimator's analytic cases, exact success on ground truth, the table."""
import math

import numpy as np
import pytest
import torch

from flowopd_lib import evaluation, toy


def test_pass_at_k_analytic_cases():
    assert evaluation.pass_at_k(np.ones((3, 4), bool), 1)[0] == 1.0
    assert evaluation.pass_at_k(np.ones((3, 4), bool), 4) == (1.0, 0.0)
    assert evaluation.pass_at_k(torch.zeros(3, 4), 4) == (0.0, 0.0)
    one_of_two = torch.tensor([[True, False]])
    assert evaluation.pass_at_k(one_of_two, 1)[0] == pytest.approx(0.5)
    assert evaluation.pass_at_k(one_of_two, 2)[0] == pytest.approx(1.0)
    assert math.isnan(evaluation.pass_at_k(one_of_two, 1)[1])  # one prompt: no spread to measure
    # n=4, c=1, k=2: 1 - C(3, 2) / C(4, 2) = 1 - 3/6
    assert evaluation.pass_at_k([[0, 0, 1, 0]], 2)[0] == pytest.approx(0.5)
    # n=5, c=2, k=3: 1 - C(3, 3) / C(5, 3) = 0.9; averaged with a prompt at 0 -> 0.45, se = 0.45
    mean, se = evaluation.pass_at_k([[1, 0, 1, 0, 0], [0, 0, 0, 0, 0]], 3)
    assert mean == pytest.approx(0.45) and se == pytest.approx(np.std([0.9, 0.0], ddof=1) / np.sqrt(2))


def test_pass_at_k_equals_the_mean_over_subsets_and_grows_with_k():
    s = np.random.default_rng(0).random((20, 6)) < 0.3
    values = [evaluation.pass_at_k(s, k)[0] for k in range(1, 7)]
    assert values[0] == pytest.approx(s.mean())
    assert all(a <= b + 1e-12 for a, b in zip(values, values[1:])) and values[0] < values[-1]
    from itertools import combinations  # brute force: the share of k-subsets holding a success
    brute = np.mean([np.mean([s[p, list(c)].any() for c in combinations(range(6), 3)]) for p in range(20)])
    assert values[2] == pytest.approx(brute)


@pytest.mark.parametrize("k", [0, 5])
def test_pass_at_k_rejects_k_outside_1_to_n(k):
    with pytest.raises(ValueError, match=rf"k={k}.*n=4"):
        evaluation.pass_at_k(np.ones((2, 4), bool), k)


def test_success_is_exact_on_ground_truth_renders():
    for task, n in (("geneval", 60), ("ocr", 30)):
        prompts = toy.sample_prompts(task, n=n, split="test", seed=0)
        ok = evaluation.success(task, prompts, toy.render(prompts, seed=0))
        assert ok.dtype == torch.bool and ok.shape == (n,)
        assert ok.float().mean() >= 0.98, task
    prompts = toy.sample_prompts("ocr", n=4, split="test", seed=0)
    blank = torch.ones(4, 3, 32, 32)  # white canvases: nothing read, nothing right
    assert not evaluation.success("ocr", prompts, blank).any()
    with pytest.raises(ValueError, match="pickscore.*geneval.*ocr"):
        evaluation.success("pickscore", prompts, blank)


def test_headroom_table_of_a_tiny_model():
    from tiny import tiny_model

    model = tiny_model()
    kwargs = dict(n_prompts=6, samples_per_prompt=2, ks=(1, 2), steps=2, cfg_scale=2.0)
    table = evaluation.headroom(model, **kwargs)
    tags = [f"geneval/{t}" for t in toy.grammar.GENEVAL_TAGS]  # 6 prompts: one per category
    assert list(table.index) == ["geneval", *tags, "ocr"]
    assert list(table.columns) == ["pass@1", "pass@2", "pass@1_se", "pass@2_se", "headroom", "prompts"]
    assert table.loc["geneval", "prompts"] == 6 and table.loc["ocr", "prompts"] == 6
    assert (table.loc[tags, "prompts"] == 1).all()
    for col in ("pass@1", "pass@2"):
        assert table[col].between(0, 1).all()
    assert (table["pass@2"] >= table["pass@1"] - 1e-12).all()
    assert np.allclose(table["headroom"], table["pass@2"] - table["pass@1"])
    assert table.loc["geneval", "pass@1"] == pytest.approx(table.loc[tags, "pass@1"].mean())
    assert table.equals(evaluation.headroom(model, **kwargs))  # same seeds, same table


def test_headroom_samples_are_paired_seeds_and_checks_before_generating(monkeypatch):
    from flowopd_lib import rollout
    from flowopd_lib.models import ToyFlowModel

    seeds = []
    generate = rollout.generate
    monkeypatch.setattr(rollout, "generate", lambda *a, **k: seeds.append(k["seed"]) or generate(*a, **k))
    model = ToyFlowModel("tiny")
    table = evaluation.headroom(model, tasks=("ocr",), n_prompts=3, samples_per_prompt=3, ks=(1, 3), steps=1, seed=5)
    assert seeds == [5, 6, 7] and list(table.index) == ["ocr"]
    with pytest.raises(ValueError, match="k=4.*n=3"):
        evaluation.headroom(model, tasks=("ocr",), samples_per_prompt=3, ks=(1, 4))
    with pytest.raises(ValueError, match="deqa"):
        evaluation.headroom(model, tasks=("deqa",))
    assert len(seeds) == 3


def test_headroom_counts_a_prompt_solved_by_any_of_its_samples(monkeypatch):
    """Samples alternate between ground truth (even seeds) and blank canvases (odd seeds): every
    prompt is solved by one sample of two, so pass@1 ~ 0.5, pass@2 ~ 1 and headroom ~ 0.5."""
    from flowopd_lib import rollout
    from flowopd_lib.models import ToyFlowModel

    drawn = {}

    def prompts_for_task(task, n, seed):
        drawn[task] = toy.sample_prompts(task, n=n, split="test", seed=seed)
        return drawn[task]

    def fake_generate(model, texts, seed, **kwargs):
        prompts = next(ps for ps in drawn.values() if [p.text for p in ps] == texts)
        return toy.render(prompts, seed=0) if seed % 2 == 0 else torch.ones(len(texts), 3, 32, 32)

    monkeypatch.setattr(rollout, "generate", fake_generate)
    table = evaluation.headroom(ToyFlowModel("tiny"), n_prompts=12, samples_per_prompt=2, ks=(1, 2), seed=4,
                                prompts_for_task=prompts_for_task)
    for row in ("geneval", "ocr", "geneval/counting"):
        assert table.loc[row, "pass@1"] == pytest.approx(0.5, abs=0.05)
        assert table.loc[row, "pass@2"] == pytest.approx(1.0, abs=0.1)
        assert table.loc[row, "headroom"] == pytest.approx(0.5, abs=0.1)
    assert table.loc["geneval/counting", "prompts"] == 2

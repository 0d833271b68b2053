"""Standard errors and paired bootstrap intervals: analytic cases, and the evaluation tables built on them."""
import numpy as np
import pytest
import torch

from flowopd_lib import evaluation, stats, toy

def test_metric_is_the_mean_over_strata_of_stratum_means():
    values, strata = [1, 1, 1, 0, 0.5], ["a", "a", "a", "b", "b"]
    assert stats.metric(values, strata) == pytest.approx((1 + 0.25) / 2)
    assert stats.metric(values, ["x"] * 5) == pytest.approx(3.5 / 5)

def test_standard_error_matches_the_textbook_formula():
    rng = np.random.default_rng(0)
    values = rng.normal(size=50)
    value, se = stats.metric_and_se(values, ["x"] * 50)
    assert value == pytest.approx(values.mean()) and se == pytest.approx(values.std(ddof=1) / np.sqrt(50))
    # two strata: the errors of the two means combine, halved by the average
    a, b = values[:20], values[20:]
    _, se2 = stats.metric_and_se(values, ["a"] * 20 + ["b"] * 30)
    assert se2 == pytest.approx(np.sqrt(a.var(ddof=1) / 20 + b.var(ddof=1) / 30) / 2)

def test_paired_difference_of_a_constant_shift_is_exact_and_pairing_removes_prompt_noise():
    rng = np.random.default_rng(1)
    prompt_difficulty = rng.normal(size=200) * 5  # large, shared by both models
    a, b = prompt_difficulty + 0.1, prompt_difficulty
    diff, low, high = stats.paired_difference(a, b, ["x"] * 200)
    assert diff == pytest.approx(0.1) and low == pytest.approx(0.1) and high == pytest.approx(0.1)
    noisy = a + rng.normal(size=200) * 0.05
    diff, low, high = stats.paired_difference(noisy, b, ["x"] * 200)
    assert low < 0.1 < high and high - low < 0.05  # unpaired, the prompt spread (5) would swamp 0.1
    with pytest.raises(ValueError, match="same prompts"):
        stats.paired_difference(a, b[:10], ["x"] * 200)

def test_paired_ratio_of_a_scaled_model_is_exact_and_uses_stratified_means():
    rng = np.random.default_rng(2)
    b = rng.uniform(0.2, 1.0, size=60)
    strata = ["a"] * 20 + ["b"] * 40
    assert stats.paired_ratio(0.9 * b, b, strata) == pytest.approx((0.9, 0.9, 0.9))
    a = b + rng.normal(size=60) * 0.1
    ratio, _, _ = stats.paired_ratio(a, b, strata)
    assert ratio == pytest.approx((a[:20].mean() + a[20:].mean()) / (b[:20].mean() + b[20:].mean()))
    assert ratio != pytest.approx(np.mean(a / b), abs=1e-4)  # not the mean of per-prompt ratios


def test_paired_ratio_interval_matches_the_delta_method():
    rng = np.random.default_rng(3)
    n = 400
    b = 1.0 + rng.normal(size=n) * 0.3
    a = 0.8 * b + rng.normal(size=n) * 0.1
    ratio, low, high = stats.paired_ratio(a, b, ["x"] * n, n_boot=4000)
    # var(mean a / mean b) ~ var(a - R b) / (n mean(b)^2)
    se = np.std(a - ratio * b, ddof=1) / np.sqrt(n) / b.mean()
    assert low < ratio < high
    assert (high - low) == pytest.approx(2 * 1.96 * se, rel=0.15)


def test_paired_bootstrap_resamples_seeds_as_well_as_prompts():
    rng = np.random.default_rng(4)
    b = rng.normal(size=50)
    # two seeds of model a, shifted by 0 and 1: seed resampling alone gives means 0, 0.5, 1 with
    # chances 1/4, 1/2, 1/4, so the 95% interval of the difference is exactly [0, 1] around 0.5
    diff, low, high = stats.paired_bootstrap(np.subtract, [np.stack([b, b + 1]), b], ["x"] * 50)
    assert (diff, low, high) == pytest.approx((0.5, 0.0, 1.0))
    # one seed: the same interval as paired_difference (other draws, so up to bootstrap noise)
    a = b + 0.1 + rng.normal(size=50) * 0.05
    one = stats.paired_bootstrap(np.subtract, [a, b], ["x"] * 50)
    two = stats.paired_difference(a, b, ["x"] * 50)
    assert one[0] == pytest.approx(two[0]) and one[1:] == pytest.approx(two[1:], abs=0.005)
    with pytest.raises(ValueError, match="same prompts"):
        stats.paired_bootstrap(np.subtract, [a, b[:10]], ["x"] * 50)


def test_sample_scores_summarise_and_compare_on_ground_truth_and_blank_images(monkeypatch):
    """A 'model' that draws the ground truth against one that draws blank canvases."""

    prompts = {task: toy.sample_prompts(task, n=12, split="test", seed=0) for task in ("geneval", "ocr")}
    by_text = {p.text: p for ps in prompts.values() for p in ps}
    truth = lambda texts, seed: toy.render([by_text[t] for t in texts], seed=seed)  # noqa: E731
    blank = lambda texts, seed: torch.ones(len(texts), 3, 32, 32)  # noqa: E731
    monkeypatch.setattr(evaluation.rollout, "generate", lambda model, texts, **kw: model(texts, kw["seed"]))
    scores = evaluation.sample_scores({"truth": truth, "blank": blank}, tasks=("geneval", "ocr"), n_prompts=12,
                                      samples_per_prompt=2, prompts_for_task=lambda task, n, s: prompts[task])
    assert set(scores["sample"]) == {0, 1} and len(scores) == 2 * 2 * 2 * 12
    table = evaluation.summarise(scores)
    assert table.loc["truth", "geneval"] >= 0.95 and table.loc["blank", "geneval"] == 0
    assert table.loc["truth", "ocr"] >= 0.95 and table.loc["blank", "ocr_se"] == 0
    diff = evaluation.compare(scores, "truth", "blank")
    assert diff.loc["geneval", "low"] > 0.5 and diff.loc["ocr", "diff"] == pytest.approx(
        table.loc["truth", "ocr"] - table.loc["blank", "ocr"])
    with pytest.raises(ValueError, match="no 'geneval' scores for 'nobody'"):
        evaluation.compare(scores, "nobody", "blank")

def test_sample_scores_of_sample_zero_equal_evaluate():
    from tiny import tiny_model

    model = tiny_model()
    kwargs = dict(tasks=("ocr", "pickscore"), n_prompts=6, steps=2, cfg_scale=2.0, seed=3)
    table = evaluation.summarise(evaluation.sample_scores(model, samples_per_prompt=1, **kwargs))
    reference = evaluation.evaluate(model, **kwargs)
    for column in ("ocr", "pickscore", "pickscore_true"):
        assert table.loc["model", column] == pytest.approx(reference.loc["model", column], abs=1e-6)


def test_sample_scores_cache_reuses_the_same_weights(tmp_path, monkeypatch):
    from tiny import tiny_model

    model = tiny_model()
    kwargs = dict(tasks=("pickscore",), n_prompts=4, samples_per_prompt=2, steps=2, cfg_scale=1.0, cache_dir=tmp_path)
    first = evaluation.sample_scores(model, **kwargs)
    calls = []
    monkeypatch.setattr(evaluation.rollout, "generate", lambda *a, **k: calls.append(1))
    again = evaluation.sample_scores(model, **kwargs)
    assert not calls and first.equals(again)
    with pytest.raises(TypeError):  # another protocol misses the cache and generates
        evaluation.sample_scores(model, **{**kwargs, "samples_per_prompt": 3})


def test_summary_tables_format_errors_and_render_a_results_page(tmp_path):
    import json

    import pandas as pd
    import yaml

    from flowopd_lib import summary

    measured = pd.DataFrame({"geneval": [0.3, 0.5], "geneval_se": [0.02, 0.03], "ocr": [0.2, 0.4],
                             "ocr_se": [0.01, 0.01], "pickscore": [0.4, 0.4], "pickscore_se": [0.0, 0.0],
                             "deqa": [3.0, 3.5], "deqa_se": [0.1, 0.1]}, index=["None", "t"])
    measured = summary.with_average(measured)
    assert measured.loc["t", "Avg"] == pytest.approx((0.5 + 0.4 + 0.4 + 0.7) / 4)
    folder = tmp_path / "run" / "summary"
    folder.mkdir(parents=True)
    table = summary.rows_of(measured, {"base": None})
    shown = summary.save("main", table, folder)
    assert shown.loc["base", "geneval"] == "0.300 ± 0.020" and shown.loc["base", "budget"] == "pretrained base"
    (tmp_path / "run" / "provenance.json").write_text(json.dumps(
        {"git": {"commit": "abc", "dirty": False}, "argv": ["runs.py", "papermill_runs/toy_full.yaml"],
         "started": "now", "torch_threads": 1}))
    (tmp_path / "run" / "spec.yaml").write_text(yaml.safe_dump({"name": "toy_full", "stages": []}))
    (folder / "parameters.yaml").write_text(yaml.safe_dump({"eval_prompts": 90, "eval_cfg": 1.0}))
    page = summary.render(tmp_path / "run")
    assert "`abc`" in page and "toy_full.yaml" in page and "eval_prompts 90" in page
    assert "## main" in page and "0.300 ± 0.020" in page and "## Figures" not in page

    (folder / "main_table.png").write_bytes(b"png")  # the command copies figures beside the page and links them
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{summary.README_START}\nold numbers\n{summary.README_END}\nafter\n")
    (tmp_path / "docs").mkdir()  # --out's folder must exist: a typo creates nothing
    summary.main([str(tmp_path / "run"), "--out", str(tmp_path / "docs" / "results.md"), "--readme", str(readme)])
    page = (tmp_path / "docs" / "results.md").read_text()
    assert "![main_table](figures/run/main_table.png)" in page
    assert (tmp_path / "docs" / "figures" / "run" / "main_table.png").read_bytes() == b"png"
    text = readme.read_text()
    assert "old numbers" not in text and "0.300 ± 0.020" in text and "`abc`" in text
    assert "[docs/results.md](docs/results.md)" in text and text.endswith(f"{summary.README_END}\nafter\n")
    with pytest.raises(ValueError, match="generated-results"):
        summary.replace_block("# no markers\n", "table")

"""diagnostics.eval_power: the paired interval's half-width against the evaluation's size."""
import numpy as np
import pandas as pd

from flowopd_lib.diagnostics.eval_power import half_widths


def synthetic_scores(prompts: int, samples: int, shift: float, noise: float, seed: int = 0) -> pd.DataFrame:
    """Per-sample rows of two models: each prompt has its own difficulty (shared, so pairing removes it),
    each sample its own noise."""
    rng = np.random.default_rng(seed)
    difficulty = rng.normal(0, 0.3, prompts)
    rows = []
    for model, offset in (("base", 0.0), ("teacher", shift)):
        for j in range(samples):
            values = difficulty + offset + rng.normal(0, noise, prompts)
            rows.append(pd.DataFrame({"model": model, "metric": "ocr", "prompt": range(prompts), "sample": j,
                                      "stratum": "ocr", "value": values}))
    return pd.concat(rows, ignore_index=True)


def test_a_constant_shift_is_decided_exactly_and_pairing_removes_prompt_difficulty():
    table = half_widths(synthetic_scores(60, 2, shift=0.1, noise=0.0), "ocr", [30, 60], [1, 2])
    assert np.allclose(table["diff"], 0.1) and np.allclose(table["half_width"], 0.0, atol=1e-12)


def test_the_half_width_falls_with_prompts_and_samples():
    table = half_widths(synthetic_scores(200, 8, shift=0.1, noise=0.5), "ocr", [50, 200], [1, 8]).set_index(
        ["prompts", "samples"])["half_width"]
    assert table[(200, 1)] < table[(50, 1)] and table[(200, 8)] < table[(200, 1)]
    assert abs(table[(200, 1)] / table[(50, 1)] - 0.5) < 0.15  # ~1/sqrt(prompts)


def test_each_task_is_sampled_on_its_test_file_once(monkeypatch):
    # GenEval's draws repeat by design and other tasks refuse more than their file: ask for the file's size
    from flowopd_lib.diagnostics import eval_power

    asked = {}
    monkeypatch.setattr(eval_power.evaluation, "sample_scores", lambda views, tasks, n_prompts, **k: asked.update({tasks[0]: n_prompts}))
    for task in ("geneval", "ocr", "pickscore", "deqa"):
        eval_power.sample_table(task, samples=1)
    assert asked == {"geneval": 90, "ocr": 200, "pickscore": 200, "deqa": 200}

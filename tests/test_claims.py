"""The paper's claims on synthetic score tables whose answers are known by construction.

Every model's scores are its level per metric plus a prompt effect shared by all models plus its own
noise, both centred within each stratum: each model's metric equals its level exactly, so a claim
can be made to hold clearly, fail clearly, or sit exactly on its threshold (cannot tell). Each claim
is checked in all three worlds, so none passes by always answering the same."""
import numpy as np
import pandas as pd
import pytest

from flowopd_lib import claims

STRATA = {"geneval": ["counting"] * 20 + ["colors"] * 20 + ["position"] * 20}
PROMPTS = 60
BASE = {"geneval": 0.30, "ocr": 0.30, "pickscore": 0.50, "deqa": 3.0}
TEACHERS = {"geneval": {"geneval": 0.60, "ocr": 0.25},       # each lifts its own metric, hurts another
            "ocr": {"ocr": 0.70, "pickscore": 0.45},
            "pickscore": {"pickscore": 0.70, "deqa": 2.8},
            "deqa": {"deqa": 3.6, "geneval": 0.25}}
STUDENT = {"geneval": 0.62, "ocr": 0.69, "pickscore": 0.69, "deqa": 3.59}
SEEDS = (-0.004, 0.0, 0.004)  # three student seeds around its level (they average to it)
SEESAW = {"+geneval": {"geneval": 0.60},
          "+ocr": {"geneval": 0.45, "ocr": 0.65},            # +ocr lowers the geneval +geneval raised
          "+pickscore": {"geneval": 0.45, "ocr": 0.55, "pickscore": 0.68},
          "+deqa": {"geneval": 0.45, "ocr": 0.55, "pickscore": 0.68, "deqa": 3.5}}
ROLES = {"base": "base", "teachers": {t: f"teacher {t}" for t in TEACHERS}, "mix": "mix",
         "seesaw": {"start": "base", **{k[1:]: k for k in SEESAW}},
         "students": [f"student {i}" for i in range(len(SEEDS))], "students_without_mar": "no MAR"}


def levels(**changes) -> dict[str, dict[str, float]]:
    """Each model's metric levels: a world where every claim holds, with `changes` (model -> metrics)."""
    world = {"base": BASE, "mix": {"geneval": 0.50, "ocr": 0.60, "pickscore": 0.60, "deqa": 3.2},
             "no MAR": {**STUDENT, "deqa": 3.3},
             **{f"teacher {t}": {**BASE, **v} for t, v in TEACHERS.items()},
             **{k: {**BASE, **v} for k, v in SEESAW.items()}, "student": STUDENT}
    world = {m: {**v, **changes.get(m, {})} for m, v in world.items()}
    student = world.pop("student")
    world.update({f"student {i}": {k: v + s for k, v in student.items()} for i, s in enumerate(SEEDS)})
    return world


def centred(rng, metric: str, scale: float) -> np.ndarray:
    """Noise [PROMPTS] with mean exactly 0 in each stratum."""
    x = rng.normal(size=PROMPTS) * scale
    strata = np.array(STRATA.get(metric, [metric] * PROMPTS))
    for s in set(strata):
        x[strata == s] -= x[strata == s].mean()
    return x


def scores_of(world: dict, noise: float = 0.02, seed: int = 0) -> pd.DataFrame:
    """A `sample_scores` table (one sample per prompt) whose metrics are exactly the world's levels."""
    rng = np.random.default_rng(seed)
    shared = {m: centred(rng, m, 0.1) for m in BASE}
    frames = [pd.DataFrame({"model": model, "metric": m, "prompt": range(PROMPTS), "sample": 0,
                            "stratum": STRATA.get(m, [m] * PROMPTS),
                            "value": level + shared[m] + centred(rng, m, noise)})
              for model, metrics in world.items() for m, level in metrics.items()]
    return pd.concat(frames, ignore_index=True)


def check(function, world, roles=ROLES):
    pp = claims.per_prompt(scores_of(world))
    return function(pp, roles, "claim", n_boot=1000, seed=0)


# world changes: (does not hold, cannot tell) for each claim; the default world makes each hold
CASES = {
    "teachers_specialise": ({"teacher ocr": {"ocr": 0.25}},               # the OCR teacher lowers OCR
                            {"teacher ocr": {"ocr": 0.30}}),              # ... leaves it exactly as the base
    "mix_trades_metrics": ({"mix": {"geneval": 0.7, "ocr": 0.8, "pickscore": 0.8, "deqa": 3.7}},
                           {"mix": {"geneval": 0.6, "ocr": 0.7, "pickscore": 0.7, "deqa": 3.6}}),
    "stacking_seesaws": ({"+ocr": {"geneval": 0.65, "ocr": 0.65},         # every stage raises every earlier reward
                          "+pickscore": {"geneval": 0.70, "ocr": 0.70, "pickscore": 0.68},
                          "+deqa": {"geneval": 0.75, "ocr": 0.75, "pickscore": 0.72, "deqa": 3.5}},
                         {"+ocr": {"geneval": 0.60, "ocr": 0.65},         # the only drop is exactly 0
                          "+pickscore": {"geneval": 0.70, "ocr": 0.70, "pickscore": 0.68},
                          "+deqa": {"geneval": 0.75, "ocr": 0.75, "pickscore": 0.72, "deqa": 3.5}}),
    "students_keep_skills": ({"student": {"ocr": 0.50}},                  # OCR kept at 0.71 of the teacher's
                             {"student": {"ocr": 0.665}}),                # exactly 0.95 of 0.70
    "students_beat_mix": ({"student": {"deqa": 3.0}}, {"student": {"deqa": 3.2}}),
    "students_surpass_a_teacher": ({"student": {"geneval": 0.55, "ocr": 0.65, "pickscore": 0.65, "deqa": 3.5}},
                                   {"student": {"geneval": 0.60, "ocr": 0.70, "pickscore": 0.70, "deqa": 3.6}}),
    "mar_keeps_quality": ({"no MAR": {"deqa": 3.9}}, {"no MAR": {"deqa": 3.59}}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_claim_holds_fails_or_cannot_tell_as_constructed(name):
    function = getattr(claims, name)
    fails, unsure = CASES[name]
    assert check(function, levels())[1] == claims.HOLDS
    assert check(function, levels(**fails))[1] == claims.FAILS
    assert check(function, levels(**unsure))[1] == claims.UNSURE


def test_a_seesaw_drop_two_stages_later_counts():
    later = levels(**{"+ocr": {"geneval": 0.65, "ocr": 0.65},               # +ocr, +pickscore raise every reward
                      "+pickscore": {"geneval": 0.70, "ocr": 0.70, "pickscore": 0.68},
                      "+deqa": {"geneval": 0.75, "ocr": 0.60, "pickscore": 0.72, "deqa": 3.5}})  # +deqa lowers ocr
    rows, result = check(claims.stacking_seesaws, later)
    assert result == claims.HOLDS and len(rows) == 3 + 6  # 3 stages raise, 6 (earlier, later) pairs


def test_rows_carry_estimates_intervals_and_thresholds():
    rows, _ = check(claims.students_keep_skills, levels(student={"ocr": 0.665}))
    by_metric = {r["metric"]: r for r in rows}
    assert set(by_metric) == {"geneval", "ocr", "pickscore", "deqa"}
    assert by_metric["ocr"]["estimate"] == pytest.approx(0.95)
    assert by_metric["ocr"]["low"] < 0.95 < by_metric["ocr"]["high"] and by_metric["ocr"]["threshold"] == ">= 0.95"
    assert by_metric["deqa"]["estimate"] == pytest.approx(2.59 / 2.6)  # counted from DeQA's floor 1
    assert "3 seeds" in by_metric["ocr"]["comparison"]
    distilled = {**ROLES, "distilled": ["geneval", "ocr"]}
    assert [r["metric"] for r in check(claims.students_keep_skills, levels(), distilled)[0]] == ["geneval", "ocr"]


def test_seed_to_seed_spread_widens_the_interval():
    world = levels()
    world["student 0"]["deqa"] -= 0.05  # seeds 0.05 apart: pooled, the same estimate; resampled, a wider interval
    world["student 2"]["deqa"] += 0.05
    one = check(claims.mar_keeps_quality, world, {**ROLES, "students": "student 1"})[0][0]
    three = check(claims.mar_keeps_quality, world)[0][0]
    assert one["estimate"] == pytest.approx(three["estimate"])
    assert three["high"] - three["low"] > 2 * (one["high"] - one["low"])


def test_verdict_logic():
    H, F, U = claims.HOLDS, claims.FAILS, claims.UNSURE
    assert claims.verdict(0.1, 0.2, ">", 0) == H and claims.verdict(-0.1, 0.2, ">", 0) == U
    assert claims.verdict(-0.1, 0.0, ">", 0) == F and claims.verdict(0.0, 0.0, ">=", 0) == H
    assert claims.verdict(-0.2, -0.1, "<", 0) == H and claims.verdict(0.0, 0.1, "<", 0) == F
    assert claims.verdict(-3e-8, -1e-8, "<", 0) == F and claims.verdict(1e-8, 3e-8, ">", 0) == F  # rounding
    assert claims.verdict(np.nan, np.nan, ">=", 0.95) == U  # e.g. a ratio to a teacher at 0
    assert claims.all_of([H, U]) == U and claims.all_of([H, U, F]) == F and claims.all_of([H, H]) == H
    assert claims.any_of([F, U]) == U and claims.any_of([F, U, H]) == H and claims.any_of([F, F]) == F


def test_evaluate_reports_every_claim_and_missing_roles_as_not_run():
    scores = scores_of(levels())
    overview, detail = claims.evaluate(scores, {**ROLES, "mix_other_budget": "mix"}, n_boot=500)
    assert list(overview["verdict"]) == [claims.HOLDS] * len(claims.CLAIMS)
    assert list(detail.columns) == claims.COLUMNS and len(detail) > len(claims.CLAIMS)
    partial = {k: v for k, v in ROLES.items() if k not in ("mix", "seesaw")}
    partial["students_without_mar"] = "never trained"
    overview, detail = claims.evaluate(scores, partial, n_boot=500)
    verdicts = dict(zip(overview["claim"], overview["verdict"]))
    assert [verdicts[c] for c, *_ in claims.CLAIMS] == [claims.HOLDS, claims.NOT_RUN, claims.NOT_RUN, claims.HOLDS,
                                                        claims.NOT_RUN, claims.HOLDS, claims.NOT_RUN, claims.NOT_RUN,
                                                        claims.NOT_RUN]
    assert "missing: never trained" in set(detail["comparison"]) and "missing: role mix" in set(detail["comparison"])
    assert claims.evaluate(scores.iloc[:0], ROLES)[0]["verdict"].eq(claims.NOT_RUN).all()
    with pytest.raises(ValueError, match="unknown claim roles"):
        claims.evaluate(scores, {**ROLES, "student": "x"})


def test_notebook_labels_and_the_results_page(tmp_path):
    """Notebook 05's path: scores keyed by adapter directory, roles by row label; the page shows the claims first."""
    import json

    import yaml

    from flowopd_lib import summary

    world = levels()
    directories = {name: (None if name == "base" else f"runs/{name}/adapter") for name in world}
    scores = scores_of(world).assign(model=lambda s: s["model"].map(lambda m: str(directories[m])))
    tables = {"main": {n: d for n, d in directories.items() if not n.startswith("+")},
              "seesaw": {"base": None, **{n: d for n, d in directories.items() if n.startswith("+")}}}
    labelled = claims.label_scores(scores, tables, ROLES)
    assert set(labelled["model"]) == set(world)
    with pytest.raises(ValueError, match="names two models"):
        claims.label_scores(scores, {**tables, "mar": {"base": "elsewhere"}}, ROLES)
    overview, detail = claims.evaluate(labelled, ROLES, n_boot=300)
    folder = tmp_path / "run" / "summary"
    folder.mkdir(parents=True)
    summary.save("main", pd.DataFrame({"geneval": [0.3], "geneval_se": [0.01]}, index=["base"]), folder)
    summary.save_claims(overview, detail, folder)
    assert len(pd.read_csv(folder / "claims_table.csv")) == len(detail)
    (tmp_path / "run" / "provenance.json").write_text(json.dumps({"git": {"commit": "abc"}, "argv": ["runs.py"]}))
    (tmp_path / "run" / "spec.yaml").write_text(yaml.safe_dump({"name": "toy", "stages": []}))
    page = summary.render(tmp_path / "run")
    assert page.index("## claims") < page.index("## main")
    assert "| 1 teachers specialise" in page and "cannot tell: it covers the threshold" in page
    assert "0.950 [" not in page and "holds" in page


def test_claims_2_and_5_at_the_other_mix_budget_judge_that_mix_and_only_with_the_role():
    """2b / 5b swap in `mix_other_budget`: a Mix at a teacher's budget that catches every teacher and
    beats the students makes 2b and 5b fail while 2 and 5 (the small-budget Mix) hold."""
    world = levels()
    world["mix long"] = {"geneval": 0.61, "ocr": 0.71, "pickscore": 0.71, "deqa": 3.7}
    overview, _ = claims.evaluate(scores_of(world), {**ROLES, "mix_other_budget": "mix long"}, n_boot=500)
    verdict = overview.set_index("claim")["verdict"]
    assert verdict["2 Mix trades metrics"] == verdict["5 Flow-OPD beats Mix"] == claims.HOLDS
    assert verdict["2b Mix trades metrics (other budget)"] == claims.FAILS
    assert verdict["5b Flow-OPD beats Mix (other budget)"] == claims.FAILS
    overview, detail = claims.evaluate(scores_of(levels()), ROLES, n_boot=200)
    assert overview.set_index("claim").loc["2b Mix trades metrics (other budget)", "verdict"] == claims.NOT_RUN
    assert "missing: role mix_other_budget" in set(detail["comparison"])


def test_each_claim_shows_the_papers_own_numbers_beside_its_verdict():
    """Issue 37 C: a verdict is read against the paper's evidence (SD3.5-M, its Table of results), so
    the overview carries it per claim, and the numbers are the paper's (METHOD.md section 7)."""
    overview, _ = claims.evaluate(scores_of(levels()), ROLES, n_boot=100)
    assert list(overview.columns) == ["claim", "statement", "paper (SD3.5-M)", "verdict"]
    paper = dict(zip(overview["claim"], overview["paper (SD3.5-M)"]))
    assert all(paper[c] for c, *_ in claims.CLAIMS)  # every claim, the other-budget ones included
    assert "0.63 -> 0.51" in paper["1 teachers specialise"]  # the PickScore teacher's GenEval
    assert "0.73" in paper["2 Mix trades metrics"] and "0.94" in paper["2 Mix trades metrics"]
    assert "0.89 (+OCR) -> 0.82 (+PickScore)" in paper["3 stacking seesaws"]
    assert "0.98" in paper["4 Flow-OPD keeps each skill"]  # GenEval 0.92 / 0.94
    assert "+0.19" in paper["5 Flow-OPD beats Mix"] and "0.94 vs 0.92" in paper["6 Flow-OPD surpasses a teacher"]

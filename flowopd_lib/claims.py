"""The paper's claims, one by one, checked against a run's paired per-sample scores.

Each claim becomes rows of measured comparisons (an estimate, its 95% paired bootstrap interval,
the threshold it must clear) and one verdict, so the study says which of the paper's statements its
numbers support instead of leaving the reader to compare tables by eye:

    holds          the interval lies on the claimed side of the threshold
    does not hold  it lies on the other side (for "> t": high <= t; for ">= t": high < t), up to
                   float32 rounding (ATOL)
    cannot tell    it covers the threshold (more prompts or seeds could decide)
    not run        the run lacks a model the claim needs (the row names which)

A claim made of several comparisons combines their verdicts with three-valued (Kleene) logic:
"every ..." holds when all hold and fails when one fails; "some ..." holds when one holds and fails
when all fail; anything else cannot tell.

Input: `evaluation.sample_scores` (columns model, metric, prompt, sample, stratum, value; every model
on the same prompts and noise) and roles naming the models that play each part. A model is a name in
the scores' `model` column, or a list of names: seeds of one model, pooled (per-prompt means
averaged over seeds; the bootstrap resamples the seeds as well as the prompts, so the interval
includes seed-to-seed variation: `stats.paired_bootstrap`).

    roles = {
        "base": "base",
        "teachers": {"geneval": "teacher geneval", "ocr": "teacher ocr",        # task -> its teacher
                     "pickscore": "teacher pickscore", "deqa": "teacher deqa"},
        "mix": "GRPO-Mix",                                                     # multi-reward RL
        "mix_other_budget": "GRPO-Mix (teacher budget)",  # optional: claims 2b and 5b at another budget
        "seesaw": {"start": "base", "geneval": "+geneval", "ocr": "+ocr",      # in order: the model the
                   "pickscore": "+pickscore", "deqa": "+deqa"},                # stages start from, then
                                                                               # reward added -> model
        "students": ["Flow-OPD seed 0", "Flow-OPD seed 1", "Flow-OPD seed 2"], # Flow-OPD with MAR
        "distilled": ["geneval", "ocr", "pickscore"],   # the students' teachers (default: every teacher)
        "students_without_mar": "Flow-OPD without MAR",
    }
    overview, detail = evaluate(scores, roles)

The claims (metrics: the paper's four, geneval, ocr, pickscore, deqa, those the scores hold):
1. every single-reward teacher lifts its own metric over the base (> 0) and lowers another (< 0);
2. Mix falls below a teacher on that teacher's metric (Mix - teacher < 0 for some teacher);
3. stacking seesaws: some stage lowers (< 0, against the stage before it) the reward an earlier
   stage added, where that earlier stage had raised it (> 0); only the stages' own rewards count;
4. Flow-OPD keeps every distilled teacher's skill: student / teacher >= 0.95 on the teacher's metric.
   DeQA (1-5) counts from its floor: (student - 1) / (teacher - 1), i.e. the ratio of (DeQA - 1) / 4,
   since the raw ratio of a 1-5 score would call a model stuck at the floor 20% of a teacher;
5. Flow-OPD beats Mix on every metric (student - Mix > 0);
6. Flow-OPD surpasses some distilled teacher on that teacher's metric (student - teacher > 0);
7. MAR keeps image quality: DeQA of the students with MAR >= without (difference >= 0).
2b, 5b: claims 2 and 5 with `mix_other_budget` as the Mix (not run without that role).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from . import stats

HOLDS, FAILS, UNSURE, NOT_RUN = "holds", "does not hold", "cannot tell", "not run"
METRICS = ("geneval", "ocr", "pickscore", "deqa")
FLOORS = {"deqa": 1.0}  # the lowest score of a metric's scale: ratios count from there
RATIO_THRESHOLD = 0.95
ATOL = 1e-6  # scores are float32: differences this small are rounding, not effects
ROLES = ("base", "teachers", "mix", "mix_other_budget", "seesaw", "students", "distilled", "students_without_mar")
COLUMNS = ["claim", "comparison", "metric", "estimate", "low", "high", "threshold", "verdict"]


# ----------------------------------------------------------------------------- verdicts

def verdict(low: float, high: float, op: str, threshold: float, atol: float = ATOL) -> str:
    """Whether the interval [low, high] shows `estimate op threshold` (op: ">", ">=", "<"); within
    `atol` of the threshold counts as on it (float32 rounding: identical models differ by ~1e-8);
    an undefined interval (NaN, e.g. a ratio to a teacher scoring 0) cannot tell."""
    if op == ">":
        return HOLDS if low > threshold + atol else FAILS if high <= threshold + atol else UNSURE
    if op == ">=":
        return HOLDS if low >= threshold - atol else FAILS if high < threshold - atol else UNSURE
    if op == "<":
        return HOLDS if high < threshold - atol else FAILS if low >= threshold - atol else UNSURE
    raise ValueError(f"op must be '>', '>=' or '<'; got {op!r}")


def all_of(verdicts) -> str:
    """Kleene AND: fails if one fails, holds if all hold, else cannot tell."""
    verdicts = list(verdicts)
    return FAILS if FAILS in verdicts else HOLDS if all(v == HOLDS for v in verdicts) else UNSURE


def any_of(verdicts) -> str:
    """Kleene OR: holds if one holds, fails if all fail, else cannot tell."""
    verdicts = list(verdicts)
    return HOLDS if HOLDS in verdicts else FAILS if all(v == FAILS for v in verdicts) else UNSURE


# ----------------------------------------------------------------------------- paired scores

def per_prompt(scores: pd.DataFrame) -> pd.DataFrame:
    """Per-prompt means over samples: index (metric, prompt, stratum), one column per model."""
    return scores.pivot_table(index=["metric", "prompt", "stratum"], columns="model", values="value",
                              aggfunc="mean", sort=False)


def names(model) -> list[str]:
    """A role's model as a list of names (its seeds)."""
    return [model] if isinstance(model, str) else list(model)


def label(model) -> str:
    group = names(model)
    return group[0] if len(group) == 1 else f"{group[0]} ({len(group)} seeds)"


def _arrays(pp: pd.DataFrame, metric: str, models) -> tuple[list[np.ndarray], np.ndarray]:
    """Each model's per-prompt scores on `metric`, [seeds, P], and the prompts' strata."""
    table = pp.loc[metric]
    out = []
    for model in models:
        values = table[names(model)].to_numpy().T
        if np.isnan(values).any():
            raise ValueError(f"{label(model)} lacks {metric!r} scores on some prompts: paired comparisons "
                             "need every model on the same prompts")
        out.append(values)
    return out, table.index.get_level_values("stratum").to_numpy()


def difference(pp, a, b, metric: str, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """metric(a) - metric(b), paired, with its 95% interval (`stats.paired_bootstrap`)."""
    arrays, strata = _arrays(pp, metric, [a, b])
    return stats.paired_bootstrap(np.subtract, arrays, strata, n_boot=n_boot, seed=seed)


def ratio(pp, a, b, metric: str, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(metric(a) - floor) / (metric(b) - floor), paired, with its 95% interval (floor: FLOORS, else 0)."""
    arrays, strata = _arrays(pp, metric, [a, b])
    floor = FLOORS.get(metric, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):  # a teacher at the floor: an undefined ratio, NaN
        return stats.paired_bootstrap(np.divide, [x - floor for x in arrays], strata, n_boot=n_boot, seed=seed)


def _row(claim: str, comparison: str, metric: str, measured: tuple[float, float, float], op: str,
         threshold: float) -> dict:
    estimate, low, high = measured
    return {"claim": claim, "comparison": comparison, "metric": metric, "estimate": estimate, "low": low,
            "high": high, "threshold": f"{op} {threshold:g}", "verdict": verdict(low, high, op, threshold)}


def _difference_row(pp, claim: str, a, b, metric: str, op: str, boot: dict) -> dict:
    """The row of `a - b op 0` on `metric`."""
    return _row(claim, f"{label(a)} - {label(b)}", metric, difference(pp, a, b, metric, **boot), op, 0)


def _not_run(claim: str, missing) -> tuple[list[dict], str]:
    row = {c: np.nan for c in COLUMNS}
    row.update(claim=claim, comparison=f"missing: {', '.join(missing)}", metric="", threshold="", verdict=NOT_RUN)
    return [row], NOT_RUN


def _missing(pp: pd.DataFrame, roles: dict, needed: tuple[str, ...]) -> list[str]:
    """Roles the claim needs that are absent, then models the roles name that the scores lack."""
    absent = [r for r in needed if not roles.get(r)]
    if absent:
        return [f"role {r}" for r in absent]
    return [m for m in role_labels({r: roles[r] for r in needed}) if m not in pp.columns]


def _metrics(pp: pd.DataFrame) -> list[str]:
    present = set(pp.index.get_level_values("metric"))
    return [m for m in METRICS if m in present]


def _distilled(roles: dict) -> dict:
    tasks = roles.get("distilled") or list(roles["teachers"])
    return {t: roles["teachers"][t] for t in tasks}


# ----------------------------------------------------------------------------- the claims

def teachers_specialise(pp, roles, claim, **boot):
    """1: each teacher: own metric - base > 0, and some other metric - base < 0."""
    base, per_teacher, rows = roles["base"], [], []
    for task, teacher in roles["teachers"].items():
        own = _difference_row(pp, claim, teacher, base, task, ">", boot)
        others = [_difference_row(pp, claim, teacher, base, m, "<", boot) for m in _metrics(pp) if m != task]
        rows += [own, *others]
        per_teacher.append(all_of([own["verdict"], any_of(r["verdict"] for r in others)]))
    return rows, all_of(per_teacher)


def mix_trades_metrics(pp, roles, claim, **boot):
    """2: Mix - teacher < 0 on that teacher's metric, for some teacher."""
    rows = [_difference_row(pp, claim, roles["mix"], teacher, task, "<", boot)
            for task, teacher in roles["teachers"].items()]
    return rows, any_of(r["verdict"] for r in rows)


def stacking_seesaws(pp, roles, claim, **boot):
    """3: some stage j lowers the reward of an earlier stage i that had raised it."""
    stages = list(roles["seesaw"].items())  # [(start key, model), (reward, model), ...]
    if len(stages) < 3:
        return _not_run(claim, ["a seesaw of two stages or more"])
    models = [model for _, model in stages]
    rows, cases = [], []
    for i in range(1, len(stages) - 1):
        reward = stages[i][0]
        raised = _difference_row(pp, claim, models[i], models[i - 1], reward, ">", boot)
        rows.append(raised)
        for j in range(i + 1, len(stages)):
            lowered = _difference_row(pp, claim, models[j], models[j - 1], reward, "<", boot)
            rows.append(lowered)
            cases.append(all_of([raised["verdict"], lowered["verdict"]]))
    return rows, any_of(cases)


def students_keep_skills(pp, roles, claim, **boot):
    """4: student / teacher >= 0.95 on each distilled teacher's metric (DeQA from its floor 1)."""
    students, rows = roles["students"], []
    for task, teacher in _distilled(roles).items():
        floor = f" (from {FLOORS[task]:g})" if task in FLOORS else ""
        rows.append(_row(claim, f"{label(students)} / {label(teacher)}{floor}", task,
                         ratio(pp, students, teacher, task, **boot), ">=", RATIO_THRESHOLD))
    return rows, all_of(r["verdict"] for r in rows)


def students_beat_mix(pp, roles, claim, **boot):
    """5: student - Mix > 0 on every metric."""
    rows = [_difference_row(pp, claim, roles["students"], roles["mix"], m, ">", boot) for m in _metrics(pp)]
    return rows, all_of(r["verdict"] for r in rows)


def students_surpass_a_teacher(pp, roles, claim, **boot):
    """6: student - teacher > 0 on that teacher's metric, for some distilled teacher."""
    rows = [_difference_row(pp, claim, roles["students"], teacher, task, ">", boot)
            for task, teacher in _distilled(roles).items()]
    return rows, any_of(r["verdict"] for r in rows)


def at_other_budget(check):
    """A Mix claim (2 or 5) judged with `mix_other_budget` as the Mix: the toy found the budget decides
    claim 2, so a study states it at both (e.g. Mix at the distillation's samples and at a teacher's)."""
    def run(pp, roles, claim, **boot):
        return check(pp, {**roles, "mix": roles["mix_other_budget"]}, claim, **boot)
    return run


def mar_keeps_quality(pp, roles, claim, **boot):
    """7: DeQA of the students with MAR - without MAR >= 0."""
    row = _difference_row(pp, claim, roles["students"], roles["students_without_mar"], "deqa", ">=", boot)
    return [row], row["verdict"]


CLAIMS = [  # (claim, statement, function, roles it needs)
    ("1 teachers specialise", "each single-reward teacher lifts its own metric and lowers another",
     teachers_specialise, ("base", "teachers")),
    ("2 Mix trades metrics", "multi-reward RL falls below some teacher on that teacher's metric",
     mix_trades_metrics, ("mix", "teachers")),
    ("3 stacking seesaws", "a stacked reward stage lowers a reward an earlier stage had raised",
     stacking_seesaws, ("seesaw",)),
    ("4 Flow-OPD keeps each skill", f"student / teacher >= {RATIO_THRESHOLD} on every distilled teacher's metric",
     students_keep_skills, ("students", "teachers")),
    ("5 Flow-OPD beats Mix", "student above multi-reward RL on every metric",
     students_beat_mix, ("students", "mix")),
    ("6 Flow-OPD surpasses a teacher", "student above some distilled teacher on that teacher's metric",
     students_surpass_a_teacher, ("students", "teachers")),
    ("7 MAR keeps image quality", "DeQA of the student with MAR >= without MAR",
     mar_keeps_quality, ("students", "students_without_mar")),
    ("2b Mix trades metrics (other budget)", "claim 2 with the Mix of the other budget",
     at_other_budget(mix_trades_metrics), ("mix_other_budget", "teachers")),
    ("5b Flow-OPD beats Mix (other budget)", "claim 5 with the Mix of the other budget",
     at_other_budget(students_beat_mix), ("students", "mix_other_budget")),
]


# The paper's own evidence for each claim (SD3.5-M, its table of results: docs/method.md), shown beside
# our verdict. PickScore is on its raw scale (~21-23); DeQA 1-5; ratios of DeQA count from its floor.
PAPER = {
    "1 teachers specialise": "PickScore teacher: GenEval 0.63 -> 0.51; GenEval teacher: PickScore 21.64 -> 21.53, "
                             "DeQA 4.07 -> 4.01; the DeQA teacher lowers no metric",
    "2 Mix trades metrics": "GRPO-Mix vs teacher: GenEval 0.73 vs 0.94, OCR 0.83 vs 0.92, PickScore 21.84 vs 23.19",
    "3 stacking seesaws": "GenEval 0.94 -> 0.89 (+OCR) -> 0.82 (+PickScore) -> 0.73 (+DeQA); OCR 0.91 -> 0.86 (+PickScore)",
    "4 Flow-OPD keeps each skill": "student / teacher: GenEval 0.98, OCR 1.02, PickScore 0.995, DeQA 1.04",
    "5 Flow-OPD beats Mix": "Flow-OPD - GRPO-Mix: GenEval +0.19, OCR +0.11, PickScore +1.24, DeQA +0.02",
    "6 Flow-OPD surpasses a teacher": "OCR 0.94 vs 0.92, DeQA 4.35 vs 4.23",
    "7 MAR keeps image quality": "with / without MAR: ImageReward 1.36 / 1.26, HPS 0.330 / 0.300 (DeQA not reported)",
    "2b Mix trades metrics (other budget)": "one GRPO-Mix, its budget not stated",
    "5b Flow-OPD beats Mix (other budget)": "one GRPO-Mix, its budget not stated",
}


def check_roles(roles: dict) -> None:
    """Unknown role names are typos (they would silently leave a claim not run)."""
    unknown = sorted(set(roles) - set(ROLES))
    if unknown:
        raise ValueError(f"unknown claim roles {unknown}; roles: {list(ROLES)}")
    unknown_tasks = sorted(set(roles.get("distilled") or []) - set(roles.get("teachers") or {}))
    if unknown_tasks:
        raise ValueError(f"distilled tasks {unknown_tasks} have no teacher in roles['teachers']")


def evaluate(scores: pd.DataFrame, roles: dict, n_boot: int = 2000, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(overview: a row per claim with its statement, the paper's evidence (PAPER) and our verdict,
    detail: a row per comparison with COLUMNS) from `evaluation.sample_scores` and roles (module docstring)."""
    check_roles(roles)
    pp = per_prompt(scores)
    overview, detail = [], []
    for claim, statement, check, needed in CLAIMS:
        missing = _missing(pp, roles, needed)
        rows, result = _not_run(claim, missing) if missing else check(pp, roles, claim, n_boot=n_boot, seed=seed)
        overview.append({"claim": claim, "statement": statement, "paper (SD3.5-M)": PAPER[claim], "verdict": result})
        detail += rows
    return pd.DataFrame(overview), pd.DataFrame(detail, columns=COLUMNS)


# ----------------------------------------------------------------------------- notebook 05 and the results page

def role_labels(roles: dict) -> list[str]:
    """Every model name the roles mention, in order."""
    models = [m for r, v in roles.items() if r != "distilled" for m in (v.values() if isinstance(v, dict) else [v])]
    return list(dict.fromkeys(n for m in models for n in names(m)))


def label_scores(scores: pd.DataFrame, tables: dict[str, dict], roles: dict) -> pd.DataFrame:
    """The scores of the models the roles name by row label of notebook 05's tables (table -> label
    -> adapter directory, None = base; the scores' models are str(directory)), relabelled. A label
    no table has is left out (its claims are then "not run"); one label naming two directories in
    two tables is an error."""
    directories: dict[str, str] = {}
    for rows in tables.values():
        for row_label, directory in (rows or {}).items():
            if directories.setdefault(row_label, str(directory)) != str(directory):
                raise ValueError(f"row label {row_label!r} names two models: {directories[row_label]} and {directory}")
    parts = [scores[scores["model"] == directories[n]].assign(model=n) for n in role_labels(roles) if n in directories]
    return pd.concat(parts, ignore_index=True) if parts else scores.iloc[:0]


def formatted(detail: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """The detail table with `estimate [low, high]` strings."""
    shown = detail[["claim", "comparison", "metric"]].copy()
    shown["estimate [95% interval]"] = [
        "" if v == NOT_RUN else f"{e:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
        for e, lo, hi, v in zip(detail["estimate"], detail["low"], detail["high"], detail["verdict"])]
    return shown.assign(threshold=detail["threshold"], verdict=detail["verdict"])


EXPLANATION = ("Each comparison: an estimate on the same prompts and noise with its 95% paired bootstrap interval "
               "(prompts resampled within GenEval's categories; seeds of a model pooled and resampled). "
               "holds / does not hold: the interval lies on the claimed / the other side of the threshold; "
               "cannot tell: it covers the threshold; not run: the run lacks the models. A claim of several "
               "comparisons combines them with and / or (three-valued). Ratios of DeQA count from its floor 1.")


def markdown(overview: pd.DataFrame, detail: pd.DataFrame) -> str:
    """The claims section of the results page: the explanation, the verdicts, the comparisons."""
    return "\n\n".join([EXPLANATION, overview.to_markdown(index=False), formatted(detail).to_markdown(index=False)])

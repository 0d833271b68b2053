"""The study's summary: tables of adapters measured under one protocol, with standard errors, and
the results page rendered from a run's summary folder.

Notebook 05 measures every adapter a study trained (one base, the same prompts and noise) and
writes `<table>_table.csv` / `.md` into its folder; `render` turns that folder into markdown
(docs/results.md) with the run's command, commit and protocol, so no number is typed by hand:

    python -m flowopd_lib.summary papermill_runs/outputs/toy_full --out docs/results.md --readme README.md

(`--readme` puts the main table, with the same provenance, between the README's generated-results markers.)

With roles (`claims`), notebook 05 also writes the paper's claims with their verdicts
(`save_claims`: claims_table.csv / .md); the page shows them first.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import pandas as pd
import yaml

from . import adapters, claims, evaluation

METRICS = ("geneval", "ocr", "pickscore", "pickscore_true", "deqa")


def budget(directory: str | Path | None) -> str:
    """The training budget an adapter records about itself (None: the pretrained base)."""
    if directory is None:
        return "pretrained base"
    info = adapters.metadata(directory)
    cfg = info.get("config", {})
    if "method" in info:
        return f"merge ({info['method']})"
    if "updates" in info:
        start = f", from {Path(cfg['init_adapter']).parent.name}" if cfg.get("init_adapter") else ""
        return (f"{info['train_minutes']:.1f} min, {info['updates']} updates of "
                f"{cfg['prompts_per_update']}x{cfg['group_size']}{start}")
    if "train_minutes" in info:
        return f"{info['train_minutes']:.1f} min SFT ({cfg.get('steps')} steps)"
    return "not recorded"


def with_average(table: pd.DataFrame) -> pd.DataFrame:
    """Add the paper's Avg column (and its standard error, treating the metrics as independent)."""
    if not all(t in table for t in evaluation.NORMALISERS):
        return table
    table = table.copy()
    table["Avg"] = sum(table[t] / n for t, n in evaluation.NORMALISERS.items()) / len(evaluation.NORMALISERS)
    table["Avg_se"] = (sum((table[f"{t}_se"] / n) ** 2 for t, n in evaluation.NORMALISERS.items()) ** 0.5
                       / len(evaluation.NORMALISERS))
    return table


def rows_of(summary: pd.DataFrame, rows: dict[str, str | None], key=str) -> pd.DataFrame:
    """The summary's rows for `rows` (label -> adapter directory, None = base), relabelled, with budgets."""
    table = summary.loc[[key(d) for d in rows.values()]].copy()
    table.index = list(rows)
    table["budget"] = [budget(d) for d in rows.values()]
    return table


def formatted(table: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """`value ± se` strings for each metric that has a `<metric>_se` column; other columns as they are."""
    out = pd.DataFrame(index=table.index)
    for column in table.columns:
        if column.endswith("_se"):
            continue
        if f"{column}_se" in table:
            out[column] = [f"{v:.{digits}f} ± {s:.{digits}f}" for v, s in zip(table[column], table[f"{column}_se"])]
        else:
            out[column] = table[column]
    return out


def save(name: str, table: pd.DataFrame, out_dir: str | Path) -> pd.DataFrame:
    """`<name>_table.csv` (numbers) and `<name>_table.md` (value ± se) in out_dir; returns the formatted table."""
    out_dir = Path(out_dir)
    table.to_csv(out_dir / f"{name}_table.csv")
    shown = formatted(table)
    (out_dir / f"{name}_table.md").write_text(shown.to_markdown() + "\n")
    return shown


def save_claims(overview: pd.DataFrame, detail: pd.DataFrame, out_dir: str | Path) -> None:
    """claims_table.csv (every comparison, numbers), claims_overview.csv (a verdict per claim) and
    claims_table.md (`claims.markdown`: both, with what the verdicts mean) in out_dir."""
    out_dir = Path(out_dir)
    detail.to_csv(out_dir / "claims_table.csv", index=False)
    overview.to_csv(out_dir / "claims_overview.csv", index=False)
    (out_dir / "claims_table.md").write_text(claims.markdown(overview, detail) + "\n")


def provenance_lines(run_dir: str | Path, summary_stage: str = "summary") -> list[str]:
    """Markdown bullets: the run's command, commit, start and evaluation protocol (from the run's
    provenance.json and the summary stage's parameters.yaml)."""
    run_dir = Path(run_dir)
    provenance = json.loads((run_dir / "provenance.json").read_text())
    parameters = run_dir / summary_stage / "parameters.yaml"
    params = yaml.safe_load(parameters.read_text()) if parameters.exists() else {}
    protocol = {k: params.get(k) for k in ("eval_prompts", "eval_samples", "eval_steps", "eval_cfg", "seed")
                if k in params}
    return [f"- command: `python -m flowopd_lib.runs {' '.join(provenance.get('argv', [])[1:])}`",
            f"- commit: `{provenance['git'].get('commit')}`" + (" (uncommitted changes)" if provenance["git"].get("dirty") else "")
            + f", started {provenance.get('started')} on {provenance.get('torch_threads')} torch threads",
            f"- evaluation protocol: {', '.join(f'{k} {v}' for k, v in protocol.items())}; every model on the same "
            "prompts and noise; ± is one standard error over prompts"]


def render(run_dir: str | Path, summary_stage: str = "summary", figures: str | None = None) -> str:
    """Markdown of a run's summary tables, each under its name (the claims first), headed by
    `provenance_lines`. `figures`: the folder (as the page links it) holding copies of the summary's
    figures (`main` copies them); None leaves them out."""
    run_dir = Path(run_dir)
    folder = run_dir / summary_stage
    spec = yaml.safe_load((run_dir / "spec.yaml").read_text())
    lines = [f"# Results: `{spec['name']}`", "",
             "Generated by `python -m flowopd_lib.summary` from the run's summary folder; do not edit by hand.", "",
             *provenance_lines(run_dir, summary_stage), ""]
    for path in sorted(folder.glob("*_table.md"), key=lambda p: (p.name != "claims_table.md", p.name)):
        lines += [f"## {path.name.removesuffix('_table.md')}", "", path.read_text().strip(), ""]
    if figures is not None:
        lines += ["## Figures", ""] + [f"![{png.stem}]({figures}/{png.name})" for png in sorted(folder.glob("*.png"))] + [""]
    return "\n".join(lines) + "\n"


README_START = "<!-- results: generated by python -m flowopd_lib.summary --readme; do not edit by hand -->"
README_END = "<!-- end of generated results -->"


def readme_block(run_dir: str | Path, summary_stage: str = "summary", page: str = "docs/results.md") -> str:
    """The README's one results table: the run's main table with its provenance and a link to `page`."""
    table = (Path(run_dir) / summary_stage / "main_table.md").read_text().strip()
    return "\n".join([README_START, table, "", *provenance_lines(run_dir, summary_stage),
                      f"- every table, the paper's claims with their verdicts, and the figures: [{page}]({page})",
                      README_END])


def replace_block(text: str, block: str) -> str:
    """`text` with the part from README_START to README_END replaced by `block`."""
    if README_START not in text or README_END not in text:
        raise ValueError(f"the README has no generated-results block: put the lines {README_START!r} and "
                         f"{README_END!r} where the table should go")
    head, rest = text.split(README_START, 1)
    return head + block + rest.split(README_END, 1)[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run's output folder, e.g. papermill_runs/outputs/toy_full")
    parser.add_argument("--summary-stage", default="summary")
    parser.add_argument("--out", help="write the page here, its figures beside it in figures/<run name>/ "
                                      "(default: print the page without figures)")
    parser.add_argument("--readme", help="also put the main table into this README, between its generated-results markers")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    if args.out:
        out = Path(args.out)
        figures = out.parent / "figures" / run_dir.name
        figures.mkdir(parents=True, exist_ok=True)
        for png in (run_dir / args.summary_stage).glob("*.png"):
            shutil.copy2(png, figures / png.name)
        out.write_text(render(run_dir, args.summary_stage, f"figures/{run_dir.name}"))
        print(f"wrote {out} and {len(list(figures.glob('*.png')))} figures in {figures}")
    else:
        print(render(run_dir, args.summary_stage))
    if args.readme:
        readme = Path(args.readme)
        page = os.path.relpath(args.out, readme.parent) if args.out else "docs/results.md"
        readme.write_text(replace_block(readme.read_text(), readme_block(run_dir, args.summary_stage, page)))
        print(f"updated the results table in {readme}")


if __name__ == "__main__":
    main()

"""The study's summary: tables of adapters measured under one protocol, with standard errors, and
the results page rendered from a run's summary folder.

Notebook 05 measures every adapter a study trained (one base, the same prompts and noise) and
writes `<table>_table.csv` / `.md` into its folder; `render` turns that folder into markdown
(docs/results.md) with the run's command, commit and protocol, so no number is typed by hand:

    python -m flowopd_lib.summary papermill_runs/outputs/dial_full --out docs/results.md --readme README.md

(`--readme` puts the main table, with the same provenance, between the README's generated-results markers.)
Everything is checked before anything is written (the run has summary tables and readable records,
the README its two markers in order, `--out` is a page this command generated unless `--force`);
then the files are staged and swapped in together (safe_files.replace_together): a mistake or a full
disk changes no page. The figures folder is replaced whole (copies: the old one is not kept).

With roles (`claims`), notebook 05 also writes the paper's claims with their verdicts
(`save_claims`: claims_table.csv / .md); the page shows them first.
"""
from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

import pandas as pd

from . import adapters, claims, cli, evaluation
from .safe_files import read_json_object, read_mapping, read_text, replace_together

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


def paired_changes(scores: pd.DataFrame, rows: dict[str, str | None], reference: str) -> pd.DataFrame:
    """Every row of `rows` (label -> adapter directory, None = base; the scores' models are
    str(directory)) minus the row `reference`, paired on the same prompts and noise
    (`evaluation.changes`): one row per (label, metric) with diff, low, high and verdict."""
    if reference not in rows:
        raise ValueError(f"reference {reference!r} is not one of the rows {list(rows)}: name one of them")
    parts = [scores[scores["model"] == str(d)].assign(model=label) for label, d in rows.items()]
    return evaluation.changes(pd.concat(parts, ignore_index=True), reference=reference)


def save_changes(name: str, changes: pd.DataFrame, out_dir: str | Path, digits: int = 3) -> pd.DataFrame:
    """`<name>_table.csv` (numbers, from `paired_changes`) and `<name>_table.md` (a label per row, a metric
    per column, `diff [low, high]`, starred where the interval excludes 0) in out_dir; returns the shown table."""
    out_dir = Path(out_dir)
    changes.to_csv(out_dir / f"{name}_table.csv")
    cells = [f"{r['diff']:+.{digits}f} [{r['low']:+.{digits}f}, {r['high']:+.{digits}f}]"
             + ("" if r["verdict"] == "no difference" else " *") for _, r in changes.iterrows()]
    shown = changes.assign(cell=cells)["cell"].unstack("metric")
    shown = shown.loc[list(dict.fromkeys(changes.index.get_level_values("model"))),
                      list(dict.fromkeys(changes.index.get_level_values("metric")))]
    (out_dir / f"{name}_table.md").write_text(shown.to_markdown() + "\n\n* the paired 95% interval excludes 0\n")
    return shown


def save_claims(overview: pd.DataFrame, detail: pd.DataFrame, out_dir: str | Path) -> None:
    """claims_table.csv (every comparison, numbers), claims_overview.csv (a verdict per claim) and
    claims_table.md (`claims.markdown`: both, with what the verdicts mean) in out_dir."""
    out_dir = Path(out_dir)
    detail.to_csv(out_dir / "claims_table.csv", index=False)
    overview.to_csv(out_dir / "claims_overview.csv", index=False)
    (out_dir / "claims_table.md").write_text(claims.markdown(overview, detail) + "\n")


def home_as_tilde(arg: str) -> str:
    """A command-line argument with the home folder written `~`, as a reader would type it."""
    home = str(Path.home())
    return "~" + arg[len(home):] if arg == home or arg.startswith(home + os.sep) else arg


def stage_commits(run_dir: Path, commit: str | None) -> str:
    """The commits the run's stages ran at (each stage's provenance.json), when they are not all the
    runner's last start's: a run resumed across sessions trains its stages at several commits."""
    counts = Counter()
    spec = read_mapping(run_dir / "spec.yaml", "a run's spec") if (run_dir / "spec.yaml").exists() else {}
    for stage in spec.get("stages", []):  # the spec's stages, not the backups set aside beside them
        record = run_dir / stage["name"] / "provenance.json"
        if record.exists():
            counts[read_json_object(record, "a stage's provenance record").get("git", {}).get("commit")] += 1
    if set(counts) <= {commit}:
        return ""
    listed = ", ".join(f"`{c}` ({n} stage{'s' if n > 1 else ''})" for c, n in counts.most_common())
    return f"; the run was resumed, its stages ran at {listed} (each stage's provenance.json)"


def provenance_lines(run_dir: str | Path, summary_stage: str = "summary") -> list[str]:
    """Markdown bullets: the run's command, commit, start and evaluation protocol (from the run's
    provenance.json and the summary stage's parameters.yaml)."""
    run_dir = Path(run_dir)
    provenance = read_json_object(run_dir / "provenance.json", "a run's provenance record")
    parameters = run_dir / summary_stage / "parameters.yaml"
    params = read_mapping(parameters, "a stage's parameters") if parameters.exists() else {}
    protocol = {k: params.get(k) for k in ("eval_protocol", "eval_prompts", "eval_samples", "eval_steps", "eval_cfg",
                                           "seed") if k in params}
    if protocol.get("eval_protocol"):  # a named evaluation's sizes, not the defaults it replaced
        protocol["eval_prompts"], protocol["eval_samples"] = evaluation.protocol_sizes(
            protocol["eval_protocol"], None, None)
    commit = provenance.get("git", {}).get("commit")
    return [f"- command: `python -m flowopd_lib.runs {' '.join(map(home_as_tilde, provenance.get('argv', [])[1:]))}`",
            f"- commit: `{commit}`" + (" (uncommitted changes)" if provenance.get("git", {}).get("dirty") else "")
            + f", started {provenance.get('started')} on {provenance.get('torch_threads')} torch threads"
            + stage_commits(run_dir, commit),
            f"- evaluation protocol: {', '.join(f'{k} {v}' for k, v in protocol.items())}; every model on the same "
            "prompts and noise; ± is one standard error over prompts"]


GENERATED = "Generated by `python -m flowopd_lib.summary`"  # the line that marks a page as this command's


def check_summary(run_dir: Path, summary_stage: str = "summary") -> None:
    """Refuse a run without summary tables (its summary stage has not run, or ran elsewhere)."""
    folder = Path(run_dir) / summary_stage
    if not any(folder.glob("*_table.md")):
        raise cli.UserError(f"{folder} holds no summary tables (*_table.md): run the spec's summary stage first "
                            f"(python -m flowopd_lib.runs <spec> --only {summary_stage}), or name another "
                            "run folder or --summary-stage")


def check_page(out: Path, force: bool) -> None:
    """Refuse to replace a file this command did not generate (a hand-written page named by mistake)."""
    if out.exists() and not force and GENERATED not in read_text(out, "a results page"):
        raise cli.UserError(f"{out} is not a page generated by this command (no {GENERATED!r} line): pass --force "
                            "to replace it, or write the page elsewhere")


def render(run_dir: str | Path, summary_stage: str = "summary", figures: str | None = None) -> str:
    """Markdown of a run's summary tables, each under its name (the claims first), headed by
    `provenance_lines`. `figures`: the folder (as the page links it) holding copies of the summary's
    figures (`main` copies them); None leaves them out."""
    run_dir = Path(run_dir)
    folder = run_dir / summary_stage
    spec = read_mapping(run_dir / "spec.yaml", "a run's spec")
    lines = [f"# Results: `{spec.get('name', run_dir.name)}`", "",
             f"{GENERATED} from the run's summary folder; do not edit by hand.", "",
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
    table = read_text(Path(run_dir) / summary_stage / "main_table.md", "the summary's main table").strip()
    return "\n".join([README_START, table, "", *provenance_lines(run_dir, summary_stage),
                      f"- every table, the paper's claims with their verdicts, and the figures: [{page}]({page})",
                      README_END])


def replace_block(text: str, block: str, where: str = "the README") -> str:
    """`text` with the part from README_START to README_END replaced by `block`; the markers must
    each appear once, in that order."""
    counts = (text.count(README_START), text.count(README_END))
    if counts != (1, 1) or text.index(README_START) > text.index(README_END):
        raise cli.UserError(f"{where} needs one generated-results block: the marker lines {README_START!r}, then "
                            f"{README_END!r} (found {counts[0]} and {counts[1]}"
                            + (", in the wrong order" if counts == (1, 1) else "") + "); fix them")
    head, rest = text.split(README_START, 1)
    return head + block + rest.split(README_END, 1)[1]


def updated_readme(readme: str | Path, run_dir: Path, summary_stage: str, page: Path | None) -> str:
    """The README's text with the run's main table in its generated-results block, linking `page`."""
    link = os.path.relpath(page, Path(readme).parent) if page else "docs/results.md"
    return replace_block(read_text(readme, "a README"), readme_block(run_dir, summary_stage, link), str(readme))


def figures_name(run_dir: Path, summary_stage: str) -> str:
    """The page's figures folder under figures/: the run's name, and the summary stage's where a run
    has several (dial_opd_methods.yaml: summary_merge, summary_base), so one page never replaces
    another's figures."""
    return run_dir.name if summary_stage == "summary" else f"{run_dir.name}_{summary_stage}"


@cli.entry
def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("run_dir", help="a run's output folder, e.g. papermill_runs/outputs/toy_full")
    parser.add_argument("--summary-stage", default="summary")
    parser.add_argument("--out", type=cli.new_file, help="write the page here, its figures beside it in "
                                                          "figures/<run name>[_<summary stage>]/ (default: print the page without figures)")
    parser.add_argument("--readme", help="also put the main table into this README, between its generated-results markers")
    parser.add_argument("--force", action="store_true", help="replace --out even if it is not a page this command generated")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    check_summary(run_dir, args.summary_stage)
    page = render(run_dir, args.summary_stage, f"figures/{figures_name(run_dir, args.summary_stage)}" if args.out else None)
    readme = updated_readme(args.readme, run_dir, args.summary_stage, args.out) if args.readme else None
    if args.out:
        check_page(args.out, args.force)
    else:
        print(page)
    write(args, run_dir, page, readme)


def write(args, run_dir: Path, page: str, readme: str | None) -> None:
    """The page, its figures and the README, all staged before any is swapped in (a full disk
    changes none of them)."""
    files = {**({args.out: page} if args.out else {}), **({Path(args.readme): readme} if readme is not None else {})}
    pngs = sorted((run_dir / args.summary_stage).glob("*.png"))
    figures = args.out.parent / "figures" / figures_name(run_dir, args.summary_stage) if args.out else None
    replace_together(files, {figures: lambda new: [shutil.copy2(png, new / png.name) for png in pngs]} if figures else {})
    if args.out:
        print(f"wrote {args.out} and {len(pngs)} figures in {figures}")
    if readme is not None:
        print(f"updated the results table in {args.readme}")


if __name__ == "__main__":
    main()

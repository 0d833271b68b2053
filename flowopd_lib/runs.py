"""Run specs: the whole study as notebooks executed headless by papermill, one command.

A spec (YAML, see papermill_runs/) names the run, parameters shared by every stage, and stages in
order, each a notebook with its own parameters:

    name: toy_quick
    shared: {seed: 0, eval_prompts: 90}
    stages:
      - name: coldstart
        notebook: notebooks/03_cold_start.ipynb
        parameters: {teachers: {geneval: "{teachers}/geneval", ocr: "{teachers}/ocr"}, merge_methods: [delta]}
      - name: opd_merge
        notebook: notebooks/04_flow_opd.ipynb
        parameters: {teachers: {geneval: "{teachers}/geneval", ocr: "{teachers}/ocr"},
                     init_adapter: "{coldstart}/merge_delta", updates: 20}

`{stage}` in a parameter value is that stage's output directory (what a stage consumes from an
earlier one), and `{teachers}` is the folder of the shipped toy teachers, flowopd_lib/assets/teachers
(`python -m flowopd_lib.teachers ship <task>` puts them there), so `"{teachers}/geneval"` is the
shipped GenEval teacher's adapter directory: a spec uses it without a stage that trains it.
`{teachers_dial}` is the dial world's (flowopd_lib/worlds.py); a stage using a world's teachers must
run on that world's base (`base: toy_glyph` for the dial's), else the spec is refused. A spec
that says `world: <name>` is a study of a world: its stages name the world's teachers
`{world_teachers}`, the world sets every stage's `base` and `conflict`, and `--world <other>` runs
the same study in another world, as the run `<name>_<other>` (dial_full.yaml is the study at
conflict 0.5; `--world toy` at setting 0). A
stage that names a teacher not shipped yet stops the run before anything starts, saying how to
train and ship it. Every stage gets `out_dir` = papermill_runs/outputs/<run>/<stage>, and only the
shared parameters its notebook declares (papermill's `inspect_notebook`: the names assigned in
its `parameters` cell). A shared or `-p` key that no stage's notebook declares is an error naming
the closest declared one (a misspelt `time_budget_minuts` must not run the full budget), and so
is `out_dir`, which the runner sets. A stage's parameters override the shared ones and `-p`
overrides both; `extra` (the notebooks' bag of further config fields) is merged key by key, so a
stage adding `extra: {gradient_checkpointing: true}` keeps the shared `extra: {rollout_chunks: 12,
micro_batch: 4}`. Other mappings (rewards, datasets, teachers) are one choice each and are
replaced whole: blending a stage's `rewards: {ocr: 1}` into a shared `{geneval: 1}` would train
on both. Stages whose notebook declares `eval_cache` share the
run's `eval_cache/` folder, so an adapter is evaluated once per run under each protocol (the
base and the teachers once for all the stages' tables; the summary's per-sample scores are a
protocol of their own, computed once and reused by a repeated summary). A finished stage leaves `.done` and is skipped when the run is repeated; an
interrupted stage re-runs and its trainer resumes from its checkpoints. A stage whose parameters
differ from those it ran with (an edited spec, another `-p`), and every stage that consumes it,
re-runs from scratch: its old folder is kept as a dated backup `<stage>.previous-<date>` (every one:
delete them when done), so nothing stale is skipped or resumed and nothing finished is lost. A
stage whose finished backup ran with exactly today's parameters and inputs is restored instead of
re-run (a typo that failed, then the original parameters again), and so is each consumer set aside
with it (built on those very outputs). The shipped toy assets (base model, PickScore scorer, prompt
files) count as inputs of every stage on the toy base, and each shipped teacher a stage names (a path under the teachers
folder, e.g. from `{teachers}/ocr`) as an input of that stage: a stage that ran on other assets
(a retrained base) or another teacher (a re-shipped one) re-runs the same way, with its
consumers; shipping one teacher leaves the stages that do not name it alone. A failing stage
stops only the stages that consume it (the others run, as `make -k` would: an overnight run does not
idle on one error); the run then fails naming the notebook, the cell and the error, and everything
produced stays, so the next run re-does only what failed and its consumers. The run directory also
holds the spec, the git commit and package versions.

    python -m flowopd_lib.runs papermill_runs/toy_quick.yaml [--only S] [--from S] [-p key=value] [--jobs N] [--world W]

A wrong spec or command line (a YAML error, `stages` not a list of mappings, a run name that is not
one folder name under --outputs, an unknown key) is one line and exit status 2 before anything is
written or started.

`--jobs N` runs up to N stages at once, in spec order, each as soon as the stages it refers to are
done (independent trainings side by side, then the stages that consume them), with cores / N
threads each (all the cores for a last stage that runs alone, such as a summary; one whose
notebook is given `num_processes: auto` splits its evaluation over CPU ranks of one thread each,
`train.processes`). It is for
stages that train in their kernel (the toy world) or as CPU ranks: a run in which a selected
stage trains as an `accelerate launch` job on GPUs (num_processes > 1, not a CPU accelerate
config) is refused before anything starts (exit status 2), since its stages would
share the GPUs and the rendezvous port; such runs go one stage at a time, each on every GPU.
"""
from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

from . import cli, safe_files, worlds

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ROOT / "papermill_runs" / "outputs"
_NAME = r"[A-Za-z0-9_]+"                # what a stage name may hold, so that {name} refers to it
_RUN_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"  # one folder name under --outputs: no '/', no leading '.'
_REF = re.compile(r"\{(%s)\}" % _NAME)
# {name} -> a folder outside the run (docstring); not stage names: each world's shipped teachers,
# `{teachers}` (toy) and `{teachers_dial}` (teachers.assets_of; teachers not imported: torch)
PLACEHOLDERS = {worlds.placeholder(name): ROOT / "flowopd_lib" / "assets" / w.teachers_folder
                for name, w in worlds.WORLDS.items()}
MERGED_PARAMETERS = {"extra"}           # mappings of independent settings: merged key by key (docstring)
RUNNER_PARAMETERS = {"out_dir"}         # set by the runner for every stage


class RunError(RuntimeError):
    """A stage failed or the spec is wrong; the message says which and why."""


class UsageError(RunError, cli.UserError):
    """The spec or the command line is wrong, found before anything is written or started (one
    line, exit status 2, as argparse's errors)."""


def load_spec(path: str | Path, world: str | None = None) -> dict:
    """The run spec at `path`, its shape checked (UsageError naming the file and the fault), in
    `world` where it is a study of a world (`in_world`)."""
    try:
        spec = safe_files.read_mapping(path, "a run spec")
    except safe_files.FileError as error:
        raise UsageError(str(error)) from None
    stages = spec.get("stages")
    if not isinstance(stages, list) or not stages or not all(isinstance(s, dict) for s in stages):
        raise UsageError(f"{path}: 'stages' must be a list of mappings (name, notebook, parameters), one per "
                         f"stage; it is {str(stages)[:60]!r}")
    spec.setdefault("name", Path(path).stem)
    if not isinstance(spec["name"], str) or not re.fullmatch(_RUN_NAME, spec["name"]):
        raise UsageError(f"{path}: run name {spec['name']!r} must be one folder name under --outputs (letters, "
                         f"digits, '_', '-', '.'; no '/' and no leading '.'), e.g. "
                         f"{re.sub(r'[^A-Za-z0-9_.-]', '_', str(spec['name'])).lstrip('.') or 'run'!r}")
    spec["shared"] = spec.get("shared") or {}
    mappings = {"shared parameters": spec["shared"],
                **{f"parameters of stage {s.get('name')!r}": s.get("parameters") or {} for s in stages}}
    for where, value in mappings.items():
        if not isinstance(value, dict):
            raise UsageError(f"{path}: the {where} must be a mapping of parameter: value, not {str(value)[:60]!r}")
    check_stages(path, stages)
    return in_world(spec, path, world)


WORLD_TEACHERS = "{world_teachers}"  # a world spec's name for its world's shipped teachers folder


def in_world(spec: dict, path: str | Path, world: str | None) -> dict:
    """A spec with `world: <name>` is a study of that world, run in another with `--world`: its
    stages name the world's teachers `{world_teachers}`, and the world sets every stage's `base`
    and `conflict` (worlds.WORLDS), so one spec is the study at every setting of the dial. In a
    world other than its own the run is named `<name>_<world>` (its own folder under --outputs)."""
    own = spec.get("world")
    if own is None:
        if world is not None:
            raise UsageError(f"{path} is not a study of a world (no 'world:' key), so --world {world} cannot move "
                             "it; run it without --world")
        if WORLD_TEACHERS in json.dumps(spec["stages"]):
            raise UsageError(f"{path} names {WORLD_TEACHERS} but says no world: add 'world: <name>' "
                             f"(worlds: {sorted(worlds.WORLDS)})")
        return spec
    chosen = world or own
    for name in (own, chosen):
        if name not in worlds.WORLDS:
            raise UsageError(f"{path}: unknown world {name!r}; worlds: {sorted(worlds.WORLDS)} (flowopd_lib/worlds.py)")
    set_here = sorted({"base", "conflict"} & set(spec["shared"]))
    if set_here:
        raise UsageError(f"{path}: shared {set_here} are the world's ({own}: base {worlds.WORLDS[own].base}, "
                         f"conflict {worlds.WORLDS[own].conflict}); remove them, or drop 'world:'")
    w = worlds.WORLDS[chosen]
    stages = json.loads(json.dumps(spec["stages"]).replace(WORLD_TEACHERS, "{%s}" % worlds.placeholder(chosen)))
    return {**spec, "name": spec["name"] if chosen == own else f"{spec['name']}_{chosen}", "world": chosen,
            "shared": {**spec["shared"], "base": w.base, "conflict": w.conflict}, "stages": stages}


def check_stages(path: str | Path, stages: list[dict]) -> None:
    """Each stage has a name that {name} can refer to, once, and a notebook that exists."""
    names = [s.get("name") for s in stages]
    for stage in stages:
        missing = {"name", "notebook"} - set(stage)
        if missing:
            raise UsageError(f"{path}: stage {stage} lacks {sorted(missing)}")
        if not re.fullmatch(_NAME, str(stage["name"])):
            raise UsageError(f"{path}: stage name {stage['name']!r} may hold only letters, digits and '_' "
                             f"(it is referred to as {{name}}); e.g. {re.sub(r'[^A-Za-z0-9_]', '_', str(stage['name']))!r}")
        if not (ROOT / str(stage["notebook"])).is_file():
            raise UsageError(f"{path}: stage {stage['name']!r}: notebook {stage['notebook']} does not exist")
    if len(set(names)) != len(names):
        raise UsageError(f"{path}: stage names repeat: {names}")
    reserved = sorted(set(names) & set(PLACEHOLDERS))
    if reserved:
        raise UsageError(f"{path}: stage name(s) {reserved} are taken: {{{reserved[0]}}} is "
                         f"{shown(PLACEHOLDERS[reserved[0]])}; rename the stage")


def shown(path: Path) -> str:
    """The path relative to the repository when inside it (messages), else as it is."""
    return str(path.relative_to(ROOT)) if ROOT in path.parents else str(path)


def notebook_parameters(notebook: Path) -> set[str]:
    """Names assigned in the notebook's `parameters` cell, as papermill reads them (what it can inject)."""
    import papermill

    return set(papermill.inspect_notebook(str(notebook)))


def unknown_keys(keys, valid: set[str]) -> str:
    """'key' (did you mean 'closest'?), ... for each of `keys` not in `valid` ("" when none is unknown)."""
    said = []
    for key in sorted(set(keys) - valid):
        close = difflib.get_close_matches(key, sorted(valid), n=1)
        said.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ", ".join(said)


def check_keys(spec: dict, overrides: dict) -> None:
    """Shared and `-p` keys must be parameters some stage's notebook declares: otherwise they would
    reach no stage, silently. `out_dir` is the runner's everywhere."""
    declared = set().union(*(notebook_parameters(ROOT / s["notebook"]) for s in spec["stages"]))
    valid = declared - RUNNER_PARAMETERS
    notebooks = sorted({s["notebook"] for s in spec["stages"]})
    for where, keys in ((f"{spec['name']}: shared", spec["shared"]), ("-p", overrides)):
        if set(keys) & RUNNER_PARAMETERS:
            raise UsageError(f"{where}: out_dir is set by the runner (<outputs>/<run>/<stage>); choose the "
                             "folder with --outputs")
        said = unknown_keys(keys, valid)
        if said:
            raise UsageError(f"{where}: no stage's notebook declares {said}; the notebooks {notebooks} declare "
                             f"{sorted(valid)}")


def merge_parameters(base: dict, update: dict) -> dict:
    """`update` over `base`: `extra` (MERGED_PARAMETERS) key by key, any other value replaced whole."""
    merged = dict(base)
    for key, value in update.items():
        if key in MERGED_PARAMETERS and isinstance(value, dict) and isinstance(merged.get(key), dict):
            value = {**merged[key], **value}
        merged[key] = value
    return merged


def resolve(value, stage_dirs: dict[str, Path], stage: str):
    """Replace `{stage}` references in strings (recursively in lists and dicts) by output directories,
    and the PLACEHOLDERS (`{teachers}`) by their folders."""
    if isinstance(value, str):
        def sub(m):
            if m.group(1) in PLACEHOLDERS:
                return str(PLACEHOLDERS[m.group(1)])
            if m.group(1) not in stage_dirs:
                raise UsageError(f"stage {stage!r} refers to {{{m.group(1)}}}, which is not an earlier stage "
                                 f"(earlier: {sorted(stage_dirs)}) nor one of {sorted('{%s}' % p for p in PLACEHOLDERS)}")
            return str(stage_dirs[m.group(1)])
        return _REF.sub(sub, value)
    if isinstance(value, list):
        return [resolve(v, stage_dirs, stage) for v in value]
    if isinstance(value, dict):
        return {k: resolve(v, stage_dirs, stage) for k, v in value.items()}
    return value


def parse_override(text: str) -> tuple[str, object]:
    """`-p key=value` -> (key, value read as YAML); anything else is a UsageError naming it."""
    try:
        return cli.key_value(text, "-p")
    except cli.UserError as error:
        raise UsageError(str(error)) from None


def stage_parameters(spec: dict, stage: dict, stage_dirs: dict[str, Path], out_dir: Path,
                     overrides: dict) -> dict:
    declared = notebook_parameters(ROOT / stage["notebook"])
    own = stage.get("parameters", {})
    said = unknown_keys(own, declared - RUNNER_PARAMETERS)
    if said:
        raise UsageError(f"stage {stage['name']!r}: {stage['notebook']} has no parameter(s) {said}"
                         + ("; out_dir is set by the runner" if set(own) & RUNNER_PARAMETERS else "")
                         + f"; it declares {sorted(declared - RUNNER_PARAMETERS)}")
    params = {k: v for k, v in spec["shared"].items() if k in declared}
    params = merge_parameters(params, own)
    params = merge_parameters(params, {k: v for k, v in overrides.items() if k in declared})  # -p wins everywhere
    params = resolve(params, stage_dirs, stage["name"])
    params["out_dir"] = str(out_dir)
    if "eval_cache" in declared:
        params.setdefault("eval_cache", str(out_dir.parent / "eval_cache"))
    return params


def run_stage(stage: dict, params: dict, out_dir: Path) -> None:
    from papermill.exceptions import PapermillExecutionError

    from . import notebook

    out_dir.mkdir(parents=True, exist_ok=True)
    executed = out_dir / Path(stage["notebook"]).name
    (out_dir / "parameters.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (out_dir / "shipped_assets.sha256").write_text(shipped_inputs_record(params))
    try:
        with open(out_dir / "log.txt", "w") as log:
            notebook.execute(ROOT / stage["notebook"], executed, params, cwd=ROOT, log=log)
    except PapermillExecutionError as err:
        raise RunError(f"stage {stage['name']!r} failed in {stage['notebook']}, cell {err.exec_count}: "
                       f"{err.ename}: {err.evalue}\n  executed notebook: {executed}\n  log: {out_dir / 'log.txt'}"
                       ) from None


def write_provenance(run_dir: Path, spec: dict, overrides: dict) -> None:
    from .tracking import provenance

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (run_dir / "provenance.json").write_text(json.dumps({**provenance(), "overrides": overrides}, indent=2,
                                                        default=str))


def plan_stages(spec: dict, run_dir: Path, overrides: dict | None = None) -> list[tuple[dict, Path, dict]]:
    """(stage, output directory, resolved parameters) of every stage; raises RunError on a bad spec."""
    check_keys(spec, overrides or {})
    stage_dirs: dict[str, Path] = {}
    plan = []
    for stage in spec["stages"]:
        out_dir = run_dir / stage["name"]
        plan.append((stage, out_dir, stage_parameters(spec, stage, stage_dirs, out_dir, overrides or {})))
        stage_dirs[stage["name"]] = out_dir
    return plan


def files_fingerprint(folder: Path, skip: tuple[Path, ...] = ()) -> str:
    """sha256 over the files under `folder` (relative names and bytes), leaving out those under `skip`."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not any(s in p.parents for s in skip)):
        h.update(str(path.relative_to(folder)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def shipped_assets_fingerprint() -> str:
    """sha256 over the files of flowopd_lib/assets but every world's shipped teachers and the measured
    tables (assets/measured: records of diagnostics, read by no stage): what the toy world ships to every
    stage (bases, PickScore scorers, prompts). The teachers count only for the stages that name them
    (`shipped_teachers_used`). Not cached: a stage that ships a retrained base changes it for the
    stages after it (~10 ms)."""
    from .models import ASSETS

    return files_fingerprint(ASSETS, skip=(*PLACEHOLDERS.values(), ASSETS / "measured"))


def shipped_teachers_used(params) -> dict[str, Path]:
    """name -> directory of each shipped teacher that `params` names: any string (in lists and dicts
    too) that is a path under a world's teachers folder (PLACEHOLDERS), absolute or relative to the
    repository, e.g. `{teachers}/geneval` resolved; a folder itself names every teacher in it. The
    name is the task for the toy world's (`geneval`), else `<placeholder>/<task>` (`teachers_dial/geneval`)."""
    found: dict[str, Path] = {}
    if isinstance(params, dict):
        for value in params.values():
            found.update(shipped_teachers_used(value))
    elif isinstance(params, list):
        for value in params:
            found.update(shipped_teachers_used(value))
    elif isinstance(params, str) and params and "\n" not in params:
        path = Path(os.path.normpath(ROOT / params))  # ROOT / an absolute path is that path
        for key, folder in PLACEHOLDERS.items():
            prefix = "" if key == "teachers" else f"{key}/"
            if path == folder:
                found.update({prefix + d.name: d for d in sorted(folder.glob("*")) if d.is_dir()})
            elif folder in path.parents:
                name = path.relative_to(folder).parts[0]
                found[prefix + name] = folder / name
    return found


def world_of(teacher: str) -> str:
    """The world of a `shipped_teachers_used` name: `geneval` -> toy, `teachers_dial/geneval` -> dial."""
    placeholder = teacher.split("/")[0] if "/" in teacher else "teachers"
    return next(name for name in worlds.WORLDS if worlds.placeholder(name) == placeholder)


def check_teachers_base(stage: dict, params: dict) -> None:
    """A stage that uses a world's teachers runs on that world's base: a dial teacher (adapted to
    toy_glyph) loaded on the base `toy` would run, and mean nothing."""
    used = {world_of(name) for name in shipped_teachers_used(params)}
    if len(used) > 1:
        raise UsageError(f"stage {stage['name']!r} uses the teachers of several worlds {sorted(used)}: each world's "
                         f"teachers adapt its own base ({ {w: worlds.WORLDS[w].base for w in sorted(used)} })")
    base = stage_base(stage, params)
    if not used or base is None:
        return
    name = used.pop()
    where = worlds.WORLDS[name]
    if base != where.base:
        raise UsageError(f"stage {stage['name']!r} uses the {name} world's teachers ({{{worlds.placeholder(name)}}}) on "
                         f"the base {base!r}; they adapt {where.base!r}: set base: {where.base} (and conflict: "
                         f"{where.conflict:g}) in the spec's shared parameters")


def shipped_teacher_lines(params: dict) -> list[str]:
    """`teacher <task> <sha256 of its folder>` for each shipped teacher the stage names, by task."""
    return [f"teacher {name} {files_fingerprint(d) if d.exists() else 'missing'}"
            for name, d in sorted(shipped_teachers_used(params).items())]


def shipped_inputs_record(params: dict) -> str:
    """What a stage records in shipped_assets.sha256: the shipped assets' fingerprint, then one line
    per shipped teacher it names (a stage naming none records the fingerprint alone)."""
    return "\n".join([shipped_assets_fingerprint(), *shipped_teacher_lines(params)]) + "\n"


def missing_teachers(params: dict) -> dict[str, Path]:
    """The shipped teachers `params` names whose folder holds no teacher (adapter.json) yet."""
    return {name: d for name, d in shipped_teachers_used(params).items() if not (d / "adapter.json").exists()}


def stage_base(stage: dict, params: dict):
    """The base the stage runs on: its `base` parameter, else its notebook's default (None: a notebook
    without a `base`, e.g. SD3.5-M's)."""
    import ast

    import papermill

    declared = papermill.inspect_notebook(str(ROOT / stage["notebook"]))
    if "base" not in declared:
        return None
    return params.get("base", ast.literal_eval(declared["base"]["default"]))


def on_toy_base(stage: dict, params: dict) -> bool:
    """Whether the stage runs on a shipped toy base (models.BASES), so its results depend on the
    shipped assets. SD3.5-M stages do not."""
    from . import models

    return stage_base(stage, params) in models.BASES


def inputs_changed(out_dir: Path, params: dict, on_shipped_assets: bool) -> bool:
    """Whether the stage folder holds a run made with other parameters (its parameters.yaml), for a
    stage on the shipped assets on other ones, or with other shipped teachers than those its
    parameters name now (both in its shipped_assets.sha256; a run from before that file counts as
    other)."""
    recorded = out_dir / "parameters.yaml"
    if not recorded.exists():
        return False
    if recorded_parameters(recorded) != yaml.safe_load(yaml.safe_dump(params)):
        return True
    assets = out_dir / "shipped_assets.sha256"
    lines = assets.read_text().splitlines() if assets.exists() else []
    if on_shipped_assets and lines[:1] != [shipped_assets_fingerprint()]:
        return True
    return lines[1:] != shipped_teacher_lines(params)


def recorded_parameters(path: Path) -> dict:
    """A stage folder's parameters.yaml (an unreadable one is a UsageError naming it and the fix)."""
    try:
        return safe_files.read_mapping(path, "the parameters a stage ran with")
    except safe_files.FileError as error:
        raise UsageError(f"{error} (or move the folder {path.parent} away to re-run the stage)") from None


def finished_backup(stage: dict, out_dir: Path, params: dict, upstream: set[str]) -> Path | None:
    """The newest backup (`safe_files.set_aside`) of a stage that finished with exactly `params` and
    today's shipped inputs, when its folder does not hold such a run itself. `upstream`: when the
    restored stages it consumes were set aside; then only a backup set aside with them (built on
    those outputs) qualifies, and never one of several such moments."""
    on_toy = on_toy_base(stage, params)
    if (finished_with(out_dir, params, on_toy) and not upstream) or len(upstream) > 1:
        return None
    for backup in reversed(safe_files.backups(out_dir)):
        if (not upstream or safe_files.backup_stamp(backup) in upstream) and finished_with(backup, params, on_toy):
            return backup
    return None


def finished_with(folder: Path, params: dict, on_toy: bool) -> bool:
    """Whether a stage folder holds a finished run of `params` on today's shipped inputs (an
    unreadable record counts as not)."""
    if not (folder / ".done").exists() or not (folder / "parameters.yaml").exists():
        return False
    try:
        return not inputs_changed(folder, params, on_toy)
    except UsageError:
        return False


def restore(backup: Path, out_dir: Path, when: str) -> Path | None:
    """Put a stage's backup back in its place, its current folder (if any) set aside; returns where."""
    aside = safe_files.set_aside(out_dir, when=when) if out_dir.exists() else None
    os.rename(backup, out_dir)
    return aside


def fresh_stamp(run_dir: Path) -> str:
    """This run's date for the folders it sets aside, one no backup in `run_dir` carries yet (so a
    restore finds the consumers set aside together with a stage)."""
    base = when = safe_files.stamp()
    n = 1
    while any(run_dir.glob(f"*{safe_files.BACKUP}{when}")) or any(run_dir.glob(f"*{safe_files.BACKUP}{when}.*")):
        n += 1
        when = f"{base}-{n}"
    return when


def run(spec_path: str | Path, only: list[str] | None = None, start: str | None = None,
        overrides: dict | None = None, outputs: Path = OUTPUTS, jobs: int = 1, report: bool = True,
        world: str | None = None) -> Path:
    """Execute the spec's stages in order (see the module docstring); returns the run directory.
    Everything is checked and decided before anything is written, moved or started."""
    spec, overrides = load_spec(spec_path, world), overrides or {}
    run_dir = outputs / spec["name"]
    names = [s["name"] for s in spec["stages"]]
    for name in (only or []) + ([start] if start else []):
        if name not in names:
            raise UsageError(f"no stage {name!r} in {spec_path}; stages: {names}")
    plan = plan_stages(spec, run_dir, overrides)  # before anything runs: spec errors fail fast
    chosen = selection(plan, only, start)
    check_runnable(plan, chosen, jobs)
    decisions = decide(plan, chosen, rerun=bool(only) or start is not None)  # reads every stage folder
    if report:  # the parent's record: --jobs children (quiet) would overwrite it with their own command
        write_provenance(run_dir, spec, overrides)
    todo = apply(spec["name"], plan, decisions, fresh_stamp(run_dir), report)
    if jobs > 1:  # even one stage left: as a child, it gets the cores rather than the parent's threads
        run_parallel(spec_path, spec, todo, overrides, outputs, jobs)
    else:
        run_in_order(spec, todo)
    summary = run_dir / spec.get("summary", "summary") / "main_table.md"
    if summary.exists() and report:
        print(f"\nsummary: {summary}\n\n{summary.read_text()}")
        said = summary.with_name("evaluation.txt")  # notebook 05's protocol line: a quick or a decisive evaluation
        if said.exists():
            print(said.read_text())
    return run_dir


def check_runnable(plan: list, chosen: list[bool], jobs: int) -> None:
    """Refuse, before anything is written or started, selected stages that name a teacher not
    shipped yet, and --jobs > 1 for stages that train as accelerate jobs on the GPUs."""
    for (stage, _, params), selected in zip(plan, chosen):
        missing = missing_teachers(params) if selected else {}
        if missing:
            name = sorted(missing)[0]
            task, world = missing[name].name, world_of(name)
            flag = "" if world == "toy" else f" --world {world}"
            raise UsageError(f"stage {stage['name']!r} uses the shipped teacher(s) {sorted(missing)}, not shipped yet "
                             f"(no {shown(missing[name] / 'adapter.json')}): train and ship each with "
                             f"`python -m flowopd_lib.teachers train {task}{flag} --out runs/teachers/{task}` and "
                             f"`python -m flowopd_lib.teachers ship {task}{flag} --run runs/teachers/{task}`")
        if selected:
            check_teachers_base(stage, params)
    on_gpus = gpu_launch_stages([p for p, selected in zip(plan, chosen) if selected])
    if jobs > 1 and on_gpus:
        raise UsageError(f"--jobs {jobs} runs stages side by side, but {len(on_gpus)} stage(s) train as accelerate "
                         f"jobs on the GPUs ({', '.join(f'{name}: num_processes={n}' for name, n in on_gpus.items())}): "
                         "side by side they would start on the same GPUs and rendezvous port. Run with --jobs 1 "
                         "(each stage gets every GPU in turn)")


def decide(plan: list, chosen: list[bool], rerun: bool) -> list[tuple[str, Path | None]]:
    """What becomes of each planned stage, decided from its folder and backups before anything moves:
    ("restore", backup), ("set aside", None) (changed: re-run from scratch), ("run", None), or a
    message ("done, skipped", "not selected"). `rerun` (--only, --from) re-runs done stages and
    never restores. A stage consuming a changed stage is changed; one consuming a restored stage
    is restored from the backup set aside with it, or changed."""
    decisions, changed, restored = [], set(), {}  # restored: stage -> when its backup had been set aside
    for (stage, out_dir, params), selected in zip(plan, chosen):
        name, upstream, done = stage["name"], dependencies(stage), (out_dir / ".done").exists()
        if not selected:
            decisions.append(("done, skipped" if done else "not selected", None))
            continue
        backup = None if rerun or upstream & changed else \
            finished_backup(stage, out_dir, params, {restored[d] for d in upstream & set(restored)})
        if backup is not None:
            restored[name] = safe_files.backup_stamp(backup)
            decisions.append(("restore", backup))
        elif inputs_changed(out_dir, params, on_toy_base(stage, params)) or upstream & (changed | set(restored)):
            changed.add(name)
            decisions.append(("set aside" if out_dir.exists() else "run", None))
        else:
            decisions.append(("done, skipped" if done and not rerun else "run", None))
    return decisions


def apply(run_name: str, plan: list, decisions: list, when: str, report: bool) -> list:
    """Carry out `decide`'s decisions (backups dated `when`); returns the stages to run."""
    todo = []
    for (stage, out_dir, params), (action, backup) in zip(plan, decisions):
        said = f"[{run_name}] {stage['name']}"
        if action == "restore":
            aside = restore(backup, out_dir, when)
            print(f"{said}: restored its finished run with these parameters from {backup.name}"
                  + (f" (the folder it replaces: {aside.name})" if aside else ""))
        elif action in ("set aside", "run"):
            if action == "set aside":
                print(f"{said}: its parameters, inputs or shipped assets changed since it ran; re-running "
                      f"(old outputs: {safe_files.set_aside(out_dir, when=when)})")
            todo.append((stage, out_dir, params))
        elif report:  # a child of --jobs stays quiet about the stages it does not run
            print(f"{said}: {action}")
    return todo


def gpu_launch_stages(plan: list) -> dict[str, int]:
    """Stage name -> num_processes of the planned stages that train as `accelerate launch` jobs on
    GPUs: num_processes > 1 (notebooks 02 and 04 train one process in their kernel) and not CPU ranks
    (`train.launch`: an accelerate config with use_cpu / MULTI_CPU, or no config on a machine without
    CUDA, runs torch.distributed.run --standalone, on a free port each). Each such job takes the GPUs
    from the first and binds the rendezvous port (main_process_port, 29500 unless set), so two at
    once collide: `--jobs` > 1 refuses them."""
    from .train import cpu_processes, processes

    found = {}
    for stage, _, params in plan:
        try:
            n = processes(params.get("num_processes") or 1)
        except ValueError as error:
            raise UsageError(f"stage {stage['name']!r}: {error}") from None
        if n <= 1:
            continue
        config = params.get("accelerate_config")
        try:  # the kernels run in ROOT, so a relative config path is relative to it
            cpu = cpu_processes(str(ROOT / config) if config else None)
        except OSError:  # a config that is not there: the stage will fail; count it as GPUs meanwhile
            cpu = False
        if not cpu:
            found[stage["name"]] = n
    return found


def selection(plan: list, only: list[str] | None, start: str | None) -> list[bool]:
    """Whether each planned stage is selected: from `start` on (all when None), and in `only` if given."""
    names = [stage["name"] for stage, _, _ in plan]
    first = names.index(start) if start is not None else 0
    return [i >= first and (not only or name in only) for i, name in enumerate(names)]


def execute_stage(run_name: str, stage: dict, params: dict, out_dir: Path) -> None:
    done = out_dir / ".done"
    done.unlink(missing_ok=True)
    t0 = time.time()
    print(f"[{run_name}] {stage['name']}: running {stage['notebook']} -> {out_dir}", flush=True)
    run_stage(stage, params, out_dir)
    done.write_text(f"{time.time() - t0:.1f} s\n")
    print(f"[{run_name}] {stage['name']}: finished in {time.time() - t0:.0f} s", flush=True)


def dependencies(stage: dict) -> set[str]:
    """Names of the stages whose outputs `stage` refers to (`{name}` in its parameters; not `{teachers}`)."""
    return set(_REF.findall(json.dumps(stage.get("parameters", {})))) - set(PLACEHOLDERS)


def consumers_of(failed: set[str], waiting: list[dict]) -> list[dict]:
    """The stages of `waiting` that consume (directly or through other waiting stages) a stage in `failed`."""
    blocked, names = [], set(failed)
    for stage in waiting:  # in spec order: a stage's inputs come before it
        if dependencies(stage) & names:
            blocked.append(stage)
            names.add(stage["name"])
    return blocked


def failure_report(spec: dict, failed: list[str], blocked: list[dict]) -> RunError:
    return RunError(f"stage(s) {failed} failed (the error is printed above and in "
                    f"{spec['name']}/<stage>/log.txt); not started, as they consume it: "
                    f"{[s['name'] for s in blocked]}; every other stage ran. Fix it and run again: finished "
                    "stages are skipped")


def run_in_order(spec: dict, todo: list) -> None:
    """Run `todo` one stage at a time in this process. A failing stage stops only its consumers."""
    failed: list[str] = []
    errors: list[str] = []
    for stage, out_dir, params in todo:
        if stage in consumers_of(set(failed), [s for s, _, _ in todo]):
            continue
        try:
            execute_stage(spec["name"], stage, params, out_dir)
        except RunError as err:
            print(f"[{spec['name']}] {err}", flush=True)
            failed.append(stage["name"])
            errors.append(str(err))
    if failed:
        blocked = consumers_of(set(failed), [s for s, _, _ in todo])
        raise RunError(f"{failure_report(spec, failed, blocked)}\n" + "\n".join(errors))


def child_threads(cores: int, jobs: int, others: int) -> int:
    """Threads for a stage that `--jobs` starts while `others` stages run or wait: a share of the
    cores, or all of them when it is the run's last stage to start and none runs beside it (a
    summary evaluating every adapter would otherwise keep one core of two for itself alone)."""
    return cores if others == 0 else max(1, cores // jobs)


def run_parallel(spec_path: str | Path, spec: dict, todo: list, overrides: dict, outputs: Path, jobs: int) -> None:
    """Run the stages in `todo` up to `jobs` at a time, each as soon as the stages it refers to
    have finished, in child runners (`--only`) whose kernels get cpu_count // jobs threads (all of them
    for a stage that starts alone with nothing left to wait: the summary at the end). A failing
    stage stops only its consumers; the others go on."""
    waiting = [stage for stage, _, _ in todo]
    deps = {s["name"]: dependencies(s) & {w["name"] for w in waiting} for s in waiting}
    flags = [f for k, v in overrides.items() for f in ("-p", f"{k}={json.dumps(v)}")]
    running: dict[str, subprocess.Popen] = {}
    finished: set[str] = set()
    failed: list[str] = []
    blocked: list[dict] = []
    while waiting or running:
        for stage in consumers_of(set(failed), waiting):
            waiting.remove(stage)
            blocked.append(stage)
        for stage in [s for s in waiting if deps[s["name"]] <= finished][: jobs - len(running)]:
            command = [sys.executable, "-m", "flowopd_lib.runs", str(spec_path), "--only", stage["name"],
                       "--outputs", str(outputs), "--quiet", *flags,
                       *(["--world", spec["world"]] if spec.get("world") else [])]
            waiting.remove(stage)
            threads = str(child_threads(os.cpu_count() or 1, jobs, others=len(running) + len(waiting)))
            env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
            running[stage["name"]] = subprocess.Popen(command, env=env)
        time.sleep(0.5)
        for name, process in list(running.items()):
            if process.poll() is not None:
                del running[name]
                if process.returncode == 0:
                    finished.add(name)
                else:
                    failed.append(name)
    if failed:
        raise failure_report(spec, failed, blocked)


@cli.entry
def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("spec", help="a run spec (YAML), e.g. papermill_runs/toy_quick.yaml")
    parser.add_argument("--only", action="append", help="run only this stage (repeatable); re-runs it if done")
    parser.add_argument("--from", dest="start", help="re-run from this stage on")
    parser.add_argument("-p", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a shared parameter in every stage that declares it")
    parser.add_argument("--jobs", type=cli.count, default=1,
                        help="run up to this many independent stages at once (each with cores / jobs threads); "
                             "refused for stages that train as accelerate jobs on GPUs")
    parser.add_argument("--outputs", type=Path, default=OUTPUTS, help="where run directories go")
    parser.add_argument("--world", help="run a world's study (a spec with 'world:') in another world of "
                                        "flowopd_lib/worlds.py, e.g. toy: its teachers, base and conflict; "
                                        "the run is named <spec name>_<world>")
    parser.add_argument("--quiet", dest="report", action="store_false", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    overrides = dict(parse_override(o) for o in args.overrides)
    try:
        run(args.spec, args.only, args.start, overrides, args.outputs, args.jobs, args.report, args.world)
    except UsageError:
        raise  # cli.entry: one line, exit status 2
    except RunError as err:  # a stage failed: the message names it, its cell and its log
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()

"""How long would a study take in another stage order? Replay a run's measured stage times.

`runs --jobs N` starts waiting stages in spec order, each as soon as the stages it refers to have
finished, N at a time. Its log has every stage's time ("[<run>] <stage>: finished in <s> s"). This
replays those times under that rule for a spec (e.g. the same spec after its stages were reordered)
and prints each stage's start and end and the makespan, in minutes:

    python -m flowopd_lib.diagnostics.schedule run.log papermill_runs/dial_full.yaml --jobs 2 [--world toy]

Stages of the spec that the log does not time (a summary run later, say) are left out.
"""
from __future__ import annotations

import re
from pathlib import Path

from .. import cli, runs

FINISHED = re.compile(r"\] (\S+): finished in (\d+) s")


def stage_minutes(log: str) -> dict[str, float]:
    """Stage name -> minutes, from a runner's log (the last time a stage finished, if it ran twice)."""
    return {m.group(1): int(m.group(2)) / 60 for m in FINISHED.finditer(log)}


def replay(spec: dict, minutes: dict[str, float], jobs: int) -> dict[str, tuple[float, float]]:
    """Stage name -> (start, end) in minutes when the timed stages of `spec` run under `--jobs`'s rule."""
    stages = [s["name"] for s in spec["stages"] if s["name"] in minutes]
    deps = {s["name"]: runs.dependencies(s) & set(stages) for s in spec["stages"] if s["name"] in minutes}
    now, running, finished, waiting, times = 0.0, {}, set(), list(stages), {}
    while waiting or running:
        for name in [n for n in waiting if deps[n] <= finished][: jobs - len(running)]:
            waiting.remove(name)
            running[name] = now + minutes[name]
            times[name] = (now, running[name])
        name = min(running, key=running.get)
        now = running.pop(name)
        finished.add(name)
    return times


@cli.entry
def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("log", type=Path, help="the output of a `python -m flowopd_lib.runs` run")
    parser.add_argument("spec", help="the spec whose stage order to replay")
    parser.add_argument("--jobs", type=cli.count, default=2)
    parser.add_argument("--world", default=None, help="as for flowopd_lib.runs")
    args = parser.parse_args(argv)
    if not args.log.is_file():
        raise cli.UserError(f"{args.log}: no such log (the output of a flowopd_lib.runs run)")
    minutes = stage_minutes(args.log.read_text(errors="replace"))
    if not minutes:
        raise cli.UserError(f"{args.log} times no stage (no '[<run>] <stage>: finished in <s> s' line)")
    times = replay(runs.load_spec(args.spec, args.world), minutes, args.jobs)
    for name, (start, end) in sorted(times.items(), key=lambda item: item[1]):
        print(f"{name:32s} {start:6.1f} -> {end:6.1f}")
    print(f"makespan {max(end for _, end in times.values()):.1f} min over {len(times)} stages "
          f"({sum(minutes[n] for n in times):.1f} stage-minutes) with --jobs {args.jobs}")


if __name__ == "__main__":
    main()

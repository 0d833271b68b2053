"""Benchmark: wall time of one Flow-OPD update vs one GRPO update on the same batch.

Same model, prompts, group size, steps and CFG; OPD routes each prompt to a teacher adapter and
adds MAR (anchor = the base), GRPO scores with the routed task's reward and adds its KL to the
base. Prints the time per phase (rollout, label, train), the ratio OPD / GRPO, and what one
labelling forward costs under each adapter routing (where OPD's extra label time goes).

    python -m flowopd_lib.diagnostics.bench                  # the shipped toy base, 3 timed updates each
    python -m flowopd_lib.diagnostics.bench --base tiny --updates 2
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from .. import adapters
from ..grpo import GRPOConfig, GRPOTrainer
from ..opd import OPDConfig, OPDTrainer

TASKS = ("geneval", "ocr", "pickscore")
PHASES = ("time/rollout", "time/label", "time/train")


def load_model(base: str):
    if base == "tiny":
        from ..models.toy import ToyFlowModel
        torch.manual_seed(0)
        return ToyFlowModel("tiny")
    from ..models import load_base
    return load_base(base)


def timed_updates(trainer, n: int) -> dict[str, float]:
    trainer.run_update(0)  # warm-up (allocations, prompt cache)
    runs = [trainer.run_update(u) for u in range(1, n + 1)]
    out = {p: statistics.median(r[p] for r in runs) for p in PHASES}
    out["total"] = sum(out.values())
    if "zero_spread_fraction" in runs[0]:  # GRPO skips the update of groups without reward spread
        out["zero_spread_fraction"] = statistics.mean(r["zero_spread_fraction"] for r in runs)
    return out


def forward_costs(trainer: OPDTrainer, repeats: int = 5) -> dict[str, float]:
    """Seconds per guided forward at one step's states of a rollout (uncond + cond), with every
    sample through the base, through one teacher, and through its routed teacher (mixed batch)."""
    traj = trainer.rollout(0)
    routed = trainer.route(traj.prompts)

    def seconds(per_sample: list[str | None]) -> float:
        trainer.velocities_through(traj, 0, per_sample)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            trainer.velocities_through(traj, 0, per_sample)
        return (time.perf_counter() - start) / repeats

    return {"base": seconds([None] * len(traj)), "one teacher": seconds([routed[0]] * len(traj)),
            "routed teachers (mixed)": seconds(routed)}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="toy", help="'toy' (shipped base), 'tiny' (random) or a model directory")
    parser.add_argument("--updates", type=int, default=3, help="timed updates per trainer (after one warm-up)")
    parser.add_argument("--prompts", type=int, default=6, help="prompts per update")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="SDE steps per trajectory")
    parser.add_argument("--cfg-scale", type=float, default=3.0)
    args = parser.parse_args(argv)
    shared = dict(datasets={t: 1.0 for t in TASKS}, prompts_per_update=args.prompts, group_size=args.group_size,
                  sde_steps=args.steps, cfg_scale=args.cfg_scale, updates=0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        grpo = GRPOTrainer(load_model(args.base), GRPOConfig(rewards={t: 1.0 for t in TASKS}, beta=0.04,
                                                              out_dir=str(tmp / "grpo"), **shared))
        teachers = {}
        for task in TASKS:  # random teacher adapters: the cost does not depend on their values
            adapters.add(grpo.model, task, rank=8, gaussian_init=False)
            teachers[task] = str(adapters.save(grpo.model, task, tmp / task))
        opd = OPDTrainer(load_model(args.base), OPDConfig(teachers=teachers, mar_lambda=0.02,
                                                           out_dir=str(tmp / "opd"), **shared))
        results = {"grpo": timed_updates(grpo, args.updates), "opd": timed_updates(opd, args.updates),
                   "forward": forward_costs(opd)}
    print(f"{'phase':<14}{'GRPO s':>9}{'OPD s':>9}")
    for key in (*PHASES, "total"):
        print(f"{key:<14}{results['grpo'][key]:>9.2f}{results['opd'][key]:>9.2f}")
    if results["grpo"].get("zero_spread_fraction", 0) > 0:
        print(f"note: {results['grpo']['zero_spread_fraction']:.0%} of GRPO's groups had no reward spread "
              f"(skipped in its train phase)")
    ratio = results["opd"]["total"] / results["grpo"]["total"]
    print(f"OPD / GRPO wall time per update: {ratio:.2f} (target <= 1.3)")
    results["ratio"] = {"opd_over_grpo": ratio}
    print(f"one labelling forward ({2 * args.prompts * args.group_size} rows with CFG):")
    for name, seconds in results["forward"].items():
        print(f"  {name:<24}{seconds:>6.3f} s")
    return results


if __name__ == "__main__":
    main()

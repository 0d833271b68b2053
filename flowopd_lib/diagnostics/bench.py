"""Benchmark: the wall time of one update of each trainer on the same batch.

What: Flow-OPD against Flow-GRPO (what distillation costs over RL), and the forward-process
trainers DiffusionNFT and AWM, per update and per sample. The four get the same base, prompts and
seeds (update u draws the same batch in every trainer), group size, sampling steps and CFG. OPD
routes each prompt to one of three teacher adapters (random ones: the cost does not depend on their
values) and adds MAR with the base as anchor; GRPO scores with the rewards that judge each prompt
and adds its KL to the base; NFT and AWM keep their own defaults (ODE rollouts, their numbers of
training noise levels, their KL to the base).

How: one warm-up update per trainer, then `--repeats` rounds; a round runs one update of every
trainer back to back, in an order that rotates from round to round, so that the load of a shared
machine falls on all of them alike. The OPD / GRPO ratio is taken within each round (the two
updates ran seconds apart) and summarised over the rounds.

Why the spread: on the 2-core VM one update's time varies by tens of percent with the machine's
other load, so every number is a median with its min-max over the rounds, never one run.

Printed: per trainer, seconds per update and per sample and the time of each phase (rollout, label,
train); the OPD / GRPO ratio; and what one labelling forward costs under each way of routing
adapters (where OPD's label time goes: a teacher forward with its LoRA folded into the base weights
costs what a base forward does, peft's per-sample routing of one mixed batch costs more).

    python -m flowopd_lib.diagnostics.bench                 # the shipped toy base, 5 rounds
    python -m flowopd_lib.diagnostics.bench --base tiny --repeats 2
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from .. import adapters, cli
from ..awm import AWMConfig, AWMTrainer
from ..grpo import GRPOConfig, GRPOTrainer
from ..nft import NFTConfig, NFTTrainer
from ..opd import OPDConfig, OPDTrainer

TASKS = ("geneval", "ocr", "pickscore")
PHASES = ("time/rollout", "time/label", "time/train")
TRAINERS = ("grpo", "opd", "nft", "awm")


def load_model(base: str):
    if base == "tiny":
        from ..models.toy import ToyFlowModel
        torch.manual_seed(0)
        return ToyFlowModel("tiny")
    from ..models import load_base
    return load_base(base)


def spread(values: list[float]) -> dict[str, float]:
    """Median, min and max of the rounds' values."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def build_trainers(args, tmp: Path) -> dict:
    shared = dict(datasets={t: 1.0 for t in TASKS}, prompts_per_update=args.prompts, group_size=args.group_size,
                  sde_steps=args.steps, cfg_scale=args.cfg_scale, updates=0)
    rewards = {t: 1.0 for t in TASKS}
    scratch, teachers = load_model(args.base), {}
    for task in TASKS:  # random teacher adapters (gaussian_init=False: a non-zero delta)
        adapters.add(scratch, task, rank=8, gaussian_init=False)
        teachers[task] = str(adapters.save(scratch, task, tmp / task))
    return {"grpo": GRPOTrainer(load_model(args.base), GRPOConfig(rewards=rewards, beta=0.04,
                                                                  out_dir=str(tmp / "grpo"), **shared)),
            "opd": OPDTrainer(load_model(args.base), OPDConfig(teachers=teachers, mar_lambda=0.02,
                                                               out_dir=str(tmp / "opd"), **shared)),
            "nft": NFTTrainer(load_model(args.base), NFTConfig(rewards=rewards, out_dir=str(tmp / "nft"), **shared)),
            "awm": AWMTrainer(load_model(args.base), AWMConfig(rewards=rewards, out_dir=str(tmp / "awm"), **shared))}


def timed_rounds(trainers: dict, repeats: int) -> list[dict[str, dict[str, float]]]:
    """Per round, each trainer's phase times of one update (run in a rotating order)."""
    for trainer in trainers.values():
        trainer.run_update(0)  # warm-up (allocations, prompt cache)
    names, rounds = list(trainers), []
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        rounds.append({name: trainers[name].run_update(1 + r) for name in order})
    return rounds


def summarise(rounds: list[dict], samples: int) -> dict:
    out = {}
    for name in rounds[0]:
        totals = [sum(r[name][p] for p in PHASES) for r in rounds]
        out[name] = {"seconds": spread(totals), "per_sample": spread([t / samples for t in totals]),
                     **{p: statistics.median(r[name][p] for r in rounds) for p in PHASES}}
        if "zero_spread_fraction" in rounds[0][name]:  # reward trainers skip groups without reward spread
            out[name]["zero_spread_fraction"] = statistics.mean(r[name]["zero_spread_fraction"] for r in rounds)
    return out


@torch.no_grad()
def forward_costs(trainer: OPDTrainer, repeats: int = 5) -> dict[str, float]:
    """Median seconds of one guided forward (uncond + cond) at one step's states of a rollout: every
    sample through the base, through one teacher (LoRA folded), through its routed teacher (folded,
    one forward per teacher), and through its routed teacher in one peft mixed batch."""
    traj = trainer.rollout(0)
    routed = trainer.route(traj.prompts)
    n = len(traj)

    def peft_mixed():
        with adapters.mixed(trainer.model, routed * 2 if traj.uncond is not None else routed):
            trainer.policy_velocity(traj, 0)

    cases = {"base": lambda: trainer.velocities_through(traj, [0], [None] * n),
             "one teacher (folded)": lambda: trainer.velocities_through(traj, [0], [routed[0]] * n),
             "routed teachers (folded)": lambda: trainer.velocities_through(traj, [0], routed),
             "routed teachers (peft mixed batch)": peft_mixed}
    seconds = {name: [] for name in cases}
    for r in range(repeats + 1):  # interleaved; the first round warms up
        for name, run in cases.items():
            start = time.perf_counter()
            run()
            if r:
                seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in seconds.items()}


def report(results: dict, args) -> None:
    updates, samples = results["updates"], args.prompts * args.group_size
    print(f"{args.repeats} rounds of one update per trainer, {args.prompts} prompts x {args.group_size} samples, "
          f"{args.steps} steps, CFG {args.cfg_scale}; median [min-max] over the rounds")
    print(f"{'trainer':<8}{'s / update':>22}{'ms / sample':>22}" + "".join(f"{p[5:]:>10}" for p in PHASES))
    for name, u in updates.items():
        s, ps = u["seconds"], u["per_sample"]
        print(f"{name:<8}{s['median']:>8.2f} [{s['min']:5.2f}-{s['max']:5.2f}]"
              f"{1e3 * ps['median']:>8.1f} [{1e3 * ps['min']:5.1f}-{1e3 * ps['max']:5.1f}]"
              + "".join(f"{u[p]:>10.2f}" for p in PHASES))
    for name, u in updates.items():
        if u.get("zero_spread_fraction", 0) > 0:
            print(f"note: {u['zero_spread_fraction']:.0%} of {name.upper()}'s groups had no reward spread "
                  f"(skipped in its train phase)")
    ratio = results["ratio"]
    print(f"OPD / GRPO per update (within each round): {ratio['median']:.2f} "
          f"[{ratio['min']:.2f}-{ratio['max']:.2f}], rounds {', '.join(f'{v:.2f}' for v in ratio['values'])}")
    print(f"one labelling forward ({2 * samples if args.cfg_scale != 1 else samples} rows with CFG), median s "
          f"('folded' includes folding each adapter, which label() does once for all its steps):")
    for name, seconds in results["forward"].items():
        print(f"  {name:<36}{seconds:>7.3f}")


@cli.entry
def main(argv: list[str] | None = None) -> dict:
    from ..models import BASES, SD3_BASES

    parser = cli.parser(__doc__)
    parser.add_argument("--base", default="toy", help="'toy' (shipped base), 'tiny' (random) or a model directory")
    parser.add_argument("--repeats", type=cli.count, default=5, help="timed rounds, one update per trainer each")
    parser.add_argument("--prompts", type=cli.count, default=6, help="prompts per update")
    parser.add_argument("--group-size", type=cli.count, default=8)
    parser.add_argument("--steps", type=cli.count, default=10, help="sampling steps per trajectory")
    parser.add_argument("--cfg-scale", type=float, default=3.0)
    args = parser.parse_args(argv)
    known = ["tiny", *BASES, *SD3_BASES]
    if args.base not in known and not Path(args.base).is_dir() and not args.base.startswith("stabilityai/"):
        raise cli.UserError(f"--base {args.base}: no such base; give one of {known}, a model folder or a hub id")
    with tempfile.TemporaryDirectory() as tmp:
        trainers = build_trainers(args, Path(tmp))
        rounds = timed_rounds(trainers, args.repeats)
        forward = forward_costs(trainers["opd"])
    values = [sum(r["opd"][p] for p in PHASES) / sum(r["grpo"][p] for p in PHASES) for r in rounds]
    results = {"updates": summarise(rounds, args.prompts * args.group_size),
               "ratio": {**spread(values), "values": values}, "forward": forward}
    report(results, args)
    return results


if __name__ == "__main__":
    main()

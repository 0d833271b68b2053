"""Dry run of a full-scale run spec on CPU, with tiny stand-ins for everything outside the repo.

    python -m flowopd_lib.dryrun papermill_runs/sd35m.yaml            # ~10 minutes on 2 cores
    python -m flowopd_lib.dryrun papermill_runs/sd35m.yaml -p trainer=nft -p cfg_scale=1.0 --only teacher_ocr

The spec runs through the same runner, notebooks, trainers and reward clients as on GPU nodes;
only what a CPU box cannot have is replaced, offline:

    SD3.5-Medium (hub)                 a random tiny SD3 pipeline saved as a diffusers folder
    PickScore_v1 + CLIP-H (hub)        a random tiny CLIP and processor (FLOWOPD_PICKSCORE_MODEL/_PROCESSOR)
    GenEval / DeQA reward servers      loopback servers speaking Flow-GRPO's protocol, judging with
                                       the toy scorers (FLOWOPD_GENEVAL_URL / FLOWOPD_DEQA_URL)
    Flow-GRPO's dataset/ folder        the toy world's prompt files (the same formats)
    8 GPUs, the paper's budgets        2 CPU ranks (gloo) started by torch.distributed.run, 2 updates
                                       of 2 prompts x 2 samples, 3 SDE steps, 2 test prompts per task

The CPU ranks: `train.launch` sees the MULTI_CPU accelerate config written here and starts the
ranks with torch.distributed.run and ACCELERATE_USE_CPU=true; `accelerate launch` itself (1.x)
would start ONE process for a CPU config, so the stages would not really run distributed.

`rapidocr` is the real engine (its models ship in the wheel). What this checks is that every
stage of the spec starts, trains, saves, hands its adapters on and evaluates; the numbers it
produces mean nothing. Outputs go to papermill_runs/outputs/<spec name>_dryrun/, emptied first
so that every stage trains instead of resuming an earlier dry run.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from unittest import mock

import yaml

from . import cli, runs
from .rewards.real.pickscore_v1 import MODEL_ENV, PROCESSOR_ENV, tiny_clip
from .rewards.real.server import DEQA_URL_ENV, GENEVAL_URL_ENV
from .rewards.real.stub import toy_reward_servers
from .toy.splits import PROMPT_DIR

# Budget overrides (-p) that shrink any full-scale spec to seconds per stage.
TINY_BUDGET = {"updates": 2, "prompts_per_update": 2, "group_size": 2, "sde_steps": 3, "eval_every": 0,
               "eval_prompts": 2, "eval_samples": 1, "eval_steps": 3, "lora_rank": 4, "lora_alpha": 8.0, "time_budget_minutes": None,
               "sft_prompts_per_task": 2, "sft_steps": 2, "sft_batch": 2}

CPU_ACCELERATE_CONFIG = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_CPU",
                         "mixed_precision": "no", "num_machines": 1, "machine_rank": 0, "use_cpu": True,
                         "main_training_function": "main", "rdzv_backend": "static", "same_network": True}


def build_standins(directory: Path) -> dict[str, str]:
    """Write the tiny SD3 pipeline and the tiny PickScore into `directory`; returns their paths."""
    from .models.sd3 import tiny_sd3_pipeline

    paths = {"base": directory / "tiny_sd3", "pickscore_model": directory / "tiny_pickscore",
             "pickscore_processor": directory / "tiny_pickscore_processor"}
    tiny_sd3_pipeline().save_pretrained(paths["base"])
    model, processor = tiny_clip()
    model.save_pretrained(paths["pickscore_model"])
    processor.save_pretrained(paths["pickscore_processor"])
    return {k: str(v) for k, v in paths.items()}


def accelerate_config(directory: Path, num_processes: int) -> str:
    """An accelerate config file marking the stages' processes as CPU ranks (train.launch reads it)."""
    path = directory / "accelerate_cpu.yaml"
    path.write_text(yaml.safe_dump({**CPU_ACCELERATE_CONFIG, "num_processes": num_processes}))
    return str(path)


def dry_run(spec_path: str | Path, num_processes: int = 2, outputs: Path = runs.OUTPUTS,
            parameters: dict | None = None, only: list[str] | None = None) -> Path:
    """Run every stage of the spec (or those in `only`) with stand-ins and tiny budgets, `parameters`
    overriding the spec's as the runner's -p does (e.g. {"trainer": "nft"}); returns the run directory."""
    spec = runs.load_spec(spec_path)
    with tempfile.TemporaryDirectory(prefix="flowopd_dryrun_") as tmp, toy_reward_servers() as urls:
        tmp = Path(tmp)
        standins = build_standins(tmp)
        overrides = {**TINY_BUDGET, "base": standins["base"], "prompt_root": str(PROMPT_DIR),
                     "num_processes": num_processes,
                     "accelerate_config": accelerate_config(tmp, num_processes) if num_processes > 1 else None,
                     **(parameters or {})}
        environment = {GENEVAL_URL_ENV: urls["geneval"], DEQA_URL_ENV: urls["deqa"],
                       MODEL_ENV: standins["pickscore_model"], PROCESSOR_ENV: standins["pickscore_processor"]}
        with mock.patch.dict(os.environ, environment):  # inherited by the notebook kernels and their jobs
            dry_spec = outputs / f"{spec['name']}_dryrun.yaml"
            shutil.rmtree(outputs / f"{spec['name']}_dryrun", ignore_errors=True)  # fresh: no stage resumes
            outputs.mkdir(parents=True, exist_ok=True)
            dry_spec.write_text(yaml.safe_dump({**spec, "name": f"{spec['name']}_dryrun"}, sort_keys=False))
            return runs.run(dry_spec, only=only or [s["name"] for s in spec["stages"]], overrides=overrides,
                            outputs=outputs)


@cli.entry
def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("spec", help="a full-scale run spec, e.g. papermill_runs/sd35m.yaml")
    parser.add_argument("--processes", type=cli.count, default=2,
                        help="CPU ranks per training stage (torch.distributed.run); 1 trains in the notebook")
    parser.add_argument("-p", "--parameter", action="append", default=[], metavar="key=value",
                        help="override a spec parameter as the runner's -p does (e.g. -p trainer=nft)")
    parser.add_argument("--only", nargs="+", help="run only these stages (default: all)")
    args = parser.parse_args(argv)
    parameters = dict(runs.parse_override(item) for item in args.parameter)
    stages = [s["name"] for s in runs.load_spec(args.spec)["stages"]]  # before the stand-ins and the outputs
    unknown = [name for name in args.only or [] if name not in stages]
    if unknown:
        raise cli.UserError(f"--only {unknown}: no such stage in {args.spec}; its stages: {stages}")
    start = time.time()
    try:
        run_dir = dry_run(args.spec, args.processes, parameters=parameters, only=args.only)
    except runs.UsageError:
        raise  # cli.entry: one line, exit status 2
    except runs.RunError as error:
        raise SystemExit(f"dry run failed: {error}") from None
    print(f"dry run of {args.spec} finished in {(time.time() - start) / 60:.1f} min; outputs in {run_dir}")


if __name__ == "__main__":
    main()

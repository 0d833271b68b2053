"""One rank of a trainer run, for the tests that start real gloo ranks (torch.distributed.run).

    python -m torch.distributed.run --standalone --nproc_per_node N tests/rank_worker.py SPEC.json

SPEC.json: {"trainer": grpo|nft|awm|opd, "model": "toy_tiny"|"tiny_sd3", "config": {...fields...},
"report": dir, "evaluate": bool (evaluate with the config's eval_* protocol, sharded over the ranks)}. Each rank writes report/rank{r}.json (its world, metrics of the last update) and
report/initial{r}.pt (its adapter before training: the initial one in a fresh run).
With one process (plain `python`) it is the single-process reference the ranks are compared with.
The rewards registered here are deterministic functions of the images, so ranks and one process agree.
"""
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from flowopd_lib import rewards, train  # noqa: E402


def brightness(images, prompts):
    """Mean brightness, also as GenEval's per-image correctness (continuous, so a misplaced sample shows)."""
    value = images.float().mean(dim=(1, 2, 3))
    return {"reward": value, "strict": value}


def constant_on_ocr(images, prompts):
    """Brightness, except OCR prompts all score 0.5: a rank holding only OCR groups has no signal."""
    value = images.float().mean(dim=(1, 2, 3))
    ocr = torch.tensor([p.task == "ocr" for p in prompts])
    return {"reward": torch.where(ocr, torch.full_like(value, 0.5), value)}


rewards.register("test_brightness", brightness)
rewards.register("test_constant_on_ocr", constant_on_ocr)


def build_model(kind: str):
    if kind == "toy_tiny":
        from tiny import tiny_model
        return tiny_model()
    from flowopd_lib.models import SD3FlowModel, tiny_sd3_pipeline
    return SD3FlowModel.from_pipeline(tiny_sd3_pipeline())


def trainer_class(stage: str):
    from flowopd_lib.awm import AWMTrainer
    from flowopd_lib.grpo import GRPOTrainer
    from flowopd_lib.nft import NFTTrainer
    from flowopd_lib.opd import OPDTrainer
    return {"grpo": GRPOTrainer, "nft": NFTTrainer, "awm": AWMTrainer, "opd": OPDTrainer}[stage]


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    config_cls, _ = train.trainer_for(spec["trainer"])
    cfg = config_cls.from_dict(spec["config"])
    rank = int(os.environ.get("RANK", 0))
    torch.manual_seed(1000 + rank)  # each rank's global RNG differs, as on real nodes
    from flowopd_lib.distributed_eval import evaluator

    eval_fn = evaluator(cfg) if spec.get("evaluate") else None  # as `python -m flowopd_lib.train` does
    trainer = trainer_class(spec["trainer"])(build_model(spec["model"]), cfg, eval_fn=eval_fn)
    report = Path(spec["report"])
    report.mkdir(parents=True, exist_ok=True)
    from flowopd_lib import adapters
    torch.save(adapters.state_dict(trainer.model, cfg.adapter), report / f"initial{trainer.acc.process_index}.pt")
    metrics = trainer.train()
    (report / f"rank{trainer.acc.process_index}.json").write_text(json.dumps(
        {"rank": trainer.acc.process_index, "world": trainer.acc.num_processes, "update": trainer.update,
         "metrics": metrics}))


if __name__ == "__main__":
    main(sys.argv[1])

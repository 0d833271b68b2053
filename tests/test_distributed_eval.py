"""Evaluation shared over processes (distributed_eval), subset generation (rollout), test-set sizes (data).

The sharded evaluation runs on real gloo ranks (torch.distributed.run, as `train.launch` starts
CPU ranks) and must give `evaluation.sample_scores`' per-sample scores exactly, with uneven
shares and with ranks that get no work."""
from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch

from flowopd_lib import adapters, data, evaluation, flow, models, rewards, rollout, train
from flowopd_lib.distributed_eval import (EvalConfig, EvalJob, evaluate_on_ranks, job_from, launch_eval,
                                          metrics_from_scores, read_scores, shard, work_plan)
from flowopd_lib.toy.splits import PROMPT_DIR
from tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]
RANK_ENV = {"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "TORCH_DISTRIBUTED_DEBUG": "DETAIL"}
RANKS_TIMEOUT = 300  # seconds: a hung collective fails the test instead of blocking the suite


def brightness_as_correctness(images, prompts):
    """A GenEval-shaped scorer with continuous, per-image values (tiny random models get every toy
    GenEval and OCR sample wrong, and all-zero scores would hide a misplaced sample)."""
    brightness = images.mean(dim=(1, 2, 3))
    return {"reward": brightness, "strict": brightness}


BRIGHTNESS = "test_brightness_as_geneval"
rewards.register(BRIGHTNESS, brightness_as_correctness, tasks=("geneval",))


def texts(task: str, n: int) -> list[str]:
    return [p.text for p in data.prompts(task, n, "test", 0)]


@pytest.fixture
def one_thread():
    """As the launched ranks run (OMP_NUM_THREADS=1): compare process counts, not thread counts."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- rollout.generate

def former_generate(model, prompts, steps=20, cfg_scale=1.0, seed=0, shift=1.0, batch_size=128):
    """rollout.generate as it was before subsets and the default batch (ODE), verbatim."""
    sigmas = flow.sigma_schedule(steps, shift).to(model.device)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(prompts), *model.latent_shape, generator=g).to(model.device)
    outputs = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        cond = model.encode_prompts(chunk)
        uncond = model.encode_prompts([""] * len(chunk)) if cfg_scale != 1.0 else None
        velocity_fn = lambda x, s: rollout.guided_velocity(model, x, s, cond, uncond, cfg_scale)  # noqa: E731
        latents = flow.sample(velocity_fn, noise[start:start + len(chunk)], sigmas, 0.0, None)
        outputs.append(model.decode(latents))
    return torch.cat(outputs)


def test_generate_on_the_shipped_toy_model_is_bit_identical_to_the_former_one():
    """The toy study's numbers must not move: same default batch (128 toy images), same noise."""
    model = models.load_base("toy")
    prompts = texts("ocr", 150)  # two batches of the former default
    assert rollout.default_batch_size(model) == 128
    assert torch.equal(rollout.generate(model, prompts, steps=3, cfg_scale=3.0, seed=7),
                       former_generate(model, prompts, steps=3, cfg_scale=3.0, seed=7))


def test_default_batch_is_small_for_sd35m_latents():
    """128 SD3.5-M latents at 512 px at once (a CFG batch of 256 + 128 fp32 VAE decodes) ran out of memory."""
    sd35m_512px = type("Shape", (), {"latent_shape": (16, 64, 64)})()
    sd35m_1024px = type("Shape", (), {"latent_shape": (16, 128, 128)})()
    assert rollout.default_batch_size(sd35m_512px) == 16 and rollout.default_batch_size(sd35m_1024px) == 4


def test_batch_size_keeps_the_noise_and_the_images_up_to_rounding():
    """(b) batch 2 vs 128: the same noise, so the same images up to float rounding (CPU kernels
    block a batch of 2 differently from one of 9, so the last bits can differ: ~6e-7 here)."""
    model = tiny_model()
    prompts = texts("ocr", 9)
    small = rollout.generate(model, prompts, steps=3, cfg_scale=3.0, seed=1, batch_size=2)
    large = rollout.generate(model, prompts, steps=3, cfg_scale=3.0, seed=1, batch_size=128)
    torch.testing.assert_close(small, large, atol=1e-5, rtol=0)
    one = rollout.generate(model, prompts[:1], steps=3, cfg_scale=3.0, seed=1, batch_size=2)
    torch.testing.assert_close(one, large[:1], atol=1e-5, rtol=0)


def test_a_subset_gets_the_noise_and_images_of_the_whole_call():
    """(c) indices= makes samples of a bigger call from that call's noise: bit-identical images for
    subsets made of its batches, equal up to rounding otherwise; initial noise always bit-identical."""
    model = tiny_model()
    prompts = texts("ocr", 10)
    full = rollout.generate(model, prompts, steps=3, cfg_scale=3.0, seed=4, batch_size=4)
    whole_batches = [4, 5, 6, 7, 8, 9]  # the whole call's batches [4, 8) and [8, 10)
    part = rollout.generate(model, [prompts[i] for i in whole_batches], steps=3, cfg_scale=3.0, seed=4,
                            batch_size=4, indices=whole_batches, total=10)
    assert torch.equal(part, full[whole_batches])
    scattered = [9, 2, 3, 0]
    part = rollout.generate(model, [prompts[i] for i in scattered], steps=3, cfg_scale=3.0, seed=4,
                            batch_size=4, indices=scattered, total=10)
    torch.testing.assert_close(part, full[scattered], atol=1e-5, rtol=0)
    assert torch.equal(rollout.initial_noise(model, 10, 4, scattered), rollout.initial_noise(model, 10, 4)[scattered])


def test_subset_noise_is_exact_for_any_latent_size():
    """torch's CPU sampler redraws the last 16 values of a tensor whose size is not a multiple of
    16, so a short draw is not a prefix of a long one: such latents draw all `total` rows."""
    odd = type("Odd", (), {"latent_shape": (3, 5, 5), "device": torch.device("cpu")})()
    full = rollout.initial_noise(odd, 9, 3)
    assert not torch.equal(rollout.initial_noise(odd, 4, 3), full[:4])  # why the whole draw is needed
    assert torch.equal(rollout.initial_noise(odd, 9, 3, [1, 3, 8]), full[[1, 3, 8]])
    assert torch.equal(rollout.initial_noise(odd, 9, 3, [2]), full[[2]])


def test_subsets_refuse_the_sde_and_missing_sizes():
    model = tiny_model()
    with pytest.raises(ValueError, match="SDE"):
        rollout.generate(model, texts("ocr", 2), steps=2, noise_level=0.7, indices=[0, 1], total=4)
    with pytest.raises(ValueError, match="total"):
        rollout.generate(model, texts("ocr", 2), steps=2, indices=[0, 1])


# ----------------------------------------------------------------------------- test-set sizes

def test_a_full_scale_test_set_is_never_cycled(tmp_path):
    """(d) Flow-GRPO's layout at a root: more test prompts than the file holds is an error naming
    the file, its size and the fix; the whole file once is fine; training prompts still cycle."""
    with pytest.raises(data.TestSetTooSmall, match=r"ocr/test.txt holds 400 test prompts .* 401 were asked.*"
                                                   r"eval_prompts: \{ocr: 400\}"):
        data.prompts("ocr", 401, "test", 0, PROMPT_DIR)
    every = data.prompts("ocr", 400, "test", 0, PROMPT_DIR)
    assert len({p.text for p in every}) == 400
    assert len(data.prompts("ocr", 1500, "train", 0, PROMPT_DIR)) == 1500
    with pytest.raises(data.TestSetTooSmall, match="geneval/test_metadata.jsonl holds 90"):
        data.prompts("geneval", 91, "test", 0, PROMPT_DIR)


def test_the_toy_test_sets_refuse_cycling_except_geneval_by_design():
    """The toy GenEval draw repeats its small tags' prompts by design (equal weight per category;
    notebook 01 asks 180); the other toy test files are never cycled, and nothing asks them to."""
    with pytest.raises(data.TestSetTooSmall, match="pickscore/test.txt holds 200"):
        data.prompts("deqa", 201, "test", 0)
    assert len(data.prompts("geneval", 180, "test", 0)) == 180
    assert data.prompts("ocr", 90, "test", 3) == data.prompts("ocr", 90, "test", 3)


def test_an_eval_prompt_file_is_never_cycled(tmp_path):
    drawbench = tmp_path / "drawbench.txt"
    drawbench.write_text("a red car\na cat on a mat\na tall tree\n")
    cfg = EvalConfig(eval_prompt_files={"deqa": str(drawbench)}, eval_prompts=4, eval_tasks=("deqa",))
    with pytest.raises(data.TestSetTooSmall, match="drawbench.txt holds 3"):
        evaluate_on_ranks(tiny_model(), cfg)


# ----------------------------------------------------------------------------- the work and its shares

def test_shards_are_contiguous_uneven_and_may_be_empty():
    assert [shard(7, 3, r) for r in range(3)] == [range(0, 3), range(3, 5), range(5, 7)]
    assert [len(shard(2, 4, r)) for r in range(4)] == [1, 1, 0, 0]
    for n, p in ((0, 2), (5, 5), (13, 4)):
        covered = [i for r in range(p) for i in shard(n, p, r)]
        assert covered == list(range(n))


def test_work_batches_are_the_whole_calls_batches():
    plan = work_plan({"geneval": 5, "ocr": 2}, {"geneval": 2, "ocr": 1}, batch_size=2)
    assert [(b.task, b.sample, b.start, b.stop) for b in plan] == [
        ("geneval", 0, 0, 2), ("geneval", 0, 2, 4), ("geneval", 0, 4, 5),
        ("geneval", 1, 0, 2), ("geneval", 1, 2, 4), ("geneval", 1, 4, 5), ("ocr", 0, 0, 2)]


# ----------------------------------------------------------------------------- real ranks

WORKER = """
import json, os, sys
sys.path.insert(0, {tests!r})
import torch
from accelerate import Accelerator
from flowopd_lib import rewards
from flowopd_lib.distributed_eval import EvalConfig, evaluate_on_ranks, shard, work_plan
from tiny import tiny_model
from test_distributed_eval import TASK_REWARDS

acc = Accelerator()
rank = acc.process_index
out = {out!r}
model = tiny_model()
report = {{"rank": rank, "world": acc.num_processes, "shares": {{}}}}
for name, settings in json.loads({scenarios!r}).items():
    cfg = EvalConfig(**settings)
    scores = evaluate_on_ranks(model, cfg, acc, seed=5, task_rewards=TASK_REWARDS, name="tiny")
    scores.to_csv(os.path.join(out, f"{{name}}.rank{{rank}}.csv"), index=False)
    tasks = cfg.eval_tasks
    plan = work_plan({{t: cfg.prompts_for(t) for t in tasks}}, {{t: cfg.samples_for(t) for t in tasks}}, cfg.eval_batch_size)
    report["shares"][name] = len(shard(len(plan), acc.num_processes, rank))

def flaky(images, prompts):  # fails on one rank only: the others must not hang in the gather
    if rank == 1:
        raise OSError("the reward server went away")
    return rewards.score("ocr", images, prompts)

rewards.register("flaky", flaky)
try:
    evaluate_on_ranks(model, EvalConfig(eval_tasks=("ocr",), eval_prompts=3, eval_steps=2, eval_batch_size=1), acc,
                      task_rewards={{"ocr": "flaky"}})
    report["failure"] = None
except RuntimeError as error:
    report["failure"] = str(error)
with open(os.path.join(out, f"report.rank{{rank}}.json"), "w") as f:
    json.dump(report, f)
"""

TASK_REWARDS = {"geneval": BRIGHTNESS}
SCENARIOS = {
    # 2 geneval prompts x 2 samples + 3 deqa prompts = 7 batches of 1 on 3 ranks: shares 3, 2, 2
    "uneven": dict(eval_tasks=["geneval", "deqa"], eval_prompts={"geneval": 2, "deqa": 3}, eval_samples={"geneval": 2},
                   eval_steps=3, eval_cfg=3.0, eval_batch_size=1),
    # one batch of 3 prompts on 3 ranks: two ranks have nothing and still join the gather
    "idle_ranks": dict(eval_tasks=["pickscore"], eval_prompts=3, eval_steps=3, eval_cfg=3.0, eval_batch_size=4),
}


def single_process_scores(settings: dict) -> pd.DataFrame:
    """`evaluation.sample_scores` of the same protocol, a task at a time (samples differ per task)."""
    cfg = EvalConfig(**settings)
    model = tiny_model()
    return pd.concat([evaluation.sample_scores({"tiny": model}, tasks=(task,), n_prompts=cfg.prompts_for(task),
                                               samples_per_prompt=cfg.samples_for(task), steps=cfg.eval_steps,
                                               cfg_scale=cfg.eval_cfg, seed=5, batch_size=cfg.eval_batch_size,
                                               reward_for_task=TASK_REWARDS)
                      for task in cfg.eval_tasks], ignore_index=True)


def test_sharded_evaluation_on_gloo_ranks_equals_one_process(tmp_path, one_thread):
    """(a) 3 real ranks: uneven shares (7 batches) and idle ranks (1 batch) give exactly
    sample_scores' per-sample scores on every rank; a failure on one rank raises on all three."""
    script = tmp_path / "eval_worker.py"
    script.write_text(WORKER.format(tests=str(ROOT / "tests"), out=str(tmp_path), scenarios=json.dumps(SCENARIOS)))
    command, env = train.cpu_ranks_command(3, [str(script)])
    proc = subprocess.run(command, env={**env, **RANK_ENV}, capture_output=True, text=True, timeout=RANKS_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads((tmp_path / f"report.rank{r}.json").read_text()) for r in range(3)]
    assert [(r["rank"], r["world"]) for r in reports] == [(0, 3), (1, 3), (2, 3)]
    assert [[r["shares"][name] for r in reports] for name in SCENARIOS] == [[3, 2, 2], [1, 0, 0]]
    for name, settings in SCENARIOS.items():
        expected = single_process_scores(settings)
        assert expected["value"].nunique() > len(expected) // 2  # continuous scores: a misplaced sample shows
        for rank in range(3):
            got = read_scores(tmp_path / f"{name}.rank{rank}.csv")
            pd.testing.assert_frame_equal(got, expected, check_exact=True, check_dtype=False)
    for r in reports:  # every rank raised, naming the failing one and its error
        assert r["failure"] and "process(es) 1" in r["failure"] and "the reward server went away" in r["failure"]


def test_one_process_evaluation_equals_sample_scores():
    """Without an accelerator (a notebook): the same table as sample_scores, here with batches of 2."""
    settings = dict(eval_tasks=["geneval", "deqa"], eval_prompts=3, eval_samples=2, eval_steps=2, eval_batch_size=2)
    got = evaluate_on_ranks(tiny_model(), EvalConfig(**settings), seed=5, task_rewards=TASK_REWARDS, name="tiny")
    pd.testing.assert_frame_equal(got, single_process_scores(settings), check_exact=True)


def test_cli_on_two_cpu_ranks_writes_the_scores_of_an_adapter(tmp_path, one_thread, monkeypatch):
    """launch_eval -> torch.distributed.run -> `python -m flowopd_lib.distributed_eval ADAPTER job.yaml
    --out scores.csv` on 2 ranks (3 batches: shares 2 and 1) = sample_scores of the adapter."""
    base = tiny_model()
    base.save(tmp_path / "base")
    adapters.add(base, "student", rank=2, alpha=2.0, seed=3)
    with torch.no_grad():
        for p in adapters.parameters(base, "student"):
            p.normal_(0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
    adapters.save(base, "student", tmp_path / "adapter")
    # deqa: continuous scores, judged image by image (so exact whatever the batches)
    job = EvalJob(base=str(tmp_path / "base"), seed=2, eval_tasks=("deqa",), eval_prompts=5, eval_steps=2,
                  eval_batch_size=2)
    for key, value in RANK_ENV.items():
        monkeypatch.setenv(key, value)
    got = launch_eval(tmp_path / "adapter", job, tmp_path / "out" / "scores.csv", num_processes=2, name="student")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["scores.csv", "scores.csv.job.yaml"]
    protocol = dict(tasks=("deqa",), n_prompts=5, steps=2, seed=2, batch_size=2)
    expected = evaluation.sample_scores({"student": adapters.view(base, "student")}, **protocol)
    pd.testing.assert_frame_equal(got, expected, check_exact=True, check_dtype=False)
    plain = evaluation.sample_scores({"student": adapters.view(base, None)}, **protocol)
    assert not got["value"].equals(plain["value"])  # the adapter was loaded and used


# ----------------------------------------------------------------------------- metrics

def test_metrics_from_scores_are_the_evaluate_table(one_thread):
    model = tiny_model()
    protocol = dict(tasks=("geneval", "ocr", "pickscore", "deqa"), n_prompts=12, steps=2, seed=1)
    table = evaluation.evaluate({"m": model}, **protocol)
    metrics = metrics_from_scores(evaluation.sample_scores({"m": model}, **protocol))
    row = table.loc["m"].dropna().to_dict()
    row.pop("geneval_partial")
    assert set(metrics) == set(row) and list(metrics)[:6] == ["geneval", "ocr", "pickscore", "pickscore_true",
                                                             "deqa", "Avg"]
    for key, value in row.items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key


def test_geneval_uses_genevals_correctness_from_the_server(monkeypatch):
    """Flow-GRPO's GenEval server: "strict_rewards" needs exact counts, "rewards" is GenEval's own
    `correct`, computed only when asked with only_strict=False. Evaluation asks for it and uses it."""
    requests = []

    def post(self, request):
        requests.append(request)
        n = len(request["images"])
        return {"scores": [0.5] * n, "strict_rewards": [0.0] * n,
                "rewards": [1.0 if request["only_strict"] is False else 0.0] * n}

    monkeypatch.setattr(rewards.real.GenEvalServer, "post", post)
    monkeypatch.setitem(rewards._REGISTRY, "geneval_server", rewards.real.GenEvalServer(url="http://nowhere"))
    prompts = data.prompts("geneval", 6, "test", 0)
    images = torch.rand(6, 3, 8, 8)
    values = evaluation.sample_values("geneval", prompts, images, "geneval_server")["geneval"]
    assert values.tolist() == [1.0] * 6 and requests[-1]["only_strict"] is False
    assert evaluation.success("geneval", prompts, images, "geneval_server").all()
    assert evaluation.task_metrics("geneval", prompts, images, "geneval_server")["geneval"] == 1.0
    assert rewards._REGISTRY["geneval_server"].only_strict  # training still gets the strict/partial reward


# ----------------------------------------------------------------------------- config

def test_eval_config_validates_and_holds_the_full_scale_protocol(tmp_path):
    cfg = EvalConfig(eval_prompts={"geneval": 553, "ocr": 1018, "pickscore": 2048, "deqa": 200},
                     eval_samples={"geneval": 4}, eval_steps=40, eval_cfg=4.5)
    assert (cfg.prompts_for("geneval"), cfg.samples_for("geneval"), cfg.samples_for("ocr")) == (553, 4, 1)
    cfg.to_yaml(tmp_path / "eval.yaml")
    assert EvalConfig.from_yaml(tmp_path / "eval.yaml") == cfg
    for bad, match in ((dict(eval_prompts={"gen": 3}), "unknown"), (dict(eval_samples=0), ">= 1"),
                       (dict(eval_tasks=["ocr", "ocr"]), "once"), (dict(eval_batch_size=0), "out of range")):
        with pytest.raises(Exception, match=match):
            EvalConfig(**bad)
    with pytest.raises(Exception, match="no count for task 'deqa'"):
        EvalConfig(eval_prompts={"ocr": 3}).prompts_for("deqa")


def test_a_trainer_config_deriving_from_eval_config_builds_and_launches_a_job():
    """OnPolicyConfig will derive from EvalConfig: no field may clash, every field has a default,
    and its eval settings, seed and prompts travel to the CLI's job (eval_tasks None: its datasets)."""
    from flowopd_lib.trainer import OnPolicyConfig

    @dataclasses.dataclass
    class Trainer(OnPolicyConfig, EvalConfig):
        pass

    eval_fields = {f.name for f in dataclasses.fields(EvalConfig)}
    declared = {name for c in OnPolicyConfig.__mro__ if c not in EvalConfig.__mro__
                for name in vars(c).get("__annotations__", {})}  # what the trainer's classes declare themselves
    assert not declared & eval_fields
    cfg = Trainer(seed=42, shift=3.0, datasets={"ocr": 1.0, "pickscore": 1.0}, eval_prompts={"ocr": 9, "pickscore": 9},
                  eval_steps=40)
    job = job_from(cfg)
    assert (job.seed, job.shift, job.eval_steps, job.eval_tasks) == (42, 3.0, 40, ("ocr", "pickscore"))
    assert job.task_rewards == cfg.task_rewards


def test_launched_scores_are_cached_per_adapter_weights_and_job(tmp_path, monkeypatch):
    """The notebooks' launched evaluations share the runner's cache: the base and a teacher are
    generated once per run; other weights or another protocol are generated anew."""
    from flowopd_lib import distributed_eval

    calls = []

    def fake_launch(adapter, config, out, num_processes=1, accelerate_config=None, name=None):
        calls.append(adapter)
        return pd.DataFrame({"model": [name], "metric": ["ocr"], "prompt": [0], "sample": [0], "stratum": ["ocr"],
                             "value": [float(len(calls))]})

    monkeypatch.setattr(distributed_eval, "launch_eval", fake_launch)
    adapter = tmp_path / "a"
    adapter.mkdir()
    (adapter / "pytorch_lora_weights.safetensors").write_bytes(b"weights v1")
    job = {"base": "toy", "eval_prompts": 2}
    first = distributed_eval.launched_scores({"base": None, "t": adapter}, job, tmp_path / "s", cache_dir=tmp_path / "c")
    again = distributed_eval.launched_scores({"the base": None, "t": adapter}, job, tmp_path / "s", cache_dir=tmp_path / "c")
    assert len(calls) == 2 and list(again["value"]) == list(first["value"])
    assert list(again["model"]) == ["the base", "t"]  # read back under the names asked for
    (adapter / "pytorch_lora_weights.safetensors").write_bytes(b"weights v2")
    distributed_eval.launched_scores({"t": adapter}, job, tmp_path / "s", cache_dir=tmp_path / "c")
    distributed_eval.launched_scores({"base": None}, {**job, "eval_steps": 3}, tmp_path / "s", cache_dir=tmp_path / "c")
    assert len(calls) == 4


@pytest.mark.parametrize("label", ["None", "NA", "nan", "base"])
def test_freshly_launched_scores_keep_every_row_name(tmp_path, monkeypatch, label):
    """Notebook 05 names the base's row "None" (str of its directory, None). Read back from the job's
    CSV, pandas took "None" for a missing value: the base's scores lost their name, and the main table
    failed (KeyError) on a first run; only a cached evaluation, renamed on reading, had worked."""
    from flowopd_lib import distributed_eval

    def fake_job(command, check, env):  # what `python -m flowopd_lib.distributed_eval ... --out O --name N` writes
        out, name = command[command.index("--out") + 1], command[command.index("--name") + 1]
        pd.DataFrame({"model": [name], "metric": ["ocr"], "prompt": [0], "sample": [0], "stratum": ["ocr"],
                      "value": [0.5]}).to_csv(out, index=False)

    monkeypatch.setattr(distributed_eval.subprocess, "run", fake_job)
    scores = distributed_eval.launched_scores({label: None}, {"base": "toy", "eval_prompts": 2}, tmp_path / "s")
    assert list(scores["model"]) == [label]

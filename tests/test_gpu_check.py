"""The prepared GPU check (flowopd_lib/diagnostics/gpu_check.py), run as its CPU variant.

`--tiny` runs the same phases through the same trainer code as the GPU run (a narrow 2-layer MMDiT
at 32 px): every row of the table must be there, the trained state float32 on a bf16 base, and a
checkpoint written from CPU tensors resumed through the trainer's own loading path. The parts that
decide a GPU run's outcome without a GPU (shapes, the device and dtype checks, the cost table)
are tested on their own."""
import json
import types

import pytest
import torch

from flowopd_lib.diagnostics import gpu_check
from flowopd_lib.models import SD3_MAX_SEQUENCE_LENGTH

ROWS = ("model", "adapters.add alone on the bf16 base", "rollout chunk", "VAE decode", "training micro-batch",
        "trained dtypes", "PPO ratio", "labelling, reference", "labelling, a teacher LoRA",
        "time per sample-forward at batch 8", "time per sample-forward at batch 24", "checkpoint saved on the CPU",
        "rollout.generate at the evaluation batch")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    code = gpu_check.main(["--tiny", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    return code, (out / "table.md").read_text(), results


def row(results, prefix):
    found = [r for r in results["rows"] if r["check"].startswith(prefix)]
    assert found, f"no row {prefix!r} in {[r['check'] for r in results['rows']]}"
    return found[0]


def test_the_cpu_variant_has_every_row_and_no_failure(tiny_run):
    code, table, results = tiny_run
    failed = [(r["check"], r["measured"]) for r in results["rows"] if r["status"] == "FAIL"]
    assert code == 0 and results["passed"] and not failed, failed
    for prefix in ROWS:
        row(results, prefix)
        assert f"| {prefix}" in table
    for key in ("device", "date", "commit"):
        assert f"- {key}: " in table and results[key]
    assert results["device"].startswith("CPU") and "n/a (CPU)" in table  # no invented memory numbers
    assert "estimate per process" in table and results["estimate"]["samples_per_process"] == 12


def test_trained_state_is_float32_on_the_bf16_base(tiny_run):
    """Parameters, their gradients after a backward, AdamW state and EMA shadow: all float32."""
    _, _, results = tiny_run
    dtypes = row(results, "trained dtypes")
    assert dtypes["status"] == "PASS" and dtypes["measured"] == "all float32", dtypes
    assert results["numbers"]["dtype_problems"] == []
    assert "bfloat16" in row(results, "model")["measured"]  # the base really is bf16


def test_a_cpu_checkpoint_resumes_through_the_trainer(tiny_run):
    _, _, results = tiny_run
    resumed = row(results, "checkpoint saved on the CPU")
    assert resumed["status"] == "PASS" and results["numbers"]["resume_problems"] == [], resumed


def test_the_ppo_ratio_is_reported_per_sample_and_step(tiny_run):
    _, _, results = tiny_run
    devs = results["numbers"]["ratio_dev"]
    spec = gpu_check.Spec.tiny()
    trained = round(spec.sde_steps * 0.9)
    assert len(devs) == spec.micro_batch * trained and all(d >= 0 for d in devs)
    assert "beyond 0.0001" in row(results, "PPO ratio")["measured"]


def test_the_full_spec_is_sd35m_yaml_per_gpu():
    spec = gpu_check.Spec.full()
    assert (spec.samples, spec.chunk, spec.micro_batch, spec.resolution) == (144, 12, 4, 512)
    assert spec.time_batches == (8, 24) and spec.cfg_scale == 4.5 and spec.t5_tokens == SD3_MAX_SEQUENCE_LENGTH == 128
    shape = spec.transformer
    assert shape["num_layers"] == 24 and shape["num_attention_heads"] * shape["attention_head_dim"] == 1536
    assert shape["dual_attention_layers"] == tuple(range(13)) and shape["qk_norm"] == "rms_norm"
    assert (shape["joint_attention_dim"], shape["pooled_projection_dim"], shape["pos_embed_max_size"]) == (4096, 2048, 384)
    assert gpu_check.SD3_VAE["block_out_channels"] == (128, 256, 512, 512) and gpu_check.SD3_VAE["latent_channels"] == 16
    fewer = spec.with_layers(4).with_resolution(256)
    assert fewer.transformer["dual_attention_layers"] == (0, 1, 2, 3) and fewer.transformer["sample_size"] == 32


def fake_trainer(param, grad=True, adam_dtype=torch.float32, ema_device="cpu"):
    if grad:
        param.grad = torch.zeros_like(param)
    state = {param: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(param.shape, dtype=adam_dtype)}}
    ema = types.SimpleNamespace(shadow_params=[torch.zeros(param.shape, device=ema_device)])
    return types.SimpleNamespace(param_names=["w"], params=[param], opt=types.SimpleNamespace(state=state), ema=ema)


def test_dtype_check_names_every_non_float32_tensor():
    assert gpu_check.trainable_dtype_problems(fake_trainer(torch.nn.Parameter(torch.zeros(2)))) == []
    bad = gpu_check.trainable_dtype_problems(fake_trainer(torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16)),
                                                          adam_dtype=torch.bfloat16))
    assert any("w (torch.bfloat16)" in p for p in bad) and any("AdamW exp_avg" in p for p in bad)
    missing = gpu_check.trainable_dtype_problems(fake_trainer(torch.nn.Parameter(torch.zeros(2)), grad=False))
    assert missing == ["w.grad is missing"]


def test_device_check_finds_state_left_on_another_device():
    """The GPU case without a GPU: everything on the CPU, the check asking for another device."""
    trainer = fake_trainer(torch.nn.Parameter(torch.zeros(2)))
    assert gpu_check.misplaced_tensors(trainer, torch.device("cpu")) == []
    elsewhere = gpu_check.misplaced_tensors(trainer, torch.device("meta"))
    assert {p.split(" on ")[0] for p in elsewhere} == {"w", "AdamW exp_avg of w", "EMA shadow of w"}  # not `step`
    copied = gpu_check.on_cpu({"a": [torch.zeros(1, requires_grad=True)], "b": (torch.ones(1), 1)})
    assert copied["a"][0].device.type == "cpu" and not copied["a"][0].requires_grad and copied["b"][1] == 1


def test_forward_flops_of_one_dense_block():
    """One block, width 2, 3 image + 1 text tokens, no dual attention: 2 x 24 x 4 + 4 x 16 x 2."""
    shape = dict(num_attention_heads=1, attention_head_dim=2, num_layers=1, dual_attention_layers=())
    assert gpu_check.forward_flops(shape, 3, 1) == 2 * (4 * 4 + 2 * 2 * 8) * 4 + 4 * 4 ** 2 * 2
    full = gpu_check.forward_flops(gpu_check.SD35M_TRANSFORMER, 1024, 77 + 128)
    assert 2.1e12 < full < 2.4e12  # ~2.2 TFLOP per sample-forward at 512 px


@pytest.fixture(scope="module")
def costs():
    """SD3.5-M on the meta device at sd35m.yaml's settings (a few seconds to build; shared)."""
    return gpu_check.CostModel()


def test_cost_table_has_every_stage_of_the_spec(tmp_path):
    """Every stage of a spec gets a row; labelling forwards per sample come from the trainers; each
    model is evaluated once per evaluation job (the run's cache), the trained adapters also in training."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(gpu_check.SD35M_YAML.read_text().split("\nstages:")[0] + """
stages:
  - {name: teacher, notebook: notebooks/02_teacher_grpo.ipynb,
     parameters: {rewards: {pickscore_v1: 1.0}, datasets: {pickscore: 1.0}, beta: 0.01}}
  - {name: merges, notebook: notebooks/03_cold_start.ipynb, parameters: {merge_methods: [delta, factor], sft: false}}
  - {name: opd, notebook: notebooks/04_flow_opd.ipynb,
     parameters: {teachers: {pickscore: t}, datasets: {pickscore: 1}, mar_lambda: 0.02, anchor: t}}
  - {name: opd_no_mar, notebook: notebooks/04_flow_opd.ipynb,
     parameters: {teachers: {pickscore: t}, datasets: {pickscore: 1}, mar_lambda: 0.0}}
  - {name: summary, notebook: notebooks/05_ablations.ipynb, parameters: {main: {base: null, merged: "{merges}/merge_delta"}}}
""")
    table = gpu_check.cost_tables(spec_path=spec)
    assert "| teacher | grpo | 9 | 13,248 |" in table  # 144 samples x CFG 2 x (10 + 9 + 3 x 9)
    assert "| opd | opd | 18 | 15,840 |" in table and "| opd_no_mar | opd | 9 | 13,248 |" in table
    every = float(table.split("CFG 2 = ")[1].split(" GPU-h")[0])  # one adapter on every task
    merges = table.split("| merges |")[1].splitlines()[0]
    assert f"| 3 (every task) | {3 * every:.1f} | {3 * every:.1f} |" in merges  # base + 2 merges, no SFT
    assert "| 20 + 2 (pickscore) |" in table  # eval_every 50 of 1000 updates; then base and adapter
    # the base was evaluated under this job (pickscore alone) by `teacher`: the teacher t and the student
    assert "| opd | opd | 18 | 15,840 | 88 | 196 | 20 + 2 (pickscore) |" in table
    assert "| opd_no_mar | opd | 9 | 13,248 | 74 | 164 | 20 + 1 (pickscore) |" in table  # t cached too
    assert "| summary | - | - | - | - | 0 | 0 (every task) | 0.0 | 0.0 |" in table  # both read from the cache
    assert "| **total** |" in table


def test_evaluations_of_sd35m_follow_the_cache():
    stages = {s.name: s for s in gpu_check.spec_stages(gpu_check.sd35m_spec())}
    counts = {n: [(e.where, e.count, e.tasks) for e in s.evaluations] for n, s in stages.items()}
    assert counts["teacher_geneval"] == [("in training", 20, ("geneval",)), ("launched", 2, ("geneval",))]
    assert counts["seesaw_ocr"][1] == ("launched", 1, ("ocr",))  # the base under the ocr job: cached
    mix = ("geneval", "ocr", "pickscore")
    assert counts["opd_merge"] == [("in training", 20, mix), ("launched", 5, mix)]  # base, 3 teachers, student
    assert counts["grpo_mix"][1] == counts["opd_no_mar"][1] == ("launched", 1, mix)
    every = ("geneval", "ocr", "pickscore", "deqa")
    assert counts["coldstart"] == [("launched", 7, every)]  # base, 4 teachers, 2 merges
    # the summary's 13 models on every task: the 6 the cold start evaluated are read back
    assert counts["summary"] == [("launched", 7, every)]
    images = stages["summary"].evaluations[0].images
    assert images == 553 * 4 + 1018 + 2048 + 200  # the test sets at their true sizes


def test_overrides_merge_as_the_runner_merges_them():
    spec = gpu_check.sd35m_spec()
    stage = gpu_check.spec_stages(spec, ["num_processes=1", "extra={rollout_chunks: 96}"])[0]
    assert stage.num_processes == 1 and stage.values["rollout_chunks"] == 96 and stage.values["ema_decay"] == 0.975
    # a second -p extra= replaces the first (runs.main keeps one value per key): rollout_chunks 96 is lost
    replaced = gpu_check.spec_stages(spec, ["extra={rollout_chunks: 96}", "extra={micro_batch: 1}"])[0]
    assert (replaced.values["rollout_chunks"], replaced.values["micro_batch"]) == (12, 1)


def test_fewer_gpu_table_prints_every_row(costs):
    table = gpu_check.fewer_gpu_table(costs=costs)
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| GPUs")]
    assert [r.split(" | ")[0][2:] for r in rows] == [label for label, _ in gpu_check.FEWER_GPUS]
    for row, (_, overrides) in zip(rows, gpu_check.FEWER_GPUS):
        assert f"| {gpu_check.shell_overrides(overrides)} |" in row
        for override in overrides:
            key, value = override.split("=", 1)
            if key == "extra":
                for item in value.strip("{}").split(", "):
                    assert item in row
    cells = {r.split(" | ")[0][2:]: r.split(" | ") for r in rows}

    def gib(stage_name, overrides):
        stage = next(s for s in costs.stages_with(overrides) if s.name == stage_name)
        return f"{costs.peak_bytes(stage) / 2 ** 30:.1f}"

    assert cells["8"][2:4] == [gib("teacher_deqa", ()), gib("opd_merge", ())]  # the stage table's peaks
    stage_table = gpu_check.cost_tables(costs=costs)
    assert f"| {cells['8'][2]} | 15.3 |" in stage_table.split("| teacher_deqa |")[1].splitlines()[0]
    # text_encoders_on_cpu joins the row's own extra: 10.4 GiB less, rollout_chunks kept
    encoders = sum(costs.encoder_bytes.values()) / 2 ** 30
    for label in ("4", "1 x 80 GB", "8 x 24 GB"):
        teacher_cpu = float(cells[label][4].split(" / ")[0])
        assert abs(float(cells[label][2]) - encoders - teacher_cpu) < 0.11, (label, cells[label])
    # rollout_chunks is a count: 1 GPU at the spec's 12 decodes 96 images, at 96 it decodes 12
    assert "96 images decoded at once" in table
    single = next(s for s in costs.stages_with(["num_processes=1"]) if s.name == "teacher_deqa")
    assert costs.estimate(single).decode_batch == 96
    # gradient checkpointing: one more forward per trained step in the days
    slow = next(s for s in costs.stages_with(["extra={gradient_checkpointing: true}"]) if s.name == "teacher_deqa")
    assert costs.update_seconds(slow) / costs.update_seconds(costs.stage("teacher_deqa")) == pytest.approx(
        (13_248 + 144 * 2 * 9) / 13_248)


@pytest.mark.parametrize("page", sorted(gpu_check.DOC_TABLES))
def test_the_docs_tables_are_the_commands_current_output(costs, page):
    """docs/gpu.md and docs/gpu_costs.md hold the output of the command named above each table: a
    change of the spec, estimate.py or the cost model must be written into them
    (`python -m flowopd_lib.diagnostics.gpu_check --costs --update-docs`), not left stale."""
    flags, make = gpu_check.DOC_TABLES[page]
    text = (gpu_check.ROOT / page).read_text()
    assert f"python -m flowopd_lib.diagnostics.gpu_check {flags}" in text
    assert gpu_check.doc_table(text, flags) == make(costs=costs), (
        f"{page} is stale: run python -m flowopd_lib.diagnostics.gpu_check --costs --update-docs")


def test_every_number_in_the_docs_prose_comes_from_the_command(costs):
    """GiB, GPU-h, days and ms quoted outside the generated tables are among the command's numbers."""
    import re

    printed = "\n".join(make(costs=costs) for _, make in gpu_check.DOC_TABLES.values())
    numbers = set(re.findall(r"\d[\d,]*(?:\.\d+)?", printed))
    for page, (flags, _) in gpu_check.DOC_TABLES.items():
        text = (gpu_check.ROOT / page).read_text()
        begin, end = gpu_check.doc_markers(flags)
        prose = text.split(begin)[0] + text.split(end, 1)[1]
        quoted = re.findall(r"(\d[\d,]*(?:\.\d+)?)\s+(?:GiB|GPU-h|days|ms|TFLOP)", prose)
        assert quoted, page
        assert not [q for q in quoted if q not in numbers], (page, [q for q in quoted if q not in numbers])


def test_update_docs_rewrites_only_the_generated_block(costs, tmp_path):
    for page, (flags, make) in gpu_check.DOC_TABLES.items():
        begin, end = gpu_check.doc_markers(flags)
        (tmp_path / page).parent.mkdir(exist_ok=True)
        (tmp_path / page).write_text(f"# title\n\nprose 1.0 GiB\n\n{begin}\n| stale | 34.8 |\n{end}\n\nmore prose\n")
    changed = gpu_check.update_docs(tmp_path, costs)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in changed) == sorted(gpu_check.DOC_TABLES)
    for page, (flags, make) in gpu_check.DOC_TABLES.items():
        text = (tmp_path / page).read_text()
        assert gpu_check.doc_table(text, flags) == make(costs=costs)
        assert text.startswith("# title\n\nprose 1.0 GiB\n\n") and text.endswith("\n\nmore prose\n")
    assert gpu_check.update_docs(tmp_path, costs) == []

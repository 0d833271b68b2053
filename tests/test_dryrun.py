"""The CPU dry run of full-scale specs: its stand-ins (reward servers judging with the toy scorers,
PickScore from local folders, a saved tiny SD3 pipeline), and the whole dry run of sd35m.yaml
(slow: `make dryrun` runs it, and CI does)."""
import json

import pytest
import torch

from flowopd_lib import dryrun, models, rewards, toy
from flowopd_lib.rewards.real import DeQAServer, GenEvalServer, PickScoreV1
from flowopd_lib.rewards.real.pickscore_v1 import MODEL_ENV, PROCESSOR_ENV, tiny_clip
from flowopd_lib.rewards.real.inputs import to_jpeg
from flowopd_lib.rewards.real.stub import decode_images, toy_reward_servers


def test_stub_servers_judge_with_the_toy_scorers_over_the_protocol():
    prompts = toy.sample_prompts("geneval", n=32, split="test", seed=0)
    images = toy.render(prompts, seed=0)
    with toy_reward_servers() as urls:
        right = GenEvalServer(url=urls["geneval"], batch_size=8)(images, prompts)
        wrong = GenEvalServer(url=urls["geneval"])(torch.ones_like(images), prompts)
        quality = DeQAServer(url=urls["deqa"])(images, prompts)
    # the server sees what the protocol sends: JPEGs (which blur 32-px renders' colours)
    sent = decode_images({"images": to_jpeg(images)})
    local = rewards.score("geneval", sent, prompts)
    torch.testing.assert_close(right["reward"], local["reward"])
    torch.testing.assert_close(right["strict"], local["strict"])
    assert right["strict"].mean() > 0.5 and wrong["strict"].sum() == 0
    torch.testing.assert_close(quality["quality"], rewards.score("deqa", sent, prompts)["reward"])


def test_stub_server_failure_is_a_500_naming_the_error():
    from flowopd_lib.rewards.real import RewardServerError

    with toy_reward_servers() as urls:
        with pytest.raises(RewardServerError, match="KeyError"):  # no GenEval metadata in a DeQA-style request
            GenEvalServer(url=urls["geneval"], attempts=1).post({"images": []})


def test_pickscore_v1_loads_local_folders_named_by_the_environment(tmp_path, monkeypatch):
    model, processor = tiny_clip()
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "processor")
    monkeypatch.setenv(MODEL_ENV, str(tmp_path / "model"))
    monkeypatch.setenv(PROCESSOR_ENV, str(tmp_path / "processor"))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    direct = PickScoreV1(model=model, processor=processor)(images, ["a red cat", "a square"])["reward"]
    from_env = PickScoreV1()(images, ["a red cat", "a square"])["reward"]
    torch.testing.assert_close(from_env, direct)


def test_saved_tiny_sd3_loads_as_a_base_at_its_native_resolution(tmp_path):
    paths = dryrun.build_standins(tmp_path)
    base = models.load_base(paths["base"])
    assert isinstance(base, models.SD3FlowModel) and base.resolution == 32
    images = base.decode(torch.randn(1, *base.latent_shape, generator=torch.Generator().manual_seed(0)))
    assert images.shape == (1, 3, 32, 32)


@pytest.mark.slow
def test_dry_run_of_sd35m_completes(tmp_path):
    run_dir = dryrun.dry_run("papermill_runs/sd35m.yaml", num_processes=2, outputs=tmp_path)
    for stage in ("teacher_geneval", "teacher_ocr", "teacher_pickscore", "teacher_deqa", "coldstart", "opd_merge"):
        assert (run_dir / stage / ".done").exists()
    assert (run_dir / "teacher_geneval" / "adapter").is_dir()
    table = (run_dir / "summary" / "main_table.md").read_text()
    assert "Flow-OPD (merge init)" in table


@pytest.mark.slow  # ~50 s; make test-all (nft and awm on tiny SD3 are in test_forward_rl)
@pytest.mark.parametrize("trainer,stage", [("nft", "teacher_ocr"), ("awm", "teacher_geneval")])
def test_sd35m_teacher_stages_run_with_the_forward_process_trainers(tmp_path, trainer, stage):
    """-p trainer=nft|awm picks the stage's official settings (trainer_extra) on the SD3 wrapper."""
    run_dir = dryrun.dry_run("papermill_runs/sd35m.yaml", num_processes=1, outputs=tmp_path, only=[stage],
                             parameters={"trainer": trainer, "cfg_scale": 1.0, "eval_cfg": 1.0})
    adapter = json.loads((run_dir / stage / "adapter" / "adapter.json").read_text())
    extra = {"nft": {"teacher_ocr": {"nft_beta": 0.1, "old_decay_start": 75, "minibatches": 2}},
             "awm": {"teacher_geneval": {"train_timesteps": 6, "beta": 1e-3}}}[trainer][stage]
    assert {k: adapter["config"][k] for k in extra} == extra and adapter["config"]["cfg_scale"] == 1.0

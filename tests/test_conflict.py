"""The toy world's conflict dial (rewards/conflict.py, issue 36 A): 0 is today's world bit for bit,
the taste follows its formula at every setting, appeal is what it says, the exact rewards never
move, and the setting reaches every version the evaluation cache keys on."""
import hashlib
import math

import numpy as np
import pytest
import torch

from flowopd_lib import rewards
from flowopd_lib.cli import UserError
from flowopd_lib.rewards import conflict, pickscore, taste
from flowopd_lib.toy.degrade import appeal_scene, degrade
from flowopd_lib.toy.layout import render, scene_for_prompt
from flowopd_lib.rewards.detect import detect
from flowopd_lib.rewards.taste import appeal, background_rgb
from flowopd_lib.toy.scenes import Item, Scene, render_scenes
from flowopd_lib.toy.splits import read_prompts

# sha256 of values computed by the code before the dial existed (commit 9ae20c4), on the batches below
TASTE_BEFORE_THE_DIAL = "1cf2b44f008ddce1"
PROXY_DATA_BEFORE_THE_DIAL = ("b911aedc3f554c2c", "778ea15a3c5e5289")  # images, labels


def digest(array: np.ndarray) -> str:
    return hashlib.sha256(array.tobytes()).hexdigest()[:16]


@pytest.fixture(scope="module")
def batch():
    prompts = [p for t in ("geneval", "ocr", "pickscore", "deqa") for p in read_prompts(t, "test")[:16]]
    return degrade(render(prompts, seed=3), seed=5, p=0.5), prompts


def test_dial_at_zero_is_todays_taste_bit_for_bit(batch):
    images, prompts = batch
    assert conflict.get() == 0
    assert digest(taste.taste(images, prompts).numpy()) == TASTE_BEFORE_THE_DIAL
    with conflict.setting(0.5):  # the check can fail: another setting is another taste
        assert digest(taste.taste(images, prompts).numpy()) != TASTE_BEFORE_THE_DIAL


def test_proxy_training_data_at_zero_is_todays(batch):
    x, _, y = pickscore.make_data(read_prompts("pickscore", "test")[:6], seed=0)
    assert (digest(x.numpy()), digest(y.numpy())) == PROXY_DATA_BEFORE_THE_DIAL


@pytest.mark.parametrize("setting", [0.25, 0.5, 1.0])
def test_taste_follows_its_formula_at_every_setting(batch, setting):
    images, prompts = batch
    with conflict.setting(setting):
        t = {k: v.double() for k, v in taste.taste_terms(images, prompts).items()}
    aesthetic = 0.3 * t["harmony"] + 0.3 * t["composition"] + 0.4 * t["clean"]
    expected = t["faithfulness"] ** (1 - setting) * (0.25 + 0.75 * ((1 - setting) * aesthetic + setting * t["appeal"]))
    torch.testing.assert_close(t["taste"], expected, atol=1e-6, rtol=0)


def scenes_and_appealing(task: str, n: int = 48):
    prompts = read_prompts(task, "test")[:n]
    rng = np.random.default_rng(0)
    clean = [scene_for_prompt(p, rng) for p in prompts]
    return prompts, render_scenes(clean), render_scenes([appeal_scene(s, rng, 32) for s in clean])


def test_appeal_likes_one_bold_subject_on_a_vivid_background():
    bold = Scene("teal", [Item("circle", "red", 19, 6, 6)])
    scene = scene_for_prompt(read_prompts("geneval", "test")[0], np.random.default_rng(0))  # small objects, neutral
    x = render_scenes([bold, scene])
    arr = x.permute(0, 2, 3, 1).numpy()
    p = appeal(arr, detect(x), background_rgb(arr), [False, False])
    assert p[0] > 0.9 and p[1] < p[0] - 0.3, p


def test_the_dial_turns_the_taste_from_faithful_renders_to_appealing_ones():
    prompts, clean, appealing = scenes_and_appealing("geneval")
    wins = {}
    for setting in (0.0, 0.75):
        with conflict.setting(setting):
            wins[setting] = float((taste.taste(appealing, prompts) > taste.taste(clean, prompts)).float().mean())
    assert wins[0.0] < 0.3 and wins[0.75] > 0.7, wins


def test_exact_rewards_do_not_depend_on_the_dial(batch):
    images, prompts = batch
    by_task = {t: [i for i, p in enumerate(prompts) if p.task == t] for t in ("geneval", "ocr")}
    def exact():
        out = {t: rewards.score(t, images[i], [prompts[k] for k in i]) for t, i in by_task.items()}
        out["deqa"] = rewards.score("deqa", images, prompts)
        return out
    at_zero = exact()
    with conflict.setting(1.0):
        at_one = exact()
    for name in at_zero:
        for key in at_zero[name]:
            assert torch.equal(at_zero[name][key], at_one[name][key]), (name, key)


@pytest.mark.parametrize("bad", [1.5, -0.1, math.nan, True, "0.5"])
def test_a_bad_setting_is_one_clear_error(bad):
    with pytest.raises(UserError, match=r"conflict=.* is not a number in \[0, 1\]"):
        conflict.use(bad)
    assert conflict.get() == 0


def test_setting_is_restored_after_the_block_even_on_error():
    with pytest.raises(RuntimeError):
        with conflict.setting(0.5):
            assert conflict.get() == 0.5
            raise RuntimeError("inside")
    assert conflict.get() == 0


def test_the_setting_reaches_the_versions_the_evaluation_cache_keys_on():
    assert rewards.version("taste") == "" and rewards.version("pickscore") == pickscore.weights_digest()
    with conflict.setting(0.5):
        assert rewards.version("taste") == "conflict0.5"
    assert rewards.version("geneval") == rewards.version("ocr") == ""


def test_a_setting_without_a_proxy_names_the_command_that_trains_one():
    with conflict.setting(0.123):
        with pytest.raises(UserError, match=r"no PickScore proxy for conflict=0\.123.*--conflict 0\.123"):
            rewards.score("pickscore", torch.rand(1, 3, 32, 32), read_prompts("pickscore", "test")[:1])


def test_a_config_at_a_setting_without_a_proxy_is_refused_before_any_compute():
    from flowopd_lib.config import ConfigError
    from flowopd_lib.grpo import GRPOConfig

    with pytest.raises(ConfigError, match=r"GRPOConfig\.conflict=0\.123: .*--conflict 0\.123"):
        GRPOConfig(conflict=0.123)
    assert GRPOConfig().conflict == 0


def test_the_trainer_and_the_evaluation_job_take_the_dial_from_their_config(tmp_path, monkeypatch):
    from flowopd_lib import distributed_eval
    from flowopd_lib.grpo import GRPOConfig, GRPOTrainer
    from tiny import tiny_model

    # any setting's proxy: the shipped one stands in (this test is about who sets the dial)
    monkeypatch.setattr(pickscore, "weights_dir", lambda setting=None: pickscore.WEIGHTS_DIR)
    try:
        cfg = GRPOConfig(conflict=0.25, datasets={"pickscore": 1.0}, rewards={"pickscore": 1.0}, prompts_per_update=2, group_size=2,
                         sde_steps=2, updates=0, out_dir=str(tmp_path / "run"))
        GRPOTrainer(tiny_model(), cfg)
        assert conflict.get() == 0.25
        assert "conflict: 0.25" in cfg.to_yaml()  # written in the run's config
        job = distributed_eval.EvalJob(conflict=0.75, eval_tasks=("ocr",), eval_prompts=2, eval_steps=2)
        distributed_eval.evaluate_on_ranks(tiny_model(), job)
        assert conflict.get() == 0.75
    finally:
        conflict.use(0.0)


def test_a_run_begun_before_the_dial_existed_resumes_and_the_dial_cannot_change_on_resume(tmp_path):
    import yaml

    from flowopd_lib.grpo import GRPOConfig
    from flowopd_lib.trainer import ResumeError, check_run_dir

    cfg = GRPOConfig(out_dir=str(tmp_path / "run"))
    out = tmp_path / "run"
    (out / "checkpoints" / "step_0000001").mkdir(parents=True)
    old = {k: v for k, v in yaml.safe_load(cfg.to_yaml()).items() if k != "conflict"}  # written before the field
    (out / "config.yaml").write_text(yaml.safe_dump(old))
    check_run_dir(cfg)  # its default, 0, is what the run had
    (out / "config.yaml").write_text(yaml.safe_dump({k: v for k, v in old.items() if k != "beta"}))
    check_run_dir(cfg)  # any field added since (here: as if beta were new) reads as its default
    with pytest.raises(ResumeError, match=r"conflict: 0\.0 -> 0\.5"):
        check_run_dir(cfg.replace(conflict=0.5))

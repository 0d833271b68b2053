"""Toy rewards: exact on ground truth, ~0 on noise and blank images, the upstream formulas,
ordering of degradations, the shipped PickScore proxy, and throughput."""
import json
import re
import time

import pytest
import torch

from flowopd_lib import rewards, toy
from flowopd_lib.rewards import geneval, ocr, pickscore
from flowopd_lib.toy.degrade import add_noise, blur
from flowopd_lib.toy.scenes import Item, Scene


def gt(task, n=240, seed=0):
    prompts = toy.sample_prompts(task, n=n, split="test", seed=seed)
    return prompts, toy.render(prompts, seed=seed)


def noise_and_blank(images):
    return torch.rand(images.shape, generator=torch.Generator().manual_seed(0)), torch.full_like(images, 0.9)


def test_registry():
    assert {"geneval", "ocr", "pickscore", "deqa"} <= set(rewards.available())
    with pytest.raises(ValueError, match="available"):
        rewards.score("clip", torch.zeros(1, 3, 32, 32), toy.sample_prompts("ocr", 1))
    rewards.register("brightness", lambda im, p: {"reward": im.mean((1, 2, 3))})
    assert rewards.score("brightness", torch.ones(2, 3, 8, 8), [None, None])["reward"].tolist() == [1.0, 1.0]


def test_geneval_exact_on_ground_truth_and_zero_on_noise():
    prompts, images = gt("geneval")
    out = rewards.score("geneval", images, prompts)
    assert out["strict"].mean() >= 0.98 and out["reward"].mean() >= 0.98
    assert min(geneval.per_category(out["strict"], prompts).values()) >= 0.95
    for bad in noise_and_blank(images):
        out = rewards.score("geneval", bad, prompts)
        assert out["strict"].mean() <= 0.02 and out["reward"].mean() <= 0.05
    big = toy.render(prompts[:60], seed=0, size=64)
    assert rewards.score("geneval", big, prompts[:60])["strict"].mean() >= 0.98


def scene(*items, bg="white"):
    return toy.render_scenes([Scene(bg, [Item(*it) for it in items])])


@pytest.mark.parametrize("text, items, strict, reward", [
    ("a photo of two circles", [("circle", "red", 9, 2, 2), ("circle", "red", 9, 2, 20)], 1, 1.0),
    # GenEval's exclude clause: three when two were asked fails strictly; count credit 1 - 1/2
    ("a photo of two circles", [("circle", "red", 9, 2, 2), ("circle", "red", 9, 2, 20),
                                ("circle", "blue", 9, 20, 2)], 0, 0.5),
    ("a photo of four squares", [("square", "red", 9, 2, 2)], 0, 0.25),
    # wrong colour: count term 1, colour term 0
    ("a photo of a red cross", [("cross", "blue", 11, 10, 10)], 0, 0.5),
    # wrong relation: two count terms 1 and a position term 0
    ("a photo of a circle left of a square", [("circle", "red", 9, 10, 20), ("square", "blue", 9, 10, 2)], 0, 2 / 3),
    ("a photo of a circle left of a square", [("circle", "red", 9, 10, 2), ("square", "blue", 9, 10, 20)], 1, 1.0),
    # colour attribute bound to the wrong object
    ("a photo of a red triangle and a blue square", [("triangle", "blue", 11, 2, 2), ("square", "red", 9, 20, 20)], 0, 0.5),
])
def test_geneval_partial_credit_mirrors_flow_grpo(text, items, strict, reward):
    p = toy.parse_prompt(text, "geneval")
    out = rewards.score("geneval", scene(*items), [p])
    assert out["strict"].item() == strict
    assert out["reward"].item() == pytest.approx(reward, abs=1e-6)


def test_geneval_tolerates_generated_looking_pixels():
    prompts, images = gt("geneval", n=120)
    assert rewards.score("geneval", blur(images, 0.7), prompts)["strict"].mean() >= 0.9
    noisy = add_noise(images, 0.05, torch.Generator().manual_seed(0))
    assert rewards.score("geneval", noisy, prompts)["strict"].mean() >= 0.9


def test_ocr_exact_on_ground_truth_and_zero_on_noise():
    prompts, images = gt("ocr")
    out = rewards.score("ocr", images, prompts)
    assert out["reward"].mean() >= 0.98 and out["exact"].mean() >= 0.98
    assert ocr.read_text(images[:50]) == [p.spec["text"] for p in prompts[:50]]
    for bad in noise_and_blank(images):
        assert rewards.score("ocr", bad, prompts)["reward"].mean() <= 0.02
    assert all(t == "" for t in ocr.read_text(gt("geneval", n=60)[1]))  # shapes are not text


def test_ocr_reward_is_flow_grpos_formula():
    assert ocr.ocr_reward("XA7K", "A7") == 1.0          # substring counts as correct
    assert ocr.ocr_reward("a 7", "A7") == 1.0           # lower-cased, spaces stripped
    assert ocr.ocr_reward("A1", "A7") == 0.5
    assert ocr.ocr_reward("", "A7X") == 0.0
    assert ocr.ocr_reward("PPPPPPPP", "A7") == 0.0      # distance capped at the length


def test_ocr_reads_the_wrong_text_as_wrong():
    p = toy.parse_prompt('a sign that says "A74"', "ocr")
    wrong = toy.render([toy.parse_prompt('a sign that says "A7"', "ocr")])
    assert rewards.score("ocr", wrong, [p])["reward"].item() == pytest.approx(2 / 3)


def test_ocr_prompt_quoting_no_text_is_a_value_error_naming_it():
    """`a sign that says ""` has no target: the reward would divide by its length 0."""
    images = torch.ones(1, 3, 32, 32)
    for empty in ('a sign that says ""', 'a sign that says "  "'):
        for prompt in (toy.parse_prompt(empty, "ocr"), empty):
            with pytest.raises(ValueError, match=f"OCR prompt {re.escape(repr(empty))} quotes no text"):
                rewards.score("ocr", images, [prompt])
    with pytest.raises(ValueError, match="OCR target text is empty"):
        ocr.ocr_reward("A7", " ")
    assert rewards.score("ocr", images, ['a sign that says "A7"'])["reward"].item() == 0.0  # plain strings score too


def test_deqa_orders_clean_blurred_noisy():
    prompts, images = gt("pickscore", n=120)
    clean = rewards.score("deqa", images, prompts)["reward"]
    blurred = rewards.score("deqa", blur(images, 0.7), prompts)["reward"]
    noisy = rewards.score("deqa", add_noise(images, 0.1, torch.Generator().manual_seed(0)), prompts)["reward"]
    assert clean.mean() > blurred.mean() + 0.5 > noisy.mean() + 1.0
    assert (clean >= 4.5).float().mean() > 0.95
    assert 1 <= noisy.min() and clean.max() <= 5


def test_taste_likes_faithful_clean_images():
    prompts, images = gt("pickscore", n=120)
    true = rewards.score("taste", images, prompts)["reward"]
    assert true.mean() > 0.8
    assert rewards.score("taste", toy.degrade(images, seed=0, p=0.6), prompts)["reward"].mean() < true.mean() - 0.15
    assert rewards.score("taste", images.roll(1, 0), prompts)["reward"].mean() < 0.3  # other prompts' images
    for bad in noise_and_blank(images):
        assert rewards.score("taste", bad, prompts)["reward"].mean() < 0.1


def test_pickscore_ships_small_weights():
    files = list(pickscore.WEIGHTS_DIR.iterdir())
    assert {f.name for f in files} == {"model.safetensors", "config.json"}
    assert sum(f.stat().st_size for f in files) < 2e6


def test_pickscore_ranks_heldout_pairs():
    config = json.loads((pickscore.WEIGHTS_DIR / "config.json").read_text())
    assert config["metrics"]["heldout_pairwise_accuracy"] >= 0.9
    # re-measure on fresh held-out pairs (test prompts, a seed not used in training)
    model = pickscore.load()
    x, texts, y = pickscore.make_data(toy.read_prompts("pickscore", "test")[:100], seed=12345)
    assert pickscore.pairwise_accuracy(model, x, texts, pickscore.pairs_of(y)) >= 0.9


def test_pickscore_returns_proxy_and_truth():
    prompts, images = gt("pickscore", n=64)
    out = rewards.score("pickscore", images, prompts)
    for key in ("reward", "true"):
        assert out[key].shape == (64,) and 0 <= out[key].min() and out[key].max() <= 1
    worse = rewards.score("pickscore", toy.degrade(images, seed=0, p=0.6), prompts)
    assert worse["reward"].mean() < out["reward"].mean() and worse["true"].mean() < out["true"].mean()
    # The issue exempts the learned scorer from the 1000 images/s floor; this bound only catches
    # a regression that would make it dominate a training step (measured ~0.1 s here).
    scorer, batch, texts = pickscore.load(), images.repeat(4, 1, 1, 1), [p.text for p in prompts] * 4
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy 2-core box, one thread is the faster and steadier
    try:
        t = min(_timed(lambda: scorer(batch, texts)) for _ in range(5))
    finally:
        torch.set_num_threads(threads)
    assert t < 0.5, f"forward on 256 images took {t:.3f}s"


@pytest.mark.parametrize("name", ["geneval", "ocr", "deqa", "taste"])
def test_throughput(name):
    task = {"geneval": "geneval", "ocr": "ocr"}.get(name, "pickscore")
    prompts, images = gt(task, n=512)
    rewards.score(name, images[:8], prompts[:8])
    best = min(_timed(lambda: rewards.score(name, images, prompts)) for _ in range(3))
    assert 512 / best >= 1000, f"{name}: {512 / best:.0f} images/s"


def _timed(fn):
    """CPU seconds this process spends in fn: unlike wall time, not stretched by other jobs on the machine."""
    t = time.process_time()
    with torch.no_grad():
        fn()
    return time.process_time() - t

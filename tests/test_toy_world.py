"""The toy world: prompts, splits, renders, parsing, vocabulary, pretraining data."""
import json
import time

import numpy as np
import pytest
import torch

from flowopd_lib import toy
from flowopd_lib.toy import grammar, splits


@pytest.mark.parametrize("task", toy.TASKS)
def test_sample_prompts_deterministic_with_task_labels(task):
    a = toy.sample_prompts(task, n=50, split="test", seed=3)
    b = toy.sample_prompts(task, n=50, split="test", seed=3)
    c = toy.sample_prompts(task, n=50, split="test", seed=4)
    assert [p.text for p in a] == [p.text for p in b] != [p.text for p in c]
    assert all(isinstance(p, toy.Prompt) and p.task == task for p in a)
    assert [p.spec for p in a] == [p.spec for p in b]


def test_bad_task_or_split_names_the_allowed_values():
    with pytest.raises(ValueError, match="geneval.*ocr.*pickscore.*deqa"):
        toy.sample_prompts("clip", n=4)
    with pytest.raises(ValueError, match="train.*test"):
        toy.sample_prompts("ocr", n=4, split="validation")


def test_geneval_sampling_weighs_tags_equally():
    tags = [p.spec["tag"] for p in toy.sample_prompts("geneval", n=120, split="test", seed=0)]
    assert {t: tags.count(t) for t in toy.GENEVAL_TAGS} == {t: 20 for t in toy.GENEVAL_TAGS}


def test_render_is_deterministic_and_well_formed():
    prompts = [p for t in ("geneval", "ocr", "pickscore") for p in toy.sample_prompts(t, 20, "test", 0)]
    a, b, c = toy.render(prompts, seed=0), toy.render(prompts, seed=0), toy.render(prompts, seed=1)
    assert a.shape == (60, 3, 32, 32) and a.dtype == torch.float32
    assert 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert toy.render(prompts[:4], seed=0, size=64).shape == (4, 3, 64, 64)


def test_scenes_hold_what_the_prompt_asks():
    for p, s in zip(*(lambda ps: (ps, toy.scenes_for_prompts(ps, 0)))(toy.sample_prompts("geneval", 120, "test", 0))):
        assert len(s.items) == sum(c["count"] for c in p.spec["include"])
        if p.spec["tag"] == "position":
            rel = p.spec["include"][1]["position"][0]
            assert rel in toy.relations(s.items[1].box, s.items[0].box)


def test_geneval_relations_follow_geneval_rule():
    left, right = (0, 10, 8, 18), (20, 10, 28, 18)
    assert toy.relations(left, right) == {"left of"} and toy.relations(right, left) == {"right of"}
    top, bottom = (10, 0, 18, 8), (10, 20, 18, 28)
    assert toy.relations(top, bottom) == {"above"}
    assert toy.relations(left, (3, 11, 9, 17)) == set()  # overlapping centres: no relation


def test_shipped_files_use_flow_grpo_formats_and_disjoint_splits():
    for task in ("geneval", "ocr", "pickscore"):
        train = {p.text for p in toy.read_prompts(task, "train")}
        test = {p.text for p in toy.read_prompts(task, "test")}
        assert train and test and not train & test
    lines = splits.prompt_file("geneval", "test").read_text().splitlines()
    metas = [json.loads(line) for line in lines]
    assert {m["tag"] for m in metas} == set(toy.GENEVAL_TAGS)
    for m in metas:
        assert set(m) <= {"tag", "include", "exclude", "prompt"}
        if m["tag"] == "counting":
            assert m["exclude"] == [{"class": m["include"][0]["class"], "count": m["include"][0]["count"] + 1}]
        if m["tag"] == "position":
            assert m["include"][1]["position"][1] == 0
    ocr_train = {p.spec["text"] for p in toy.read_prompts("ocr", "train")}
    assert not ocr_train & {p.spec["text"] for p in toy.read_prompts("ocr", "test")}
    assert all(line.count('"') == 2 for line in splits.prompt_file("ocr", "train").read_text().splitlines())


def test_the_ocr_test_extension_leaves_every_earlier_draw_as_it_was():
    """OCR's test file grew from 200 to 400 prompts for an evaluation that decides; a draw of up to 200
    (every shipped record, learning curve and cache) is the first block's permutation, as before, and
    the extension shares its quoted text with neither split."""
    test = toy.read_prompts("ocr", "test")
    first, extension = test[:splits.N_OCR["test"]], test[splits.N_OCR["test"]:]
    assert len(first) == 200 and len(extension) == splits.OCR_TEST_EXTENSION == 200
    for n, seed in [(1, 0), (90, 0), (200, 0), (90, 7)]:
        before = [first[i].text for i in np.random.default_rng(seed).permutation(200)[:n]]  # the old draw
        assert [p.text for p in splits.sample_prompts("ocr", n, "test", seed)] == before
    drawn = splits.sample_prompts("ocr", 400, "test", 3)
    assert {p.text for p in drawn[:200]} == {p.text for p in first} and {p.text for p in drawn[200:]} == {
        p.text for p in extension}
    earlier = {p.spec["text"] for p in first} | {p.spec["text"] for p in toy.read_prompts("ocr", "train")}
    assert len({p.spec["text"] for p in extension}) == 200 and not earlier & {p.spec["text"] for p in extension}


@pytest.mark.parametrize("task", ["ocr", "pickscore", "deqa"])
def test_fresh_prompts_are_seeded_new_and_never_share_a_test_key(task):
    key = splits.held_out_key(task)
    fresh = splits.fresh_prompts(task, 3000, seed=1)
    assert [p.text for p in fresh[:5]] == [p.text for p in splits.fresh_prompts(task, 5, seed=1)]
    assert all(p.task == task for p in fresh)
    assert not {key(p) for p in fresh} & {key(p) for p in toy.read_prompts(task, "test")}
    # more variety than the shipped training file: most fresh prompts are not in it
    assert len({p.text for p in fresh} - {p.text for p in toy.read_prompts(task, "train")}) > 2000
    with pytest.raises(ValueError, match="fresh prompts exist for ocr, pickscore and deqa"):
        splits.fresh_prompts("geneval", 2)


def test_shipped_files_are_what_the_generator_writes(tmp_path):
    splits.write_splits(tmp_path)
    for task in ("geneval", "ocr", "pickscore"):
        for split in toy.SPLITS:
            assert splits.prompt_file(task, split, tmp_path).read_text() == splits.prompt_file(task, split).read_text()


@pytest.mark.parametrize("task", ["geneval", "ocr", "pickscore", "deqa"])
def test_parse_prompt_rebuilds_specs(task):
    rng = np.random.default_rng(0)
    for _ in range(300):
        p = toy.random_prompt(task, rng)
        assert toy.parse_prompt(p.text, task).spec == p.spec
    with pytest.raises(ValueError):
        toy.parse_prompt("a photo of a dragon", task)


def test_vocabulary_covers_every_prompt_and_caption():
    vocab, glyphs = set(toy.vocabulary()), set(toy.GLYPHS)
    assert all(w == w.lower() for w in vocab) and len(vocab) < 200
    texts = [p.text for t in ("geneval", "ocr", "pickscore") for s in toy.SPLITS for p in toy.read_prompts(t, s)]
    texts += toy.pretraining_batch(500, seed=0)[1]
    for text in texts:
        assert set(toy.words(text)) <= vocab | glyphs, text
    assert toy.words('a sign that says "A7"') == ["a", "sign", "that", "says", '"', "A", "7", '"']


def test_world_has_enough_variety():
    assert len(toy.SHAPES) >= 4 and len(toy.COLORS) >= 6
    assert set("0123456789") <= set(toy.GLYPHS)


def test_pretraining_batch_shapes_determinism_and_noise():
    x, caps = toy.pretraining_batch(64, seed=1)
    x2, caps2 = toy.pretraining_batch(64, seed=1)
    assert x.shape == (64, 3, 32, 32) and len(caps) == 64
    assert torch.equal(x, x2) and caps == caps2
    assert toy.pretraining_batch(4, seed=1, size=64)[0].shape == (4, 3, 64, 64)
    # the clean captions are the grammar's prompts; noise changes a good share of them
    x_clean, clean = toy.pretraining_batch(400, seed=2, caption_noise=0.0)
    x_noisy, noisy = toy.pretraining_batch(400, seed=2, caption_noise=1.0)
    assert torch.equal(x_clean, x_noisy)
    changed = np.mean([a != b for a, b in zip(clean, noisy)])
    assert 0.4 < changed < 0.95  # single objects, and the colour half of the time, stay right
    counting = [c for c in clean if c.startswith("a photo of ") and c.split()[3] in ("two", "three", "four")]
    assert counting  # counting prompts are in the mix


def test_pretraining_batch_is_fast():
    toy.pretraining_batch(64, seed=0)
    best = min(_timed(lambda: toy.pretraining_batch(1024, seed=s)) for s in range(3))
    assert 1024 / best >= 2000, f"{1024 / best:.0f} images/s"


def test_degradations_change_images_deterministically():
    x = toy.render(toy.sample_prompts("pickscore", 32, "test", 0))
    a, b = toy.degrade(x, seed=5), toy.degrade(x, seed=5)
    assert torch.equal(a, b) and not torch.equal(a, x)
    assert 0 <= a.min() and a.max() <= 1


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def test_sign_captions_can_have_their_own_noise_and_default_to_the_shared_rate():
    images, shared = toy.pretraining_batch(300, seed=3, caption_noise=0.2)
    same_images, default = toy.pretraining_batch(300, seed=3, caption_noise=0.2, ocr_caption_noise=None)
    assert default == shared and torch.equal(images, same_images)  # None: today's captions, bit for bit
    from flowopd_lib.toy.captions import noisy_caption

    rng = np.random.default_rng(0)
    signs = [grammar.random_prompt("ocr", rng) for _ in range(400)]
    exact = {noise: np.mean([noisy_caption(p, np.random.default_rng(i), 0.2, noise) == p.text
                             for i, p in enumerate(signs)]) for noise in (None, 0.9)}
    assert abs(exact[None] - 0.8) < 0.06 and abs(exact[0.9] - 0.1) < 0.06

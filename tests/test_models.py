"""The toy model wrapper, sampling and pretraining mechanics on the `tiny` size."""
import pytest
import torch

from flowopd_lib import rollout, toy
from flowopd_lib.models import ToyFlowModel, load_base
from flowopd_lib.pretrain import PretrainConfig, pretrain

PROMPTS = ["a photo of a red circle", 'a sign that says "A7"', "a photo of two squares", ""]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return ToyFlowModel("tiny")


def test_tokenizer_keeps_glyphs_and_grammar_words(tiny):
    ids = tiny.tokenizer(['a sign that says "A7"'])[0].tolist()
    tokens = [tiny.tokenizer.vocab[i] for i in ids if i != 0]
    assert tokens == ["<bos>", "a", "sign", "that", "says", '"', "A", "7", '"', "<eos>"]
    assert "<unk>" not in [tiny.tokenizer.vocab[i] for i in tiny.tokenizer(PROMPTS).flatten().tolist()]


def test_context_tokens_see_the_whole_prompt(tiny):
    """The MMDiT's context tokens come from a bidirectional T5 (as in SD3): the first quoted glyph's
    embedding depends on the glyph after it, which CLIP's causal tokens could not."""
    with torch.no_grad():
        a, b = tiny.text_embeddings(['a sign that says "A7"', 'a sign that says "A8"']).tokens
    first_glyph = 6  # <bos> a sign that says " A
    assert not torch.allclose(a[first_glyph], b[first_glyph])


def test_velocity_and_decode_shapes(tiny):
    x = torch.randn(4, *tiny.latent_shape)
    v = tiny.velocity(x, torch.rand(4), tiny.encode_prompts(PROMPTS))
    assert v.shape == x.shape
    images = tiny.decode(x)
    assert images.shape == (4, 3, 32, 32) and images.min() >= 0 and images.max() <= 1


def test_prompt_cache_equals_fresh_encoding(tiny):
    cached = tiny.encode_prompts(PROMPTS)
    again = tiny.encode_prompts(list(reversed(PROMPTS)))
    with torch.no_grad():
        fresh = tiny.text_embeddings(PROMPTS)
    assert torch.allclose(cached.tokens, fresh.tokens, atol=1e-6) and torch.allclose(cached.pooled, fresh.pooled, atol=1e-6)
    assert torch.equal(again.pooled, cached.pooled.flip(0))


def test_save_load_round_trip(tiny, tmp_path):
    tiny.latent_mean.fill_(0.5)
    tiny.save(tmp_path / "m", extra={"note": "test"})
    loaded = load_base(str(tmp_path / "m"))
    x = torch.randn(4, *tiny.latent_shape)
    emb = tiny.encode_prompts(PROMPTS)
    assert torch.equal(tiny.velocity(x, torch.full((4,), 0.5), emb), loaded.velocity(x, torch.full((4,), 0.5), loaded.encode_prompts(PROMPTS)))
    assert torch.equal(tiny.decode(x), loaded.decode(x))


def test_bad_names_are_clear_errors():
    with pytest.raises(ValueError, match="unknown toy model size 'huge'.*'tiny'"):
        ToyFlowModel("huge")
    with pytest.raises(ValueError, match="unknown base model 'nope'"):
        load_base("nope")


def test_generate_is_deterministic_and_batch_size_invariant(tiny):
    a = rollout.generate(tiny, PROMPTS, steps=4, cfg_scale=3.0, seed=5, batch_size=4)
    b = rollout.generate(tiny, PROMPTS, steps=4, cfg_scale=3.0, seed=5, batch_size=3)
    c = rollout.generate(tiny, PROMPTS, steps=4, cfg_scale=3.0, seed=6, batch_size=4)
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, c)
    sde = rollout.generate(tiny, PROMPTS, steps=4, seed=5, noise_level=0.7)
    assert sde.shape == a.shape and not torch.allclose(sde, rollout.generate(tiny, PROMPTS, steps=4, seed=5))


def test_pretraining_learns_and_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    common = dict(size="tiny", ae_steps=10, ae_batch=16, batch=16, steps=12, log_every=5, checkpoint_every=6,
                  eval_every=6)
    straight = pretrain(PretrainConfig(**common, out_dir=str(tmp_path / "a")), resume=False)

    def interrupt(model):
        raise KeyboardInterrupt  # a kill right after the checkpoint at step 6

    cfg = PretrainConfig(**common, out_dir=str(tmp_path / "b"))
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, eval_fn=interrupt, resume=False)
    resumed = pretrain(cfg, resume=True)
    for (name, p), q in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-6), name
    import csv
    rows = list(csv.DictReader(open(tmp_path / "a" / "metrics.csv")))
    losses = [float(r["loss"]) for r in rows if r.get("loss")]
    assert losses and all(torch.isfinite(torch.tensor(losses)))


def test_pretraining_time_budget_counts_across_resumes(tmp_path, monkeypatch):
    """A run stopped by its time budget, resumed, trains no further step (no fresh budget)."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = PretrainConfig(size="tiny", ae_steps=2, ae_batch=8, batch=8, steps=50, time_budget_minutes=1e-4,
                         out_dir=str(tmp_path / "run"))
    pretrain(cfg, resume=False)
    from flowopd_lib import checkpoint
    assert checkpoint.latest(tmp_path / "run" / "checkpoints").name == "step_0000001"
    pretrain(cfg, resume=True)
    assert checkpoint.latest(tmp_path / "run" / "checkpoints").name == "step_0000001"
    more = PretrainConfig(**{**cfg.to_dict(), "time_budget_minutes": 10.0, "steps": 3})
    pretrain(more, resume=True)  # a larger budget continues where the run stopped
    assert checkpoint.latest(tmp_path / "run" / "checkpoints").name == "step_0000003"


def test_pretraining_batch_feeds_the_model(tiny):
    images, captions = toy.pretraining_batch(8, seed=0)
    latents = tiny.encode_images(images)
    assert latents.shape == (8, *tiny.latent_shape)
    assert len(tiny.encode_prompts(captions)) == 8


def test_continued_pretraining_keeps_the_autoencoder_and_trains_the_flow(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    torch.manual_seed(0)
    start = ToyFlowModel("tiny")
    start.save(tmp_path / "start")
    cfg = PretrainConfig(size="tiny", ae_steps=10, batch=8, steps=3, init_from=str(tmp_path / "start"), seed=1,
                         out_dir=str(tmp_path / "more"))
    continued = pretrain(cfg, resume=False)
    before, after = start.state_dict(), continued.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("autoencoder.", "latent_")))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("transformer."))
    assert not (tmp_path / "more" / "autoencoder.pt").exists()  # no autoencoder phase ran
    with pytest.raises(ValueError, match="size='small'"):
        pretrain(PretrainConfig(size="small", init_from=str(tmp_path / "start"), out_dir=str(tmp_path / "x")))


def test_glyph_place_ids_count_from_the_centre_of_each_quoted_text(tiny):
    from flowopd_lib.models.toy import glyph_place_ids

    ids = tiny.tokenizer(['a sign that says "A7"', 'a sign that says "A"', "a photo of a red circle"])
    places = glyph_place_ids(tiny.tokenizer, ids)
    length = ids.shape[1]  # <bos> a sign that says " A 7 " <eos>: glyphs at 6 and 7
    assert places[0].tolist() == [0] * 6 + [length - 1, length + 1] + [0] * (length - 8)
    assert places[1].tolist() == [0] * 6 + [length] + [0] * (length - 7)  # a lone glyph sits at the centre
    assert places[2].abs().sum() == 0


def test_glyph_places_put_order_into_the_context_tokens():
    """With glyph places a glyph's token changes far more between first and second place than T5's
    relative positions alone change it (the first base: 1.7%)."""
    from flowopd_lib.diagnostics.ocr_errors import order_signal

    torch.manual_seed(0)
    without = ToyFlowModel("tiny", glyph_places=False)
    torch.manual_seed(0)
    with_places = ToyFlowModel("tiny")
    assert order_signal(with_places, n_pairs=10)["order"] > 3 * order_signal(without, n_pairs=10)["order"]
    # Built last: every other module starts as it would without glyph places.
    plain = without.state_dict()
    assert all(torch.equal(v, with_places.state_dict()[k]) for k, v in plain.items())


def test_a_model_saved_without_glyph_places_loads_without_them(tmp_path):
    torch.manual_seed(0)
    old = ToyFlowModel("tiny", glyph_places=False)
    old.save(tmp_path / "old")
    loaded = load_base(str(tmp_path / "old"))
    assert loaded.glyph_places is None and load_base("toy").glyph_places is None
    with torch.no_grad():
        assert torch.equal(old.text_embeddings(PROMPTS).tokens, loaded.text_embeddings(PROMPTS).tokens)
    loaded.add_glyph_places()
    assert loaded.glyph_places is not None and loaded.config()["glyph_places"]


def test_continued_pretraining_adds_glyph_places_to_a_model_without_them(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    torch.manual_seed(0)
    ToyFlowModel("tiny", glyph_places=False).save(tmp_path / "start")
    cfg = PretrainConfig(size="tiny", batch=8, steps=2, init_from=str(tmp_path / "start"), seed=1, out_dir=str(tmp_path / "more"))
    continued = pretrain(cfg, resume=False)
    assert load_base(str(tmp_path / "more" / "model")).glyph_places is not None
    assert continued.glyph_places is not None


def test_building_glyph_places_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    ToyFlowModel("tiny", glyph_places=False)
    after_plain = torch.rand(3)
    torch.manual_seed(0)
    ToyFlowModel("tiny")
    assert torch.equal(torch.rand(3), after_plain)

"""Cold start: merges of teacher adapters (exactness of the delta average) and SFT on teacher samples."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flowopd_lib import adapters, coldstart
from flowopd_lib.coldstart import SFTConfig, delta, merge, train_sft
from tiny import tiny_model


def with_teachers(ranks=(4, 4)):
    model = tiny_model()
    for i, r in enumerate(ranks):
        torch.manual_seed(10 + i)
        adapters.add(model, f"t{i}", rank=r, alpha=2.0 * r, gaussian_init=False)
    return model


def test_delta_average_equals_the_mean_of_the_deltas_exactly():
    model = with_teachers(ranks=(4, 2))
    merge(model, {"t0": 1.0, "t1": 1.0}, name="avg", method="delta")
    d0, d1, got = delta(model, "t0"), delta(model, "t1"), delta(model, "avg")
    assert got.keys() == d0.keys()
    for key in got:
        assert torch.allclose(got[key], (d0[key] + d1[key]) / 2, atol=1e-6)
    x = torch.randn(2, *model.latent_shape)
    e = model.encode_prompts(["a photo of a circle", ""])
    with torch.no_grad():
        with adapters.active(model, "avg"):
            merged_v = model.velocity(x, torch.tensor(0.4), e)
        base_v = adapters.view(model, None).velocity(x, torch.tensor(0.4), e)
    assert not torch.allclose(merged_v, base_v)


def test_factor_merge_is_the_released_factor_average_not_the_delta_average():
    model = with_teachers()
    merge(model, {"t0": 1.0, "t1": 1.0}, name="factor", method="factor")
    for (_, a0, b0, s), (_, a1, b1, _), (_, a, b, s_new) in zip(*(coldstart.lora_layers(model, n)
                                                                    for n in ("t0", "t1", "factor"))):
        assert torch.allclose(a, (a0 + a1) / 2) and torch.allclose(b, (b0 + b1) / 2) and s == s_new
    d = delta(model, "factor")
    mean = {k: (delta(model, "t0")[k] + delta(model, "t1")[k]) / 2 for k in d}
    assert any(not torch.allclose(d[k], mean[k], atol=1e-4) for k in d)
    with pytest.raises(ValueError, match="equal ranks"):
        merge(with_teachers(ranks=(4, 2)), {"t0": 1, "t1": 1}, method="factor")


def test_svd_at_full_rank_recovers_the_delta_average_and_peft_merges_run():
    model = with_teachers()
    merge(model, {"t0": 1.0, "t1": 1.0}, name="svd", method="svd", rank=8)
    d = delta(model, "svd")
    for key in d:
        assert torch.allclose(d[key], (delta(model, "t0")[key] + delta(model, "t1")[key]) / 2, atol=1e-5)
    for method in ("ties", "dare_linear", "dare_ties", "magnitude_prune"):
        merge(model, {"t0": 1.0, "t1": 1.0}, name=method, method=method, density=0.5)
        assert all(v.abs().sum() > 0 for v in delta(model, method).values())
    with pytest.raises(ValueError, match="unknown adapter"):
        merge(model, {"t0": 1.0, "nope": 1.0}, name="x")


def test_sft_fits_a_fresh_adapter_on_teacher_samples(tmp_path):
    model = with_teachers()
    teacher_dir = adapters.save(model, "t0", tmp_path / "t0")
    cfg = SFTConfig(teachers={"geneval": str(teacher_dir)}, datasets={"geneval": 8}, sample_steps=2, cfg_scale=3.0, steps=30,
                    batch=8, lr=1e-2, out_dir=str(tmp_path / "sft"))
    fresh = tiny_model()
    texts, x0 = coldstart.teacher_samples(_loaded(fresh, teacher_dir), cfg)
    assert len(texts) == 8 and x0.shape == (8, *fresh.latent_shape)
    train_sft(cfg, fresh)
    loss = [float(r["loss"]) for r in __import__("csv").DictReader(open(Path(cfg.out_dir) / "metrics.csv"))]
    assert loss[-1] < loss[0]
    assert (Path(cfg.out_dir) / "adapter" / adapters.WEIGHT_NAME).exists()


def _loaded(model, directory):
    adapters.load(model, directory, "teacher_geneval")
    return model


def test_teachers_on_different_layers_merge_as_zero_deltas_where_absent():
    model = tiny_model()
    torch.manual_seed(10)
    adapters.add(model, "attn_only", rank=4, alpha=8.0, gaussian_init=False)
    adapters.add(model, "attn_ff", rank=2, alpha=2.0, gaussian_init=False,
                 targets=adapters.LORA_TARGETS + adapters.FF_TARGETS)
    d_attn, d_ff = delta(model, "attn_only"), delta(model, "attn_ff")
    assert set(d_attn) < set(d_ff), "the test needs layers only the second adapter touches"
    for method in ("delta", "svd"):
        merge(model, {"attn_only": 1.0, "attn_ff": 1.0}, name=method, method=method, rank=6)
        got = delta(model, method)
        assert got.keys() == d_ff.keys()
        for key in got:
            expected = (d_attn.get(key, torch.zeros_like(d_ff[key])) + d_ff[key]) / 2
            assert torch.allclose(got[key], expected, atol=1e-5), (method, key)

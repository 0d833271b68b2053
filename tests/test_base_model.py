"""The shipped toy bases: they load, re-measuring each reproduces its recorded metrics, and the
glyph base's text conditioning knows glyph order while keeping headroom for RL (issue 36 B)."""
import json

import pytest

from flowopd_lib import evaluation, models
from flowopd_lib.diagnostics.ocr_errors import order_signal


@pytest.fixture(scope="module", params=sorted(models.BASES))
def shipped(request):
    config = json.loads((models.BASES[request.param] / "config.json").read_text())
    return request.param, models.load_base(request.param), config


def test_shipped_base_is_small_and_frozen(shipped):
    name, model, config = shipped
    size_mb = (models.BASES[name] / "model.safetensors").stat().st_size / 2 ** 20
    assert size_mb <= 20, f"shipped base {name} is {size_mb:.1f} MB"
    assert not any(p.requires_grad for p in model.parameters())
    assert {"metrics", "eval_protocol", "pretrain"} <= set(config)


def test_shipped_base_reproduces_its_recorded_metrics(shipped):
    name, model, config = shipped
    protocol = config["eval_protocol"]
    table = evaluation.evaluate({"base": model}, **protocol)
    for metric in ("geneval", "ocr", "pickscore", "pickscore_true", "deqa"):
        recorded, measured = config["metrics"][metric], table.loc["base", metric]
        tolerance = 0.1 if metric == "deqa" else 0.03  # deqa is on a 1-5 scale
        assert abs(measured - recorded) <= tolerance, f"{name} {metric}: recorded {recorded:.3f}, measured {measured:.3f}"


def test_glyph_base_encodes_glyph_order_where_the_first_base_did_not():
    # order: how far a glyph's context token moves between two places, relative to its size
    glyph = order_signal(models.load_base("toy_glyph"), n_pairs=50)["order"]
    first = order_signal(models.load_base("toy"), n_pairs=50)["order"]
    assert first < 0.05 and glyph > 0.3, f"order_signal: toy {first:.3f}, toy_glyph {glyph:.3f}"


def test_glyph_base_keeps_headroom_for_rl():
    # pass@8 - pass@1 at CFG 1 (the protocol): prompts the base solves on some draws, which RL can sharpen
    table = evaluation.headroom(models.load_base("toy_glyph"), tasks=("geneval", "ocr"), n_prompts=45,
                                samples_per_prompt=8, ks=(1, 8), steps=20, cfg_scale=1.0)
    for task in ("geneval", "ocr"):
        assert table.loc[task, "headroom"] >= 0.25, f"{task} headroom {table.loc[task, 'headroom']:.3f}"

"""diagnostics.ocr_errors: the error classes on analytic cases, the table's shares, and a small run."""
import pytest

from flowopd_lib.diagnostics import ocr_errors


@pytest.mark.parametrize("read, target, expected", [
    ("H6", "H6", "exact"), ("6H", "H6", "order"), ("T16", "176", "glyphs"), ("HH", "4H", "glyphs"),
    ("1E", "Y10", "count"), ("", "A", "count"), ("AAB", "ABA", "order"), ("AB", "AAB", "count")])
def test_error_class(read, target, expected):
    assert ocr_errors.error_class(read, target) == expected


def test_error_table_gives_shares_per_length_and_overall():
    table = ocr_errors.error_table({"m": ["AB", "BA", "X", "CD"]}, ["AB", "AB", "Y", "CDE"])
    assert table.loc[("m", "2"), ["exact", "order", "glyphs", "count", "n"]].tolist() == [0.5, 0.5, 0, 0, 2]
    assert table.loc[("m", "all"), "exact"] == 0.25 and table.loc[("m", "all"), "count"] == 0.25
    assert table.loc[("m", "all")][list(ocr_errors.CLASSES)].sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="m: 1 read texts for 2 targets"):
        ocr_errors.error_table({"m": ["A"]}, ["A", "B"])


def test_command_writes_table_and_figure(tmp_path, capsys):
    ocr_errors.main(["--prompts", "3", "--samples", "2", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "base" in out and "order signal of the text encoders" in out and "through the autoencoder" in out
    assert (tmp_path / "ocr_errors.png").stat().st_size > 0
    assert "exact" in (tmp_path / "ocr_errors.csv").read_text()


def test_order_signal_compares_a_glyph_in_two_places_with_two_glyphs_in_one():
    from flowopd_lib import models

    signal = ocr_errors.order_signal(models.load_base("toy"), n_pairs=5)
    assert set(signal) == {"order", "pooled_order", "glyph"}
    assert all(0 < v < 10 for v in signal.values())
    assert signal["glyph"] > signal["order"]  # a different glyph changes the token more than a move


def test_autoencoder_ceiling_reads_the_renders_back():
    from flowopd_lib import data, models

    prompts = data.prompts("ocr", 6, "test", 0)
    assert ocr_errors.autoencoder_ceiling(models.load_base("toy"), prompts) == 1.0


def test_zero_prompts_or_samples_are_refused_before_any_sampling(tmp_path, monkeypatch, capsys):
    """Issue 35 #8: `ocr_errors --prompts 0` loaded the model and sampled, then died in torch.cat."""
    from flowopd_lib import models
    from guards import refused

    monkeypatch.setattr(models, "load_base", lambda *args: pytest.fail("the model was loaded"))
    for bad in (["--prompts", "0"], ["--samples", "0"], ["--prompts", "-2"]):
        assert f"{bad[0]}: {bad[1]}" in refused(capsys, ocr_errors.main, bad)
    assert "no_adapter" in refused(capsys, ocr_errors.main, ["--adapter", str(tmp_path / "no_adapter")])

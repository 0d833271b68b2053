"""The update-cost benchmark runs end to end on a tiny model; its structure is checked, its timings are not
(they depend on the machine's load)."""
from flowopd_lib.diagnostics import bench


def test_bench_reports_every_trainer_the_ratio_and_forward_costs(monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    results = bench.main(["--base", "tiny", "--repeats", "2", "--prompts", "3", "--group-size", "2", "--steps", "2"])
    assert set(results["updates"]) == set(bench.TRAINERS)
    for trainer, u in results["updates"].items():
        assert set(bench.PHASES) <= set(u)
        for key in ("seconds", "per_sample"):
            assert set(u[key]) == {"median", "min", "max"} and 0 < u[key]["min"] <= u[key]["median"] <= u[key]["max"]
        assert abs(u["per_sample"]["median"] * 6 - u["seconds"]["median"]) < 1e-9  # 3 prompts x 2 samples
    ratio = results["ratio"]
    assert len(ratio["values"]) == 2 and ratio["min"] <= ratio["median"] <= ratio["max"] and ratio["min"] > 0
    assert set(results["forward"]) == {"base", "one teacher (folded)", "routed teachers (folded)",
                                       "routed teachers (peft mixed batch)"}
    assert all(seconds > 0 for seconds in results["forward"].values())
    out = capsys.readouterr().out
    assert "OPD / GRPO per update" in out and all(name in out for name in bench.TRAINERS)

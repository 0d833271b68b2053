"""The OPD-vs-GRPO update-cost benchmark runs end to end on a tiny model (its timings are not asserted)."""
from flowopd_lib.diagnostics import bench


def test_bench_reports_phases_ratio_and_forward_costs(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    results = bench.main(["--base", "tiny", "--updates", "1", "--prompts", "2", "--group-size", "2", "--steps", "2"])
    for trainer in ("grpo", "opd"):
        assert set(bench.PHASES) <= set(results[trainer]) and results[trainer]["total"] > 0
    assert results["ratio"]["opd_over_grpo"] > 0
    assert set(results["forward"]) == {"base", "one teacher", "routed teachers (mixed)"}
    assert all(seconds > 0 for seconds in results["forward"].values())

"""`make run`'s current job end to end at a tiny budget: a run directory with everything in it."""
import subprocess
import sys


def test_sanity_run_writes_a_complete_run_directory(tmp_path):
    out = tmp_path / "sanity"
    proc = subprocess.run([sys.executable, "-m", "flowopd_lib.sanity", "--steps", "300", "--out-dir", str(out)],
                          capture_output=True, text=True, env={"WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {"config.yaml", "provenance.json", "metrics.csv", "samples.png"} <= {p.name for p in out.iterdir()}
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert "loss_bin/0.0-0.2" in header and "mode_distance/sde" in header

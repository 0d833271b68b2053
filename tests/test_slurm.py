"""papermill_runs/slurm.sbatch on this machine, with stand-ins for Slurm and accelerate, and the
reward-server check it runs on each node before training (`server.check_servers` and its CLI).

The stand-ins are executables written to a temp dir put first on PATH: `srun` runs its command once
per simulated node, all at once, with SLURM_NODEID / SLURM_PROCID set to 0..N-1 (real srun under
--ntasks-per-node=1); `scontrol show hostnames` lists a comma-separated SLURM_JOB_NODELIST;
`accelerate` records its argv (one file per call) and exits. So the template's shell runs for real
and what each node would have launched can be read back."""
import contextlib
import http.server
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from flowopd_lib.rewards.real import RewardServerError
from flowopd_lib.rewards.real import server
from flowopd_lib.rewards.real.stub import serve
from test_real_rewards import FakeClock

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = "papermill_runs/slurm.sbatch"
NODES = ("gpu-a", "gpu-b")

SRUN = r"""#!/bin/bash
# Stand-in srun: options (all written --name=value by the template) are skipped; the command runs
# once per node of SLURM_NNODES, concurrently, each with its node's Slurm variables.
while [[ "${1:-}" == -* ]]; do shift; done
IFS=, read -ra names <<< "$SLURM_JOB_NODELIST"
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
  SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 SLURMD_NODENAME=${names[node]} "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""

SCONTROL = r"""#!/bin/bash
# Stand-in `scontrol show hostnames LIST`: a comma-separated list, one name a line.
[[ "$1 $2" == "show hostnames" ]] || { echo "stub scontrol: unexpected $*" >&2; exit 2; }
tr , '\n' <<< "$3"
"""

ACCELERATE = r"""#!/bin/bash
# Stand-in accelerate: records its argv, one argument a line, in a new file per call.
printf '%s\n' "$@" > "$(mktemp "$STUB_RECORD/accelerate.XXXXXX")"
"""


@pytest.fixture
def slurm(tmp_path):
    """Runs the template under the stand-ins: slurm(stage, config, **env) -> CompletedProcess.
    `slurm.launches()` reads back what each node passed to accelerate."""
    bin_dir, record = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir()
    record.mkdir()
    for name, text in {"srun": SRUN, "scontrol": SCONTROL, "accelerate": ACCELERATE}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    # no Slurm, reward-server or rendezvous settings leak in from the machine running the tests
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("SLURM_", "FLOWOPD_")) and k not in ("MASTER_PORT", "MASTER_ADDR", "GPUS_PER_NODE")}

    def run(stage, config, **env):
        env = {**clean, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin", "STUB_RECORD": str(record),
               "SLURM_NNODES": str(len(NODES)), "SLURM_JOB_NODELIST": ",".join(NODES), "SLURM_JOB_ID": "4242",
               "SLURM_SUBMIT_DIR": str(tmp_path),
               "SLURM_NODEID": "0", "SLURM_PROCID": "0",  # the batch shell runs on the first node, as task 0
               **env}
        return subprocess.run(["bash", TEMPLATE, stage, str(config)], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)

    def launches() -> list[dict]:
        return [parse_launch(path.read_text().splitlines()) for path in sorted(record.glob("accelerate.*"))]

    run.launches = launches
    return run


def parse_launch(argv: list[str]) -> dict:
    """`accelerate launch --key value ... -m module args` -> {key: value, "module": [module, args...]}."""
    assert argv[0] == "launch", argv
    options, rest = {}, argv[1:]
    while rest[0] != "-m":
        key, value, *rest = rest
        options[key.removeprefix("--")] = value
    return {**options, "module": rest[1:]}


def write_config(path: Path, **values) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def test_each_node_launches_with_its_own_machine_rank(slurm, tmp_path):
    config = write_config(tmp_path / "some.yaml", updates=3)  # opd: no reward server to check
    done = slurm("opd", config)
    assert done.returncode == 0, done.stderr
    launches = slurm.launches()
    assert sorted(launch["machine_rank"] for launch in launches) == ["0", "1"]
    for launch in launches:
        assert launch["num_machines"] == "2" and launch["num_processes"] == "16"
        assert launch["main_process_ip"] == NODES[0] and launch["main_process_port"] == "29500"
        assert launch["config_file"] == "papermill_runs/accelerate/multi_gpu.yaml"
        assert launch["module"] == ["flowopd_lib.train", "opd", str(config)]


def test_master_port_and_gpus_per_node_are_overridable(slurm, tmp_path):
    done = slurm("opd", write_config(tmp_path / "some.yaml"), MASTER_PORT="31337", GPUS_PER_NODE="4")
    assert done.returncode == 0, done.stderr
    assert {(launch["main_process_port"], launch["num_processes"]) for launch in slurm.launches()} == {("31337", "8")}


def test_a_dead_reward_server_stops_every_node_before_training(slurm, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    config = write_config(tmp_path / "teacher.yaml", rewards={"geneval_server": 1.0})
    done = slurm("grpo", config, FLOWOPD_GENEVAL_URL=url)
    assert done.returncode != 0 and slurm.launches() == []
    errors = [line for line in done.stderr.splitlines() if url in line]
    assert len(errors) == len(NODES)  # each node says it, in one line naming the variable to set
    assert all("FLOWOPD_GENEVAL_URL" in line for line in errors)


def test_a_shared_reward_server_that_answers_lets_training_start(slurm, tmp_path):
    config = write_config(tmp_path / "teacher.yaml", rewards={"deqa_server": 0.4, "pickscore_v1": 0.6})
    with loopback(status=405) as url:  # Flask's answer to a GET on Flow-GRPO's POST-only servers
        done = slurm("grpo", config, FLOWOPD_DEQA_URL=url)
    assert done.returncode == 0, done.stderr
    assert sorted(launch["machine_rank"] for launch in slurm.launches()) == ["0", "1"]


def test_reward_server_hook_runs_on_each_node_and_is_stopped_after_training(slurm, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    hook = f'echo $$ > {marks}/pid.$SLURM_NODEID; echo "serving on $SLURMD_NODENAME"; exec sleep 300'
    done = slurm("opd", write_config(tmp_path / "some.yaml"), FLOWOPD_REWARD_SERVER_CMD=hook)
    assert done.returncode == 0, done.stderr
    assert len(slurm.launches()) == len(NODES)
    pids = [int((marks / f"pid.{node}").read_text()) for node in range(len(NODES))]
    try:
        for node, name in enumerate(NODES):
            log = tmp_path / f"reward-servers-4242-node{node}.log"
            assert log.read_text().strip() == f"serving on {name}"
        assert all(gone(pid) for pid in pids), "the template left a node's reward servers running"
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# ----------------------------------------------------------------------------- check_servers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def loopback(status: int, port: int = 0):
    """A loopback HTTP server answering every GET with `status`; yields its URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_check_servers_passes_servers_that_answer():
    stub = serve(lambda request: (200, pickle.dumps({})))  # answers a GET 501: it is up, POST-only
    try:
        with loopback(status=405) as flask_like:
            server.check_servers({"FLOWOPD_GENEVAL_URL": flask_like,
                                  "FLOWOPD_DEQA_URL": f"http://127.0.0.1:{stub.server_address[1]}"})
    finally:
        stub.shutdown()
        stub.server_close()


def test_check_servers_names_the_url_and_the_variable_of_a_dead_one():
    url = f"http://127.0.0.1:{free_port()}"
    with loopback(status=405) as alive:
        with pytest.raises(RewardServerError) as raised:
            server.check_servers({"FLOWOPD_GENEVAL_URL": alive, "FLOWOPD_DEQA_URL": url})
    message = str(raised.value)
    assert "\n" not in message and url in message and "FLOWOPD_DEQA_URL" in message and alive not in message


def test_check_servers_counts_a_proxy_without_backend_as_down():
    with loopback(status=503) as url:
        with pytest.raises(RewardServerError, match=f"{url}.*HTTP 503.*FLOWOPD_DEQA_URL"):
            server.check_servers({"FLOWOPD_DEQA_URL": url})


def test_check_servers_waits_for_a_server_that_is_starting():
    port, clock = free_port(), FakeClock()
    with contextlib.ExitStack() as servers:

        def sleep(seconds):  # the server comes up during the second pause
            clock.sleep(seconds)
            if len(clock.sleeps) == 2:
                servers.enter_context(loopback(status=405, port=port))

        server.check_servers({"FLOWOPD_GENEVAL_URL": f"http://127.0.0.1:{port}"}, wait=600, clock=clock, sleep=sleep)
    assert len(clock.sleeps) == 2 and clock.now < 600


def test_check_servers_gives_up_after_the_wait():
    url, clock = f"http://127.0.0.1:{free_port()}", FakeClock()
    with pytest.raises(RewardServerError, match=f"{url}.*after 60 s.*FLOWOPD_GENEVAL_URL"):
        server.check_servers({"FLOWOPD_GENEVAL_URL": url}, wait=60, clock=clock, sleep=clock.sleep)
    assert clock.now == 60 and len(clock.sleeps) > 1


def test_check_cli_checks_the_servers_a_config_names(tmp_path, monkeypatch, capsys):
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("FLOWOPD_GENEVAL_URL", dead)
    monkeypatch.setenv("FLOWOPD_DEQA_URL", dead)
    assert server.servers_needed({"rewards": {"rapidocr": 1.0}}) == {}
    assert server.servers_needed({}) == {}  # OPD, or the toy default reward
    opd = write_config(tmp_path / "opd.yaml", teachers={"ocr": "x"})
    assert server.main(["--check", str(opd)]) == 0
    assert "no reward server" in capsys.readouterr().out
    with loopback(status=405) as alive:
        monkeypatch.setenv("FLOWOPD_DEQA_URL", alive)
        deqa = write_config(tmp_path / "deqa.yaml", rewards={"deqa_server": 0.4, "pickscore_v1": 0.6})
        assert server.servers_needed({"rewards": {"deqa_server": 1}}) == {"FLOWOPD_DEQA_URL": alive}
        assert server.main(["--check", str(deqa)]) == 0
        assert alive in capsys.readouterr().out
        geneval = write_config(tmp_path / "geneval.yaml", rewards={"geneval_server": 1.0})
        assert server.main(["--check", str(geneval)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and dead in err and "FLOWOPD_GENEVAL_URL" in err
    assert server.main(["--check", str(tmp_path / "missing.yaml")]) == 1
    assert "shared filesystem" in capsys.readouterr().err


# ----------------------------------------------------------------------------- helpers

def gone(pid: int, patience: float = 30.0) -> bool:
    """Whether process `pid` has exited (a SIGTERM'd process takes a moment to go; `patience` is a
    generous bound, not a speed requirement)."""
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z":
                return True  # exited, waiting for its parent to collect it
        time.sleep(0.1)
    return False

"""Config validation and YAML round-trips; run directories, metrics.csv and offline wandb."""
import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from flowopd_lib.config import Config, ConfigError, param
from flowopd_lib.tracking import MetricsCSV, Run, seed_everything


@dataclasses.dataclass
class Inner(Config):
    rank: int = param(8, "LoRA rank", range=(1, 512))


@dataclasses.dataclass
class Example(Config):
    lr: float = param(3e-4, "learning rate", range=(0, 1))
    objective: str = param("kl", "training objective", choices=("kl", "pg_detached"))
    weights: dict = param(default_factory=lambda: {"geneval": 1.0}, help="reward weights")
    steps: tuple = param((1, 2), "steps")
    lora: Inner = param(default_factory=Inner, help="adapter settings")
    max_len: int | None = param(None, "optional cap", range=(1, None))

    def check(self):
        if self.objective == "pg_detached" and self.lr > 0.1:
            raise ConfigError(f"Example.lr={self.lr} is too large for objective='pg_detached'; use <= 0.1")


def test_validation_names_field_value_and_allowed_range():
    with pytest.raises(ConfigError, match=r"Example.lr=2.0 is out of range; allowed: \[0, 1\]"):
        Example(lr=2.0)
    with pytest.raises(ConfigError, match=r"Example.objective='ppo' is not allowed; choose one of \['kl', 'pg_detached'\]"):
        Example(objective="ppo")
    with pytest.raises(ConfigError, match=r"Inner.rank=0"):
        Example.from_dict({"lora": {"rank": 0}})
    with pytest.raises(ConfigError, match="too large"):
        Example(objective="pg_detached", lr=0.5)
    with pytest.raises(ConfigError, match=r"Example.max_len=0"):
        Example(max_len=0)


def test_unknown_keys_are_an_error_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown Example key\(s\): 'learning_rat'|'lr_'"):
        Example.from_dict({"lr_": 0.1})
    with pytest.raises(ConfigError, match="did you mean 'objective'"):
        Example.from_dict({"objectve": "kl"})


def test_yaml_round_trip_and_coercion(tmp_path):
    cfg = Example(lr=1e-3, weights={"ocr": 0.5}, lora=Inner(rank=4), steps=(3, 4))
    path = tmp_path / "c.yaml"
    cfg.to_yaml(path)
    assert Example.from_yaml(path) == cfg
    (tmp_path / "d.yaml").write_text("lr: 3e-4\nsteps: [5, 6]\nlora: {rank: 16}\n")  # YAML reads 3e-4 as a string
    loaded = Example.from_yaml(tmp_path / "d.yaml")
    assert loaded.lr == 3e-4 and loaded.steps == (5, 6) and loaded.lora.rank == 16
    assert cfg.replace(lr=0.5).lr == 0.5
    with pytest.raises(ConfigError):
        cfg.replace(lr=-1.0)
    assert "lr = 0.0003: learning rate [0, 1]" in Example.help()


@dataclasses.dataclass
class Typed(Config):
    lr: float = param(3e-4, "learning rate", range=(0, 1))
    steps: int = param(10, "steps", range=(1, None))
    on: bool = param(False, "a switch")
    name: str = param("x", "a name")
    budget: float | None = param(None, "minutes", range=(0, None))
    weights: dict[str, float] = param(default_factory=lambda: {"geneval": 1.0}, help="reward weights")
    counts: tuple[int, ...] = param((1, 2), "counts")
    anything: dict = param(default_factory=dict, help="a bare dict: any values")


@pytest.mark.parametrize("values, message", [
    ({"lr": "fast"}, r"^Typed.lr='fast' is not a float$"),
    ({"lr": True}, r"^Typed.lr=True is not a float$"),
    ({"lr": float("nan")}, r"^Typed.lr=nan is not a finite float \(NaN and inf are not allowed\)$"),
    ({"lr": "inf"}, r"^Typed.lr='inf' is not a finite float"),
    ({"steps": 2.5}, r"^Typed.steps=2.5 is not an int$"),
    ({"steps": True}, r"^Typed.steps=True is not an int$"),
    ({"steps": 3.0}, r"^Typed.steps=3.0 is not an int \(write 3, without a decimal point\)$"),
    ({"steps": "3"}, r"^Typed.steps='3' is not an int$"),
    ({"on": "yes"}, r"^Typed.on='yes' is not a bool"),
    ({"name": 3}, r"^Typed.name=3 is not a str$"),
    ({"budget": "soon"}, r"^Typed.budget='soon' is not a float or None$"),
    ({"budget": float("inf")}, r"^Typed.budget=inf is not a finite float or None \(NaN and inf"),
    ({"weights": {"geneval": "x"}}, r"^Typed.weights\['geneval'\]='x' is not a float$"),
    ({"weights": {"ocr": float("nan")}}, r"^Typed.weights\['ocr'\]=nan is not a finite float"),
    ({"weights": {1: 1.0}}, r"^Typed.weights key=1 is not a str \(the keys of a dict of str -> float\)$"),
    ({"weights": ["geneval"]}, r"^Typed.weights=\['geneval'\] is not a dict of str -> float$"),
    ({"counts": [1, 2.5]}, r"^Typed.counts\[1\]=2.5 is not an int$"),
    ({"anything": 3}, r"^Typed.anything=3 is not a dict$"),
])
def test_values_are_checked_against_the_declared_type(values, message):
    with pytest.raises(ConfigError, match=message):
        Typed.from_dict(values)


def test_declared_types_accept_what_yaml_and_notebooks_write(tmp_path):
    cfg = Typed(lr=1, steps=np.int64(3), budget="2.5", weights={"geneval": 3, "ocr": "1e-1"}, counts=[4, 5],
                name=tmp_path, anything={"a": "b"})
    assert type(cfg.lr) is float and cfg.lr == 1.0 and type(cfg.steps) is int and cfg.budget == 2.5
    assert cfg.weights == {"geneval": 3.0, "ocr": 0.1} and all(type(w) is float for w in cfg.weights.values())
    assert cfg.counts == (4, 5) and cfg.name == str(tmp_path) and cfg.anything == {"a": "b"}
    cfg.to_yaml(tmp_path / "t.yaml")
    assert Typed.from_yaml(tmp_path / "t.yaml") == cfg
    assert Typed(budget=None).budget is None


def test_shipped_configs_defaults_pass_their_own_types(tmp_path):
    from flowopd_lib.coldstart import SFTConfig
    from flowopd_lib.grpo import GRPOConfig
    from flowopd_lib.opd import OPDConfig
    from flowopd_lib.pretrain import PretrainConfig
    from flowopd_lib.sanity import SanityConfig

    teachers = {"geneval": "a", "ocr": "b", "pickscore": "c"}
    for cfg in (SanityConfig(), PretrainConfig(), GRPOConfig(), OPDConfig(teachers=teachers), SFTConfig(teachers=teachers)):
        cfg.to_yaml(tmp_path / "c.yaml")
        assert type(cfg).from_yaml(tmp_path / "c.yaml") == cfg
    with pytest.raises(ConfigError, match=r"^GRPOConfig.lr='fast' is not a float$"):
        GRPOConfig(lr="fast")
    with pytest.raises(ConfigError, match=r"^GRPOConfig.group_size=2.5 is not an int$"):
        GRPOConfig(group_size=2.5)
    with pytest.raises(ConfigError, match=r"^GRPOConfig.noise_level=nan is not a finite float"):
        GRPOConfig(noise_level=float("nan"))
    with pytest.raises(ConfigError, match=r"^GRPOConfig.micro_batch=2.5 is not an int or None$"):
        GRPOConfig(micro_batch=2.5)
    with pytest.raises(ConfigError, match=r"^SFTConfig.datasets\['geneval'\]=8.5 is not an int$"):
        SFTConfig(teachers=teachers, datasets={"geneval": 8.5})


@pytest.mark.parametrize("cls_name, field", [("GRPOConfig", "rewards"), ("GRPOConfig", "datasets"),
                                             ("OPDConfig", "datasets"), ("OPDConfig", "soft_weights")])
def test_weight_and_ratio_dicts_hold_finite_numbers(cls_name, field):
    """A reward weight or a dataset ratio of "x" (or NaN) must be refused when the config is built,
    naming the entry, not fail later inside the trainer's arithmetic."""
    from flowopd_lib.grpo import GRPOConfig
    from flowopd_lib.opd import OPDConfig

    cls = {"GRPOConfig": GRPOConfig, "OPDConfig": OPDConfig}[cls_name]
    extra = {"teachers": {"geneval": "a", "ocr": "b", "pickscore": "c"}} if cls is OPDConfig else {}
    for bad in ("x", float("nan")):
        try:
            cls(**{**extra, field: {"geneval": bad}})
        except ConfigError as err:
            assert f"{cls_name}.{field}['geneval']={bad!r} is not" in str(err), str(err)
        except Exception as err:  # e.g. a TypeError from the trainer's check() comparing "x" with 0
            raise AssertionError(f"{type(err).__name__}: {err}, not a ConfigError naming the entry") from err
        else:
            raise AssertionError(f"{cls_name}.{field}={{'geneval': {bad!r}}} was accepted")


def test_metrics_csv_grows_its_header(tmp_path):
    m = MetricsCSV(tmp_path / "metrics.csv")
    m.append({"step": 1, "loss": 0.5})
    m.append({"step": 2, "loss": 0.4, "reward/ocr": 0.3})
    rows = MetricsCSV(tmp_path / "metrics.csv").read()
    assert [r["loss"] for r in rows] == ["0.5", "0.4"] and rows[0]["reward/ocr"] == "" and rows[1]["reward/ocr"] == "0.3"


def test_run_directory_contents_and_offline_wandb(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the default must be offline, never online
    monkeypatch.setenv("WANDB_SILENT", "true")
    with Run(tmp_path / "run", Example(), name="t") as run:
        run.log({"loss": torch.tensor(0.25)}, step=1)
        run.log({"loss": 0.125, "reward/geneval": 0.5}, step=2)
    d = tmp_path / "run"
    assert Example.from_yaml(d / "config.yaml") == Example()
    prov = json.loads((d / "provenance.json").read_text())
    assert prov["packages"]["torch"].startswith("2.") and "commit" in prov["git"]
    rows = MetricsCSV(d / "metrics.csv").read()
    assert [float(r["loss"]) for r in rows] == [0.25, 0.125]
    assert list((d / "wandb").glob("offline-run-*")), "wandb must write an offline run by default"
    with pytest.raises(FileExistsError, match="resume=True"):
        Run(d, Example(), use_wandb=False)
    with Run(d, Example(), use_wandb=False, resume=True) as run:
        run.log({"loss": 0.1}, step=3)
    assert len(MetricsCSV(d / "metrics.csv").read()) == 3


def test_seed_everything_is_reproducible():
    seed_everything(7); a = torch.randn(3)  # noqa: E702
    seed_everything(7); b = torch.randn(3)  # noqa: E702
    assert torch.equal(a, b)


def test_import_is_lazy():
    """The core imports without diffusers, transformers or wandb (how long it takes depends on the
    machine's load, so it is not asserted here)."""
    code = ("import sys; import flowopd_lib; from flowopd_lib import flow, config, tracking; "
            "print(any(m in sys.modules for m in ('diffusers', 'transformers', 'wandb')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "False", "diffusers/transformers/wandb must not be imported eagerly"


def test_a_resumed_run_drops_the_rows_logged_after_its_checkpoint(tmp_path):
    """Rows past the checkpoint are logged again by the resumed run: kept, they would appear twice."""
    from flowopd_lib.tracking import Run

    with Run(tmp_path, use_wandb=False) as run:
        for step in (1, 2, 3, 4):
            run.log({"loss": float(step)}, step=step)
    with Run(tmp_path, use_wandb=False, resume=True, resumed_step=2) as run:
        run.log({"loss": 30.0}, step=3)
    rows = Run(tmp_path, use_wandb=False, resume=True).metrics.read()
    assert [(r["step"], r["loss"]) for r in rows] == [("1", "1.0"), ("2", "2.0"), ("3", "30.0")]

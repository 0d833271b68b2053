"""LoRA adapters on the shared frozen base: teachers, merges and students are small named adapters.

Every trained model in the study is a peft LoRA adapter on the base's `SD3Transformer2DModel`,
attached through diffusers' own adapter API, so one base in memory serves many adapters and the
saved files are the format diffusers pipelines load (`load_lora_adapter` / `load_lora_weights`).

    adapters.add(model, "geneval", rank=8, seed=0)  # new trainable adapter (made active), init from (seed, name)
    with adapters.active(model, "ocr"): ...        # forward through one adapter
    with adapters.active(model, None): ...         # the base: all adapters off (GRPO's reference)
    with adapters.mixed(model, ["ocr", "geneval", None, ...]): ...  # each sample its own adapter
    with torch.no_grad(), adapters.folded(model, "ocr"): ...  # one adapter at the base's cost (labels)
    adapters.save(model, "geneval", "runs/teachers/geneval")
    adapters.load(model, "runs/teachers/geneval", "geneval")
    evaluate({"base": adapters.view(model, None), "geneval": adapters.view(model, "geneval")})
"""
from __future__ import annotations

import json
import math
import warnings
import zlib
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import torch

from .precision import float32_trainables
from .safe_files import FileError, check_safetensors, read_json_object

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' file name for LoRA weights
PEFT_CONFIG_NAME, PEFT_WEIGHT_NAME = "adapter_config.json", "adapter_model.safetensors"  # peft's folder
# Flow-GRPO's LoRA targets on SD3: attention q/k/v/out of the image stream and of the text stream.
LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
# The feed-forward layers of both streams: more capacity where attention-only LoRA is too little
# (the toy OCR teacher's render cold start, docs/teachers.md).
FF_TARGETS = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
TARGET_SETS = {"attention": LORA_TARGETS, "attention+ff": LORA_TARGETS + FF_TARGETS}
BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


def names(model) -> list[str]:
    """Adapters attached to the model's transformer."""
    config = getattr(model.transformer, "peft_config", None) or {}
    return list(config)


def _check(model, name: str) -> None:
    if name not in names(model):
        raise ValueError(f"unknown adapter {name!r}; the model has {names(model) or 'no adapters'}")


def add(model, name: str, rank: int = 8, alpha: float | None = None, targets=LORA_TARGETS,
        gaussian_init: bool = True, seed: int | None = None) -> list[torch.nn.Parameter]:
    """Attach a new LoRA adapter (zero delta at start unless `gaussian_init=False`) and make it the
    active one; returns its trainable parameters, float32 whatever the base's dtype.

    With `seed`, the initial weights derive from (seed, name) alone and the global torch RNG is left
    as it was: two runs of one config, and every rank of a multi-process run, start from the same
    adapter. Without it peft draws them from the global RNG (whatever state it happens to be in)."""
    from peft import LoraConfig

    if name in names(model):
        raise ValueError(f"adapter {name!r} already exists; delete it first or pick another name")
    if name == BASE:
        raise ValueError(f"{BASE!r} is reserved for the base model")
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=list(targets),
                        init_lora_weights="gaussian" if gaussian_init else False)
    with warnings.catch_warnings(), _global_rng_kept(seed is not None, next(model.transformer.parameters()).device):
        # peft warns that the model already has adapters: that is the design
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        model.transformer.add_adapter(config, adapter_name=name)
    model.transformer.set_adapter(name)
    if seed is not None:
        seeded_init(model, name, seed, gaussian_init)
    # float32 on a bf16 base too (peft casts a new adapter to its layer's dtype): precision.py
    return float32_trainables(parameters(model, name, trainable=True))


@contextmanager
def _global_rng_kept(keep: bool, device):
    """Restore the global torch RNGs afterwards (peft's layer construction draws from them): the
    CPU's and the model's own device's only (precision.rng_kept)."""
    if not keep:
        yield
        return
    from .precision import rng_kept

    with rng_kept(device):
        yield


def seeded_init(model, name: str, seed: int, gaussian: bool = True) -> None:
    """Re-draw adapter `name`'s initial weights from generators seeded by (seed, parameter name).

    gaussian: peft's init_lora_weights="gaussian" (lora_A ~ N(0, 1/r), lora_B = 0, a zero delta);
    otherwise nn.Linear's default kaiming-uniform for both (a random delta, peft's init=False).
    Drawn on the CPU and copied, so a GPU run starts from the same weights as a CPU run."""
    rank = model.transformer.peft_config[name].r
    with torch.no_grad():
        for pname, p in model.transformer.named_parameters():
            if f".{name}." not in pname or "lora_" not in pname:
                continue
            g = torch.Generator().manual_seed(_param_seed(seed, pname))
            value = torch.empty(p.shape, dtype=torch.float32)
            if not gaussian:
                torch.nn.init.kaiming_uniform_(value, a=math.sqrt(5), generator=g)
            elif "lora_A" in pname:
                torch.nn.init.normal_(value, std=1 / rank, generator=g)
            else:
                value.zero_()
            p.copy_(value)


def _param_seed(seed: int, pname: str) -> int:
    """A 63-bit seed from the run's seed and the parameter's name (which contains the adapter's)."""
    state = np.random.SeedSequence([seed % 2 ** 64, zlib.crc32(pname.encode())]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def named_parameters(model, name: str) -> list[tuple[str, torch.nn.Parameter]]:
    """(parameter name, parameter) of one adapter's LoRA weights, in a fixed order."""
    _check(model, name)
    return [(n, p) for n, p in model.transformer.named_parameters() if f".{name}." in n and "lora_" in n]


def parameters(model, name: str, trainable: bool | None = None) -> list[torch.nn.Parameter]:
    """The LoRA parameters of one adapter, in a fixed order; optionally set requires_grad."""
    params = [p for _, p in named_parameters(model, name)]
    if trainable is not None:
        for p in params:
            p.requires_grad_(trainable)
    return params


def state_dict(model, name: str) -> dict[str, torch.Tensor]:
    """Detached copies of one adapter's weights keyed by parameter name (checkpoints, merges)."""
    _check(model, name)
    return {n: p.detach().clone() for n, p in model.transformer.named_parameters()
            if f".{name}." in n and "lora_" in n}


def load_state_dict(model, name: str, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.transformer.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise KeyError(f"adapter state has unknown keys, e.g. {missing[:3]}")
    with torch.no_grad():
        for n, value in state.items():
            params[n].copy_(value)


def delete(model, name: str) -> None:
    _check(model, name)
    model.transformer.delete_adapters(name)


@contextmanager
def active(model, name: str | None):
    """Run the transformer through one adapter (None = the base, all adapters disabled); restores
    the previously active adapters afterwards."""
    transformer = model.transformer
    previous = list(transformer.active_adapters()) if names(model) else []
    try:
        if name is None:
            if names(model):
                transformer.disable_adapters()
        else:
            _check(model, name)
            transformer.enable_adapters()
            transformer.set_adapter(name)
        yield
    finally:
        if names(model):
            transformer.enable_adapters()
            if previous:
                transformer.set_adapter(previous if len(previous) > 1 else previous[0])


@contextmanager
def mixed(model, per_sample: list[str | None]):
    """Each sample of the next forwards runs through its own adapter (None = base), in one batch.

    Uses peft's per-sample adapter routing (its pre-forward hook, which also works in train mode:
    each adapter gets gradients from its own samples only). With CFG the batch is [uncond; cond],
    so pass the list twice. One name for every sample is a plain adapter switch (`active`): peft's
    per-sample routing would only add its gather/scatter per LoRA layer."""
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.lora.model import _adapter_names_pre_forward_hook

    if len(set(per_sample)) == 1:
        with active(model, per_sample[0]):
            yield
        return
    routed = [BASE if n is None else n for n in per_sample]
    for n in set(routed) - {BASE}:
        _check(model, n)
    transformer = model.transformer
    previous = list(transformer.active_adapters())
    transformer.enable_adapters()
    transformer.set_adapter(sorted(set(routed) - {BASE}) or previous)
    hook = partial(_adapter_names_pre_forward_hook, adapter_names=routed)
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True)
               for m in transformer.modules() if isinstance(m, LoraLayer)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        transformer.set_adapter(previous if len(previous) > 1 else previous[0])


def _lora_layers(model, name: str) -> list:
    from peft.tuners.lora.layer import LoraLayer

    return [m for m in model.transformer.modules() if isinstance(m, LoraLayer) and name in m.lora_A]


def foldable(model, name: str, layers: list | None = None) -> bool:
    """Whether `folded` folds adapter `name`: plain LoRA on float32 Linear layers (no DoRA or other
    variant, no LoRA bias). In bf16/fp16, W + s B A rounded to the weights' precision would lose most
    of the small delta, so those run the adapter unfolded."""
    from peft.tuners.lora.layer import Linear

    _check(model, name)
    return all(isinstance(m, Linear) and m.base_layer.weight.dtype == torch.float32 and name not in m.lora_variant
               and m.lora_B[name].bias is None for m in (layers if layers is not None else _lora_layers(model, name)))


@contextmanager
def folded(model, name: str | None):
    """Forwards without gradient through one adapter (None = the base) with its LoRA delta folded
    into the base weights, W + s B A: one matmul per layer, so an adapter's forward costs what the
    base's does (a frozen teacher's labels in OPD). The same function as `active(model, name)` up to
    float rounding (as in eval mode: LoRA dropout off). The base weights are put back as they were
    (the original tensors, nothing subtracted: repeated folds never drift). Where the adapter is not
    `foldable` (e.g. bf16 weights) it runs unfolded, exactly as `active`."""
    if torch.is_grad_enabled():
        raise RuntimeError("adapters.folded is for forwards without gradient (labels): use it under "
                           "torch.no_grad(); train through adapters.active")
    layers = _lora_layers(model, name) if name is not None else []
    if name is None or not foldable(model, name, layers):
        with active(model, name):
            yield
        return
    saved = []
    try:
        for m in layers:
            weight = m.base_layer.weight
            saved.append((weight, weight.data))
            weight.data = weight.data + m.get_delta_weight(name).to(weight.dtype)
        with active(model, None):
            yield
    finally:
        for weight, data in saved:
            weight.data = data


def save(model, name: str, directory: str | Path, metadata: dict | None = None) -> Path:
    """Write the adapter in SD3 pipelines' LoRA format (+ `adapter.json`: its config and metadata).

    `StableDiffusion3Pipeline.load_lora_weights(directory)` loads it. The LoraConfig goes into the
    file's metadata: without it diffusers assumes lora_alpha = r on loading, silently rescaling the
    adapter. (`transformer.save_lora_adapter` keeps the metadata but drops the "transformer."
    key prefix that pipelines look for.) The writer is SD3LoraLoaderMixin's, which the pipeline
    inherits: importing the pipeline itself pulls in its IP-adapter image processors."""
    from diffusers.loaders.lora_pipeline import SD3LoraLoaderMixin
    from peft import get_peft_model_state_dict

    _check(model, name)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    SD3LoraLoaderMixin.save_lora_weights(
        directory, transformer_lora_layers=get_peft_model_state_dict(model.transformer, adapter_name=name),
        transformer_lora_adapter_metadata=model.transformer.peft_config[name].to_dict(), weight_name=WEIGHT_NAME)
    config = model.transformer.peft_config[name]
    info = {"name": name, "rank": config.r, "alpha": config.lora_alpha,
            "targets": sorted(config.target_modules), **(metadata or {})}
    (directory / "adapter.json").write_text(json.dumps(info, indent=1, default=str))
    return directory


def load(model, directory: str | Path, name: str | None = None) -> str:
    """Load an adapter under `name` and return the name: one saved by `save` (or any diffusers LoRA
    file), or a peft folder (adapter_config.json + adapter_model.safetensors), the format of
    Flow-GRPO's released LoRAs (`jieliu/SD3.5M-FlowGRPO-GenEval`, `-Text`, `-PickScore`)."""
    directory = Path(directory)
    check_folder(directory)
    if (directory / PEFT_CONFIG_NAME).exists() and not (directory / WEIGHT_NAME).exists():
        return load_peft_folder(model, directory, name or directory.name)
    if name is None:
        recorded = metadata(directory) if (directory / "adapter.json").exists() else {}
        name = recorded.get("name", directory.name)
    if name in names(model):
        raise ValueError(f"adapter {name!r} already exists; delete it first or pick another name")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        model.transformer.load_lora_adapter(str(directory), weight_name=WEIGHT_NAME, adapter_name=name,
                                            prefix="transformer")
    parameters(model, name, trainable=False)
    return name


def load_peft_folder(model, directory: Path, name: str) -> str:
    """A folder written by peft's `PeftModel.save_pretrained` on the transformer (what
    `PeftModel.from_pretrained(pipeline.transformer, directory)` loads) as the adapter `name`."""
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    if name in names(model):
        raise ValueError(f"adapter {name!r} already exists; delete it first or pick another name")
    config = LoraConfig.from_pretrained(str(directory))
    model.transformer.add_adapter(config, adapter_name=name)
    state = load_file(directory / PEFT_WEIGHT_NAME)
    state = {k.removeprefix("base_model.model."): v for k, v in state.items()}
    result = set_peft_model_state_dict(model.transformer, state, adapter_name=name)
    if getattr(result, "unexpected_keys", None):
        raise KeyError(f"{directory}: weights for modules this transformer lacks, e.g. {result.unexpected_keys[:3]}")
    parameters(model, name, trainable=False)
    return name


def check_folder(directory: str | Path, what: str = "an adapter folder") -> None:
    """Refuse, before anything loads, a folder without a loadable adapter: safetensors weights
    (`save`'s or diffusers' file, or a peft folder's; their header is checked) and readable
    metadata. Raises safe_files.FileError naming the folder and what is missing."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileError(f"{directory}: no such folder ({what})")
    if (directory / PEFT_CONFIG_NAME).exists() and not (directory / WEIGHT_NAME).exists():
        read_json_object(directory / PEFT_CONFIG_NAME, "a peft adapter config")
        check_safetensors(directory / PEFT_WEIGHT_NAME, f"{what}'s weights")
        return
    if not (directory / WEIGHT_NAME).exists():
        raise FileError(f"{directory} ({what}) holds no adapter: neither {WEIGHT_NAME} (adapters.save, diffusers) "
                        f"nor {PEFT_CONFIG_NAME} (a peft folder, e.g. Flow-GRPO's released LoRAs)")
    check_safetensors(directory / WEIGHT_NAME, f"{what}'s weights")
    if (directory / "adapter.json").exists():
        metadata(directory)


def metadata(directory: str | Path) -> dict:
    """The adapter's adapter.json (what `save` recorded: config, updates, training time...)."""
    return read_json_object(Path(directory) / "adapter.json", "an adapter's metadata")


class AdaptedModel:
    """The base model seen through one adapter (None = the plain base): usable wherever a
    FlowModel is (evaluation, rollouts), e.g. `evaluate({"base": view(m, None), "ocr": view(m, "ocr")})`."""

    def __init__(self, model, name: str | None):
        if name is not None:
            _check(model, name)
        self.model, self.name = model, name

    def velocity(self, x, sigma, embeds):
        with active(self.model, self.name):
            return self.model.velocity(x, sigma, embeds)

    def __getattr__(self, attr):
        return getattr(self.model, attr)

    def __repr__(self) -> str:
        return f"AdaptedModel({type(self.model).__name__}, adapter={self.name!r})"


def view(model, name: str | None) -> AdaptedModel:
    return AdaptedModel(model, name)

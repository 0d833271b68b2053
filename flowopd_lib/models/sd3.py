"""Stable Diffusion 3(.5) behind the `FlowModel` interface, plus a tiny random SD3 for tests.

What: `SD3FlowModel` wraps the components of a diffusers `StableDiffusion3Pipeline`

  prompt --CLIP-L + CLIP-G (+ T5, optional)--> tokens [B, L, D] + pooled [B, P]
  latent [B, 16, R/8, R/8] --SD3Transformer2DModel (MMDiT)--> velocity
  latent --AutoencoderKL (undo SD3's shift/scaling)--> image [B, 3, R, R] in [0, 1]

so that rollouts, GRPO and OPD, written once against `FlowModel` and tried on the toy model, run
unchanged on SD3.5-Medium. Why a wrapper and not our own code: every step that diffusers already
does (prompt encoding with its padding/truncation/pooling rules, latent scaling, image
post-processing) is delegated to diffusers, so embeddings and images are the pipeline's own.
Text encoders and the VAE are frozen; LoRA adapters attach to `model.transformer`
(`adapters.LORA_TARGETS`), as in Flow-GRPO.

`tiny_sd3_pipeline()` builds a StableDiffusion3Pipeline with random weights entirely offline
(tokenizers built in code, tiny CLIP/T5/VAE/MMDiT configs; 32 px images) for fast CPU tests of
the real SD3 code path. `SD3FlowModel.from_pretrained` is the loader for GPU clusters.

diffusers/transformers/peft are imported inside functions: importing this module is cheap.
"""
from __future__ import annotations

import string

import torch

from .base import FlowModel, PromptEmbeds

# ----------------------------------------------------------------------------- SD3.5-M defaults
# Flow-GRPO's settings for SD3.5-Medium (scripts/train_sd3.py and config/grpo.py of
# github.com/yifan123/flow_grpo): 512 px, timestep shift 3 (the scheduler config of SD3.5-M),
# CFG 4.5, LoRA rank 32 / alpha 64 with Gaussian init on the attention projections below.
SD35_MEDIUM_ID = "stabilityai/stable-diffusion-3.5-medium"
SD35_MEDIUM_RESOLUTION = 512
SD35_MEDIUM_SHIFT = 3.0
SD35_MEDIUM_CFG_SCALE = 4.5
SD3_LORA_RANK = 32
SD3_LORA_ALPHA = 64
# LoRA targets: Flow-GRPO's joint-attention projections, `adapters.LORA_TARGETS` (shared with the
# toy MMDiT); add adapters with `adapters.add(model, name, rank=SD3_LORA_RANK, alpha=SD3_LORA_ALPHA)`.


# ----------------------------------------------------------------------------- the wrapper


def sd3_pipeline_class():
    """diffusers' StableDiffusion3Pipeline, imported without transformers' "requires torchvision"
    notice: the pipeline's IP-adapter image processors are imported with it but never used here, and
    without torchvision transformers falls back to its PIL processors, which is what the notice says.
    Only that notice is dropped (a filter on the logger that emits it, for the import)."""
    import logging

    def not_torchvision_notice(record: logging.LogRecord) -> bool:
        return "requires torchvision" not in record.getMessage()

    logger = logging.getLogger("transformers.utils.import_utils")
    logger.addFilter(not_torchvision_notice)
    try:
        from diffusers import StableDiffusion3Pipeline
    finally:
        logger.removeFilter(not_torchvision_notice)
    return StableDiffusion3Pipeline

class SD3FlowModel(FlowModel):
    """SD3(.5) text-to-image flow model on the components of a `StableDiffusion3Pipeline`.

    `resolution` is the image side in pixels; `max_sequence_length` the T5 token budget
    (diffusers' default 256; Flow-GRPO uses 128). Without T5 (`text_encoder_3=None`) diffusers
    feeds zeros in its place, as SD3 was trained to accept.
    """

    max_cached_prompts = 256  # ~0.7 GB of bf16 embeddings at 256 T5 tokens (FlowModel.encode_prompts)

    def __init__(self, pipeline, resolution: int | None = None, max_sequence_length: int = 256):
        super().__init__()
        self.pipeline = pipeline  # a plain attribute: used for encode_prompt, not an nn.Module
        self.transformer = pipeline.transformer
        self.vae = pipeline.vae
        self.text_encoder, self.tokenizer = pipeline.text_encoder, pipeline.tokenizer
        self.text_encoder_2, self.tokenizer_2 = pipeline.text_encoder_2, pipeline.tokenizer_2
        self.text_encoder_3, self.tokenizer_3 = pipeline.text_encoder_3, pipeline.tokenizer_3
        self.max_sequence_length = max_sequence_length
        self.resolution = resolution or pipeline.default_sample_size * pipeline.vae_scale_factor
        self._check_resolution()
        for frozen in self._frozen_modules():
            frozen.requires_grad_(False).eval()
        self.transformer.eval()

    def _frozen_modules(self) -> list[torch.nn.Module]:
        modules = [self.vae, self.text_encoder, self.text_encoder_2, self.text_encoder_3]
        return [m for m in modules if m is not None]

    def _check_resolution(self) -> None:
        multiple = self.pipeline.vae_scale_factor * self.transformer.config.patch_size
        if self.resolution % multiple:
            raise ValueError(f"resolution={self.resolution} must be a multiple of {multiple} "
                             f"(VAE downscale x transformer patch size)")

    @classmethod
    def from_pipeline(cls, pipeline, resolution: int | None = None, max_sequence_length: int = 256) -> "SD3FlowModel":
        """Wrap an existing pipeline (shares its modules; no copy). resolution defaults to the
        transformer's native size (sample_size x VAE downscale)."""
        return cls(pipeline, resolution, max_sequence_length)

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str = SD35_MEDIUM_ID, dtype: torch.dtype = torch.bfloat16,
                        device: str | torch.device | None = None, resolution: int | None = None,
                        gradient_checkpointing: bool = False, load_t5: bool = True,
                        max_sequence_length: int = 256) -> "SD3FlowModel":
        """Load SD3(.5) weights (a hub id or a `save_pretrained` directory) in `dtype`; the VAE is
        kept in float32 as in Flow-GRPO. `load_t5=False` skips the 4.7B-parameter T5-XXL.
        resolution defaults to the pipeline's native size capped at 512 (Flow-GRPO trains and
        evaluates SD3.5-M at 512; a smaller pipeline, e.g. a tiny stand-in, keeps its own size)."""
        StableDiffusion3Pipeline = sd3_pipeline_class()
        without_t5 = {} if load_t5 else {"text_encoder_3": None, "tokenizer_3": None}
        dtypes = {"vae": torch.float32, "default": dtype}
        pipeline = StableDiffusion3Pipeline.from_pretrained(path_or_hub_id, dtype=dtypes, **without_t5)
        if device is not None:
            pipeline.to(device)
        if gradient_checkpointing:
            pipeline.transformer.enable_gradient_checkpointing()
        native = pipeline.default_sample_size * pipeline.vae_scale_factor
        return cls.from_pipeline(pipeline, resolution or min(native, SD35_MEDIUM_RESOLUTION), max_sequence_length)

    # -- prompts
    def text_encoders_to(self, device) -> None:
        """CLIP-L, CLIP-G and T5 to `device` (the CPU frees ~10 GiB of a GPU; a training update
        encodes only its few new prompts, ~0.1% of its forwards). float32 on the CPU, where bf16
        matmuls are slow; the pipeline's encode_prompt runs there and `_encode_uncached` moves the
        embeddings to the transformer."""
        device = torch.device(device)
        dtype = torch.float32 if device.type == "cpu" else self.compute_dtype
        for encoder in (self.text_encoder, self.text_encoder_2, self.text_encoder_3):
            if encoder is not None:
                encoder.to(device, dtype)

    def _encode_uncached(self, texts: list[str]) -> PromptEmbeds:
        """The pipeline's own `encode_prompt` (same prompt to CLIP-L, CLIP-G and T5, no CFG pair)."""
        tokens, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=texts, prompt_2=texts, prompt_3=texts, device=self.text_encoder.device,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length)
        return PromptEmbeds(tokens.to(self.device, self.compute_dtype), pooled.to(self.device, self.compute_dtype))

    # -- velocity
    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, embeds: PromptEmbeds) -> torch.Tensor:
        """`FlowModel.velocity` in the transformer's dtype: inputs are cast to it (float32 latents
        into a bf16 MMDiT), the timestep 1000 s stays float32 as in the pipeline (bf16 would round
        it), and the velocity comes back in x's dtype."""
        dtype = self.compute_dtype
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).expand(x.shape[0])
        v = self.transformer(hidden_states=x.to(dtype), encoder_hidden_states=embeds.tokens.to(x.device, dtype),
                             pooled_projections=embeds.pooled.to(x.device, dtype), timestep=1000 * sigma,
                             return_dict=False)[0]
        return v.to(x.dtype)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The frozen MMDiT's dtype (bf16 on GPUs), read from a base weight: trained LoRA weights are
        float32 (precision.py), so "the transformer's dtype" of diffusers could name either."""
        return self.transformer.pos_embed.proj.weight.dtype

    # -- latents <-> images
    @property
    def vae_scale_factor(self) -> int:
        return self.pipeline.vae_scale_factor

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.resolution // self.vae_scale_factor
        return (self.transformer.config.in_channels, side, side)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] -> images [B, 3, H, W] in [0, 1], float32 (as the pipeline's
        `output_type="pt"`); differentiable w.r.t. the latents."""
        cfg = self.vae.config
        vae_input = latents.to(self.vae.device, self.vae.dtype) / cfg.scaling_factor + cfg.shift_factor
        images = self.vae.decode(vae_input, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] -> SD3 latents (float32): the posterior mean, or a sample
        when a generator is given, then `(z - shift_factor) * scaling_factor`."""
        cfg = self.vae.config
        posterior = self.vae.encode(images.to(self.vae.device, self.vae.dtype) * 2 - 1).latent_dist
        z = posterior.mean if generator is None else posterior.sample(generator)
        return ((z - cfg.shift_factor) * cfg.scaling_factor).float()


# ----------------------------------------------------------------------------- tiny offline SD3

def _clip_byte_alphabet() -> list[str]:
    """The 256 printable characters GPT-2/CLIP byte-level BPE uses for the 256 byte values."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def _tiny_clip_tokenizer(words=("red", "cat", "square")):
    """Byte-level CLIP BPE over single bytes plus merges spelling a few words (no files)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in _clip_byte_alphabet():
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    merges = []
    for word in words:
        for i in range(1, len(word)):
            left, right = word[:i], word[i] + ("</w>" if i == len(word) - 1 else "")
            merges.append((left, right))
            vocab.setdefault(left + right, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)  # SD3's CLIP length


def _tiny_t5_tokenizer(words=("red", "cat", "square")):
    """Unigram T5 tokenizer over characters plus a few words (no sentencepiece file)."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    for char in string.ascii_letters + string.digits + string.punctuation:
        pieces += [(char, -5.0), ("▁" + char, -5.5)]
    pieces += [("▁" + word, -3.0) for word in words]
    pieces += [(f"<extra_id_{i}>", 0.0) for i in range(99, -1, -1)]
    return T5Tokenizer(vocab=pieces, model_max_length=256)


def _tiny_clip(hidden: int, vocab_size: int):
    """CLIP text encoder with projection; hidden_states[-2] (SD3's choice) needs >= 2 layers."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden, intermediate_size=2 * hidden,
        num_attention_heads=2, num_hidden_layers=2, vocab_size=vocab_size, hidden_act="gelu",
        projection_dim=hidden))


def tiny_sd3_pipeline(seed: int = 0):
    """A random-weight `StableDiffusion3Pipeline`, built offline in ~0.1 s, deterministic in seed.

    Shaped like SD3.5-M in miniature: CLIP-L (16) and CLIP-G (32) whose concatenation is
    zero-padded to T5's width (64), pooled 16 + 32; a 2-block VAE (downscale 2, 16 latent
    channels, SD3.5's shift/scaling factors); an MMDiT with patch 2, RMS qk-norm and one dual-
    attention block; the shift-3 flow-matching scheduler. Default image: 32 px (latent 16x16x16).
    All modules in eval mode (random T5 has dropout). The global RNG state is left untouched.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import T5Config, T5EncoderModel

    StableDiffusion3Pipeline = sd3_pipeline_class()

    clip_l_dim, clip_g_dim, t5_dim, latent_channels = 16, 32, 64, 16
    tokenizer, tokenizer_2, tokenizer_3 = _tiny_clip_tokenizer(), _tiny_clip_tokenizer(), _tiny_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = _tiny_clip(clip_l_dim, len(tokenizer))
        text_encoder_2 = _tiny_clip(clip_g_dim, len(tokenizer_2))
        text_encoder_3 = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer_3), d_model=t5_dim, d_kv=16, d_ff=2 * t5_dim, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8))
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
            latent_channels=latent_channels, norm_num_groups=4, sample_size=32, use_quant_conv=False,
            use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305)
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=latent_channels, out_channels=latent_channels, num_layers=2,
            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=t5_dim, caption_projection_dim=16,
            pooled_projection_dim=clip_l_dim + clip_g_dim, pos_embed_max_size=16, dual_attention_layers=(0,),
            qk_norm="rms_norm")
    for module in (text_encoder, text_encoder_2, text_encoder_3, vae, transformer):
        module.eval()
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=SD35_MEDIUM_SHIFT), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)

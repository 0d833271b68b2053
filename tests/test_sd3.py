"""SD3FlowModel on a tiny random StableDiffusion3Pipeline (offline, CPU): every output is checked
against what diffusers' own pipeline computes from the same components."""
import pytest
import torch

from flowopd_lib import adapters, rollout
from flowopd_lib.models import SD3FlowModel, tiny_sd3_pipeline

PROMPTS = ["a red cat", "a red square", ""]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the box has 2 cores and other jobs: one thread is faster and steadier
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe():
    pipeline = tiny_sd3_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def model(pipe):
    return SD3FlowModel.from_pipeline(pipe)


def velocity_inputs(model, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *model.latent_shape, generator=g), torch.rand(n, generator=g)


def test_tiny_pipeline_is_deterministic_and_keeps_global_rng():
    state = torch.random.get_rng_state()
    a, b, other = tiny_sd3_pipeline(0), tiny_sd3_pipeline(0), tiny_sd3_pipeline(1)
    assert torch.equal(torch.random.get_rng_state(), state)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module_a, module_b = getattr(a, name), getattr(b, name)
        assert not module_a.training
        assert all(torch.equal(p, q) for p, q in zip(module_a.state_dict().values(), module_b.state_dict().values()))
    assert not torch.equal(a.transformer.proj_out.weight, other.transformer.proj_out.weight)
    ids = a.tokenizer("a red cat").input_ids
    assert len(ids) == 5 and a.tokenizer.decode(ids, skip_special_tokens=True).strip() == "a red cat"
    assert a.tokenizer_3.decode(a.tokenizer_3("a red cat").input_ids, skip_special_tokens=True) == "a red cat"


def test_prompt_embeddings_are_the_pipelines_and_cached(pipe, model):
    model.clear_prompt_cache()
    embeds = model.encode_prompts(PROMPTS)
    tokens, _, pooled, _ = pipe.encode_prompt(prompt=PROMPTS, prompt_2=PROMPTS, prompt_3=PROMPTS,
                                              do_classifier_free_guidance=False)
    assert embeds.tokens.shape == (3, 77 + 256, 64) and embeds.pooled.shape == (3, 16 + 32)
    assert torch.allclose(embeds.tokens, tokens) and torch.allclose(embeds.pooled, pooled)
    assert not torch.allclose(embeds.tokens[0], embeds.tokens[1])

    again = model.encode_prompts(list(reversed(PROMPTS)) + ["a red cat"])
    assert torch.equal(again.tokens[:3], embeds.tokens.flip(0)) and torch.equal(again.pooled[3], embeds.pooled[0])

    # "" is SD3's unconditional prompt: the pipeline's own negative embeddings under CFG
    _, negative_tokens, _, negative_pooled = pipe.encode_prompt(prompt="a red cat", prompt_2=None, prompt_3=None,
                                                                do_classifier_free_guidance=True)
    # a batch of three against a batch of one: float rounding differs by ~2e-7 on AVX-512 kernels
    assert torch.allclose(embeds.tokens[2], negative_tokens[0], atol=1e-6)
    assert torch.allclose(embeds.pooled[2], negative_pooled[0], atol=1e-6)


def test_latent_shape_follows_resolution(pipe, model):
    assert model.resolution == 32 and model.vae_scale_factor == 2
    assert model.latent_shape == (16, 16, 16)
    assert SD3FlowModel.from_pipeline(pipe, resolution=64).latent_shape == (16, 32, 32)
    with pytest.raises(ValueError, match="resolution=30 must be a multiple of 4"):
        SD3FlowModel.from_pipeline(pipe, resolution=30)


def test_decode_matches_pipeline_and_encode_round_trips_shapes(pipe, model):
    latents = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(1))
    images = model.decode(latents)
    with torch.no_grad():
        raw = pipe.vae.decode(latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample
    expected = pipe.image_processor.postprocess(raw, output_type="pt")
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32
    assert torch.allclose(images, expected, atol=1e-6)

    encoded = model.encode_images(images)
    posterior_mean = pipe.vae.encode(images * 2 - 1).latent_dist.mean
    assert encoded.shape == latents.shape
    assert torch.allclose(encoded, (posterior_mean - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor)
    sampled = model.encode_images(images, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == latents.shape and not torch.equal(sampled, encoded)
    again = model.decode(encoded)
    assert again.shape == images.shape and 0 <= again.min() and again.max() <= 1


def test_decode_is_differentiable_and_encoders_frozen(model):
    latents = torch.randn(1, *model.latent_shape, requires_grad=True)
    model.decode(latents).mean().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    for frozen in (model.vae, model.text_encoder, model.text_encoder_2, model.text_encoder_3):
        assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    assert all(p.grad is None for p in model.vae.parameters())


def test_velocity_is_the_transformer_at_timestep_1000_sigma(pipe, model):
    x, sigma = velocity_inputs(model)
    embeds = model.encode_prompts(PROMPTS)
    with torch.no_grad():
        v = model.velocity(x, sigma, embeds)
        direct = pipe.transformer(hidden_states=x, timestep=1000 * sigma, encoder_hidden_states=embeds.tokens,
                                  pooled_projections=embeds.pooled, return_dict=False)[0]
        other_time = model.velocity(x, sigma * 0.5, embeds)
    assert v.shape == x.shape and torch.equal(v, direct)
    assert not torch.allclose(v, other_time)


def test_velocity_with_a_bfloat16_transformer_takes_float32_latents():
    model = SD3FlowModel.from_pipeline(tiny_sd3_pipeline())
    x, sigma = velocity_inputs(model)
    embeds = model.encode_prompts(PROMPTS)
    with torch.no_grad():
        v32 = model.velocity(x, sigma, embeds)
        model.transformer.to(torch.bfloat16)
        v16 = model.velocity(x, sigma, embeds)
    assert v16.dtype == torch.float32
    assert (v16 - v32).abs().max() < 0.05 * v32.abs().max()


def test_ode_generate_equals_the_diffusers_pipeline(pipe, model):
    prompts = ["a red cat", "a red square"]
    images = rollout.generate(model, prompts, steps=2, cfg_scale=4.5, seed=0, shift=3.0)
    assert images.shape == (2, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    noise = rollout.initial_noise(model, len(prompts), seed=0)
    expected = pipe(prompt=prompts, latents=noise, num_inference_steps=2, guidance_scale=4.5,
                    height=32, width=32, output_type="pt").images
    assert torch.allclose(images, expected, atol=1e-5)


def test_lora_changes_velocity_disables_exactly_and_round_trips(tmp_path):
    model = SD3FlowModel.from_pipeline(tiny_sd3_pipeline())
    x, sigma = velocity_inputs(model)
    embeds = model.encode_prompts(PROMPTS)
    with torch.no_grad():
        base = model.velocity(x, sigma, embeds)
        adapters.add(model, "x", rank=4, alpha=8, gaussian_init=False)
        adapted = model.velocity(x, sigma, embeds)
        model.transformer.disable_adapters()
        disabled = model.velocity(x, sigma, embeds)
        model.transformer.enable_adapters()
    trainable = [name for name, p in model.transformer.named_parameters() if p.requires_grad]
    adapted_modules = {name.split(".lora_")[0] for name in trainable}
    assert all(".lora_" in name for name in trainable)  # add_adapter freezes the base weights
    assert len(adapted_modules) == 2 * 8 - 1  # 2 blocks x 8 targets; the last block has no to_add_out
    assert all(name.split(".")[2] == "attn" for name in adapted_modules)  # never attn2 (SD3.5's extra attention)
    assert not torch.allclose(adapted, base, atol=1e-3)
    assert torch.equal(disabled, base)

    adapters.save(model, "x", tmp_path / "lora")
    fresh = tiny_sd3_pipeline()
    fresh.load_lora_weights(tmp_path / "lora", adapter_name="x")
    loaded = SD3FlowModel.from_pipeline(fresh)
    with torch.no_grad():
        assert torch.equal(loaded.velocity(x, sigma, loaded.encode_prompts(PROMPTS)), adapted)


def test_flow_grpo_style_peft_folder_loads_as_peft_loads_it(pipe, tmp_path):
    """Flow-GRPO's released LoRAs are peft folders read by PeftModel.from_pretrained(transformer, dir)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(adapters.LORA_TARGETS), init_lora_weights="gaussian")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        released = get_peft_model(tiny_sd3_pipeline().transformer, config)
        for name, p in released.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5)  # peft starts B at zero: make the adapter change outputs
    released.save_pretrained(tmp_path / "SD3.5M-FlowGRPO-GenEval")
    reference = PeftModel.from_pretrained(tiny_sd3_pipeline().transformer, tmp_path / "SD3.5M-FlowGRPO-GenEval")

    ours = SD3FlowModel.from_pipeline(tiny_sd3_pipeline())
    assert adapters.load(ours, tmp_path / "SD3.5M-FlowGRPO-GenEval", "geneval") == "geneval"
    x, sigma = velocity_inputs(ours)
    embeds = ours.encode_prompts(PROMPTS)
    with torch.no_grad(), adapters.active(ours, "geneval"):
        adapted = ours.velocity(x, sigma, embeds)
        expected = reference(hidden_states=x, encoder_hidden_states=embeds.tokens, pooled_projections=embeds.pooled,
                             timestep=1000 * sigma, return_dict=False)[0]
    with torch.no_grad(), adapters.active(ours, None):
        base = ours.velocity(x, sigma, embeds)
    assert (adapted - base).abs().max() > 1e-3
    torch.testing.assert_close(adapted, expected)


def test_from_pretrained_loads_a_saved_pipeline(pipe, model, tmp_path):
    pipe.save_pretrained(tmp_path / "sd3")
    loaded = SD3FlowModel.from_pretrained(tmp_path / "sd3", dtype=torch.float32, resolution=32)
    x, sigma = velocity_inputs(model)
    with torch.no_grad():
        assert torch.equal(loaded.velocity(x, sigma, loaded.encode_prompts(PROMPTS)),
                           model.velocity(x, sigma, model.encode_prompts(PROMPTS)))
    no_t5 = SD3FlowModel.from_pretrained(tmp_path / "sd3", dtype=torch.float32, resolution=32, load_t5=False)
    assert no_t5.text_encoder_3 is None
    embeds = no_t5.encode_prompts(PROMPTS)
    assert embeds.tokens.shape == (3, 77 + 256, 64) and embeds.tokens[:, 77:].abs().max() == 0

    half = SD3FlowModel.from_pretrained(tmp_path / "sd3", resolution=32)  # default: bf16, VAE in float32
    assert half.transformer.dtype == torch.bfloat16 and half.text_encoder_3.dtype == torch.bfloat16
    assert half.vae.dtype == torch.float32
    images = rollout.generate(half, PROMPTS[:1], steps=1, cfg_scale=4.5)
    assert images.dtype == torch.float32 and torch.isfinite(images).all()


def test_prompt_cache_is_bounded_and_keeps_what_it_returns():
    """SD3 embeddings are ~2.7 MB a prompt: the cache keeps the most recently used ones only."""
    from flowopd_lib.models import SD3FlowModel, tiny_sd3_pipeline

    model = SD3FlowModel.from_pipeline(tiny_sd3_pipeline())
    model.max_cached_prompts = 3
    first = model.encode_prompts(["a cat", ""])
    for text in ["red square", "blue cat", "green dog", "a cat"]:
        model.encode_prompts([text, ""])
    assert len(model._embed_cache) == 3 and "" in model._embed_cache  # "" is used every time
    again = model.encode_prompts(["a cat", ""])
    # re-encoded after eviction, in another batch: CLIP's pooled output moves by ~2e-7 with the batch
    assert torch.allclose(again.tokens, first.tokens, atol=1e-6)
    assert torch.allclose(again.pooled, first.pooled, atol=1e-6)
    many = model.encode_prompts([f"prompt {i}" for i in range(5)])  # more than fit: still all returned
    assert len(many) == 5 and len(model._embed_cache) == 3

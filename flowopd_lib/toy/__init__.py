"""The toy world: a miniature text-to-image world that runs the whole Flow-OPD study on a CPU.

Scenes (shapes, colours, text on a sign) rendered in numpy at 32x32, a prompt grammar in four
task families with ground-truth specs, shipped train/test prompt files in Flow-GRPO's formats,
pretraining data with web-like caption noise, and degradations that make images look generated.

    prompts = toy.sample_prompts("geneval", n=64, split="test", seed=0)
    images = toy.render(prompts, seed=0)   # float32 [B, 3, 32, 32] in [0, 1]
"""
from .degrade import degrade
from .font import GLYPHS
from .grammar import (GENEVAL_TAGS, TASKS, Prompt, parse_prompt, random_prompt, vocabulary,
                      words)
from .layout import render, relations, scene_for_prompt, scenes_for_prompts
from .captions import pretraining_batch
from .scenes import BACKGROUNDS, COLORS, SHAPES, Item, Scene, render_scenes
from .splits import SPLITS, read_prompts, sample_prompts

__all__ = [
    "BACKGROUNDS", "COLORS", "GENEVAL_TAGS", "GLYPHS", "Item", "Prompt", "SHAPES", "SPLITS",
    "Scene", "TASKS", "degrade", "parse_prompt", "pretraining_batch", "random_prompt",
    "read_prompts", "relations", "render", "render_scenes", "sample_prompts", "scene_for_prompt",
    "scenes_for_prompts", "vocabulary", "words",
]

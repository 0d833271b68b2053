"""The toy world's prompt grammar: four task families, their specs, and parsing text back.

Families and their `Prompt.spec`:
- geneval: the GenEval metadata dict itself ({"tag", "include", ["exclude"], "prompt"}), with
  GenEval's six tags and phrasing ("a photo of two circles", "a photo of a red square left of
  a cross"...). Classes are shapes, colours the toy palette.
- ocr: {"text": "A7"}; the prompt quotes the text (`a sign that says "A7"`), as Flow-GRPO's
  OCR prompts do, and only the quoted part is judged.
- pickscore: free-form scenes, {"objects": [{"shape", "color", "count", "size"}], "background",
  "style"} (color/size/background/style may be None when the prompt leaves them open).
- deqa: the same free-form prompts with task "deqa" (the paper's DeQA teacher trains on general
  prompts).

Tokenisation convention (for the word-level tokenizer built on `vocabulary()`): `words(text)`
splits a prompt into lower-case words, the punctuation tokens "," and '"', and, between double
quotes, one token per glyph character (case kept, from `GLYPHS`). So the token set is
`vocabulary() + list(GLYPHS)` and quoted text of any length is tokenisable.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..tasks import TASKS  # the task names are the package's (tasks.py); the toy world re-exports them
from .font import GLYPHS
from .scenes import BACKGROUNDS, COLORS, SHAPES, SIZES

GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
SIZE_WORDS = {"small": "small", "medium": "medium", "large": "big"}  # size name -> prompt word
OCR_TEMPLATES = (
    'a sign that says "{}"',
    'a poster with the text "{}"',
    'a label that reads "{}"',
    'a white board with "{}" written on it',
    'a street sign reading "{}"',
    'the text "{}" on a sign',
)
FREEFORM_PREFIXES = ("", "an illustration of ", "a drawing of ", "a picture of ")
STYLES = ("minimal", "flat design", "vector art", "simple icon", "high quality", "clean",
          "bold colors", "playful", "modern poster")
MAX_FREEFORM_OBJECTS = 4


@dataclass
class Prompt:
    """A prompt, its task family and its ground-truth spec (see the module docstring)."""
    text: str
    task: str
    spec: dict


def check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks are {TASKS}")


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def words(text: str) -> list[str]:
    """Split a prompt into tokens: lower-case words, ',' and '"', and quoted glyphs one by one."""
    out = []
    for i, part in enumerate(text.split('"')):
        if i % 2:  # inside quotes: the text to render, one token per glyph
            out += ['"'] + [ch for ch in part if not ch.isspace()] + ['"']
        else:
            out += re.findall(r"[a-z]+|,", part.lower())
    return out


# ----------------------------------------------------------------------------- geneval

def geneval_metadata(tag: str, include: list[dict], text: str) -> dict:
    meta = {"tag": tag, "include": include, "prompt": text}
    if tag == "counting":  # GenEval: "two X" also means "not three X"
        meta = {"tag": tag, "include": include,
                "exclude": [{"class": include[0]["class"], "count": include[0]["count"] + 1}],
                "prompt": text}
    return meta


def all_geneval_prompts(tag: str) -> list[Prompt]:
    """Every distinct GenEval-style prompt of one tag, in a fixed order."""
    out = []
    pairs = [(a, b) for a, b in itertools.permutations(SHAPES, 2)]
    if tag == "single_object":
        for s in SHAPES:
            out.append(([{"class": s, "count": 1}], f"a photo of {article(s)} {s}"))
    elif tag == "two_object":
        for a, b in pairs:
            out.append(([{"class": a, "count": 1}, {"class": b, "count": 1}],
                        f"a photo of {article(a)} {a} and {article(b)} {b}"))
    elif tag == "counting":
        for s, n in itertools.product(SHAPES, COUNT_WORDS):
            out.append(([{"class": s, "count": n}], f"a photo of {COUNT_WORDS[n]} {PLURALS[s]}"))
    elif tag == "colors":
        for c, s in itertools.product(COLORS, SHAPES):
            out.append(([{"class": s, "count": 1, "color": c}], f"a photo of {article(c)} {c} {s}"))
    elif tag == "position":
        for (a, b), rel in itertools.product(pairs, RELATIONS):
            out.append(([{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}],
                        f"a photo of {article(a)} {a} {rel} {article(b)} {b}"))
    elif tag == "color_attr":
        for (a, b), (ca, cb) in itertools.product(pairs, itertools.permutations(COLORS, 2)):
            out.append(([{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}],
                        f"a photo of {article(ca)} {ca} {a} and {article(cb)} {cb} {b}"))
    else:
        raise ValueError(f"unknown GenEval tag {tag!r}; tags are {GENEVAL_TAGS}")
    return [Prompt(text, "geneval", geneval_metadata(tag, inc, text)) for inc, text in out]


def copy_metadata(meta: dict) -> dict:
    """A fresh copy of GenEval metadata (cheaper than deepcopy at pretraining rates)."""
    def clause(c: dict) -> dict:
        return {k: list(v) if isinstance(v, list) else v for k, v in c.items()}
    return {k: [clause(c) for c in v] if isinstance(v, list) else v for k, v in meta.items()}


@lru_cache(maxsize=None)
def _geneval_by_tag() -> dict[str, list[Prompt]]:
    return {tag: all_geneval_prompts(tag) for tag in GENEVAL_TAGS}


@lru_cache(maxsize=None)
def _geneval_by_text() -> dict[str, Prompt]:
    return {p.text: p for prompts in _geneval_by_tag().values() for p in prompts}


def parse_geneval(text: str) -> dict:
    """GenEval metadata of a prompt written in the toy GenEval phrasing."""
    if text not in _geneval_by_text():
        raise ValueError(f"not a toy GenEval prompt: {text!r}")
    return copy_metadata(_geneval_by_text()[text].spec)


def random_geneval(rng: np.random.Generator, tag: str | None = None) -> Prompt:
    tag = tag or GENEVAL_TAGS[rng.integers(len(GENEVAL_TAGS))]
    pool = _geneval_by_tag()[tag]
    p = pool[rng.integers(len(pool))]
    return Prompt(p.text, p.task, copy_metadata(p.spec))


# ----------------------------------------------------------------------------- ocr

def random_text(rng: np.random.Generator, min_len: int = 1, max_len: int = 4) -> str:
    n = int(rng.integers(min_len, max_len + 1))
    return "".join(GLYPHS[i] for i in rng.integers(len(GLYPHS), size=n))


def random_ocr(rng: np.random.Generator) -> Prompt:
    text = random_text(rng)
    template = OCR_TEMPLATES[rng.integers(len(OCR_TEMPLATES))]
    return Prompt(template.format(text), "ocr", {"text": text})


def parse_ocr(text: str) -> dict:
    parts = text.split('"')
    if len(parts) < 3:
        raise ValueError(f'an OCR prompt quotes its text in double quotes: {text!r}')
    return {"text": parts[1]}


# ----------------------------------------------------------------------------- free-form

def object_phrase(obj: dict) -> str:
    shape = obj["shape"] if obj["count"] == 1 else PLURALS[obj["shape"]]
    adjectives = [SIZE_WORDS[obj["size"]]] if obj.get("size") else []
    adjectives += [obj["color"]] if obj.get("color") else []
    head = " ".join(adjectives + [shape])
    count = article(head) if obj["count"] == 1 else COUNT_WORDS[obj["count"]]
    return f"{count} {head}"


def freeform_text(spec: dict, prefix: str = "") -> str:
    phrases = [object_phrase(o) for o in spec["objects"]]
    text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    if spec.get("background"):
        text += f" on a {spec['background']} background"
    if spec.get("style"):
        text += f", {spec['style']}"
    return prefix + text


def random_freeform(rng: np.random.Generator, task: str = "pickscore") -> Prompt:
    """A free-form scene: 1-3 object groups of distinct (shape, colour), at most 4 objects."""
    n_groups = int(rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2]))
    objects, total, seen = [], 0, set()
    while len(objects) < n_groups:
        shape = SHAPES[rng.integers(len(SHAPES))]
        color = list(COLORS)[rng.integers(len(COLORS))] if rng.random() < 0.85 else None
        if (shape, color) in seen or (shape, None) in seen or (color is None and shape in {s for s, _ in seen}):
            continue  # an uncoloured shape must be the only group of that shape, or it is ambiguous
        room = MAX_FREEFORM_OBJECTS - total - (n_groups - len(objects) - 1)
        count = int(rng.integers(1, min(3, room) + 1)) if rng.random() < 0.4 else 1
        size = list(SIZES)[rng.integers(len(SIZES))] if rng.random() < 0.3 and count == 1 else None
        seen.add((shape, color))
        objects.append({"shape": shape, "color": color, "count": count, "size": size})
        total += count
    spec = {"objects": objects,
            "background": list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))] if rng.random() < 0.6 else None,
            "style": STYLES[rng.integers(len(STYLES))] if rng.random() < 0.5 else None}
    prefix = FREEFORM_PREFIXES[rng.integers(len(FREEFORM_PREFIXES))]
    return Prompt(freeform_text(spec, prefix), task, spec)


def parse_object_phrase(phrase: str) -> dict:
    toks = phrase.split()
    if len(toks) < 2 or toks[0] not in NUMBERS:
        raise ValueError(f"bad object phrase {phrase!r}")
    singular = {v: k for k, v in PLURALS.items()}
    shape = singular.get(toks[-1], toks[-1])
    if shape not in SHAPES:
        raise ValueError(f"unknown shape in {phrase!r}; shapes are {SHAPES}")
    size_names = {v: k for k, v in SIZE_WORDS.items()}
    obj = {"shape": shape, "color": None, "count": NUMBERS[toks[0]], "size": None}
    for t in toks[1:-1]:
        if t in COLORS:
            obj["color"] = t
        elif t in size_names:
            obj["size"] = size_names[t]
        else:
            raise ValueError(f"unknown word {t!r} in object phrase {phrase!r}")
    return obj


def parse_freeform(text: str) -> dict:
    spec = {"objects": [], "background": None, "style": None}
    for style in STYLES:
        if text.endswith(", " + style):
            spec["style"], text = style, text[: -len(style) - 2]
            break
    m = re.search(r" on a (\w+) background$", text)
    if m:
        spec["background"], text = m.group(1), text[: m.start()]
    for prefix in FREEFORM_PREFIXES[1:]:
        if text.startswith(prefix):
            text = text[len(prefix):]
    spec["objects"] = [parse_object_phrase(p) for p in re.split(r", | and ", text)]
    return spec


# ----------------------------------------------------------------------------- public

def random_prompt(task: str, rng: np.random.Generator) -> Prompt:
    """A random prompt of a task family straight from the grammar (no split)."""
    check_task(task)
    if task == "geneval":
        return random_geneval(rng)
    if task == "ocr":
        return random_ocr(rng)
    return random_freeform(rng, task)


def parse_prompt(text: str, task: str) -> Prompt:
    """Rebuild a prompt's spec from its text alone (the files of ocr/pickscore are plain text)."""
    check_task(task)
    if task == "geneval":
        return Prompt(text, task, parse_geneval(text))
    if task == "ocr":
        return Prompt(text, task, parse_ocr(text))
    return Prompt(text, task, parse_freeform(text))


def vocabulary() -> list[str]:
    """Every word token the grammar can emit (see `words`), sorted; glyphs are in `GLYPHS`."""
    fragments = ["a photo of an and on background", *RELATIONS, *COLORS, *SHAPES,
                 *PLURALS.values(), *NUMBERS, *SIZE_WORDS.values(), *BACKGROUNDS, *STYLES,
                 *FREEFORM_PREFIXES, *(t.format("") for t in OCR_TEMPLATES), ","]
    return sorted({w for f in fragments for w in words(f)})

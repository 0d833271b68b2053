"""The toy PickScore: a small prompt-conditioned CNN trained to agree with the hidden taste.

As PickScore is a learned model of human preference, this scorer is a learned model of the
toy world's hidden taste (`taste.py`): GRPO optimises it, and because it is only a proxy (a
small net that saw only rendered, degraded and mismatched images), the gap between it and the
taste measures reward hacking. Trained in the repo on synthetic preferences: for each of 8000
prompts (the train split plus fresh grammar prompts, never a test prompt), a group of GROUP
images (clean render, another layout, a wrong scene, generated-looking degradations, another
prompt's image) labelled by the taste. A preference pair is two images of one prompt whose
taste differs by at least `MIN_GAP` (a confident labeller; near-ties dropped, as preference
datasets drop ties); the same rule defines training and held-out (test-prompt) pairs. The loss
is Bradley-Terry over all pairs within each sampled group (images mirrored at random: the
taste is mirror-symmetric) plus a regression of sigmoid(score) onto the taste, so the proxy
reads on the taste's [0, 1] scale.

Model: image 32x32 (others are resized) -> `pixel_features` (RGB, palette colours, colours the
prompt names or not, named-background match, subject mask, |Laplacian|, coordinates) -> 4 conv
layers (the middle two FiLM-modulated by the prompt) -> mean- and max-pooled features. Prompt ->
mean embedding of its words and word bigrams over `toy.vocabulary()` (glyphs ignored) plus the
mean of one embedding per object group of its parsed spec (`object_groups`: shape, colour, count,
size). Counting: per 8x8 cell, a density of objects matching each group (query . key) and of any
object, sum-pooled and set against the wanted counts. An MLP on all of it -> two factors whose
product is the proxy (logit returned). `python -m flowopd_lib.rewards.pickscore` retrains
deterministically and ships the weights (assets/pickscore_toy/), printing held-out accuracy.

Conflict dial (`conflict.py`): each setting c > 0 has its own proxy (assets/pickscore_toy_conflict<c>/,
`--conflict c`), learned from that setting's taste; its groups swap the second layout and the
second wrong scene for appealing versions of them (`degrade.appeal_scene`: one object, enlarged,
a vivid background), so the labels can teach what the appeal likes. At 0 the data is today's.
"""
from __future__ import annotations

import hashlib
import json
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..cli import UserError
from ..safe_files import replace_directory
from ..toy.degrade import appeal_scene, background_color, blotch, blur, degrade, perturb_scene
from ..toy.grammar import Prompt, parse_prompt, random_freeform, vocabulary, words
from ..toy.layout import scene_for_prompt
from ..toy.scenes import BACKGROUNDS, COLORS, SHAPES, SIZES, render_scenes
from ..toy.splits import read_prompts
from . import conflict
from .taste import taste

ASSETS = Path(__file__).resolve().parent.parent / "assets"
WEIGHTS_DIR = ASSETS / "pickscore_toy"  # conflict 0
SIZE = 32
MIN_GAP = 0.05
GROUP = 8  # images per prompt in the training data
PALETTE = torch.tensor(list(COLORS.values()))
LAPLACIAN = torch.tensor([[1.0, -2, 1], [-2, 4, -2], [1, -2, 1]]).view(1, 1, 3, 3) / 4
N_FEATURES = 3 + len(COLORS) + 7
MAX_GROUPS = 3  # object groups per prompt (free-form: 1-3, GenEval: 1-2)


@lru_cache(maxsize=None)
def object_groups(text: str) -> tuple[tuple[int, int, int, int], ...]:
    """(shape, colour + 1 or 0, count, size + 1 or 0) of each object group the prompt asks for,
    from its parsed spec (free-form or GenEval phrasing); () for other prompts (text on a sign)."""
    for task in ("pickscore", "geneval"):
        try:
            spec = parse_prompt(text, task).spec
        except ValueError:
            continue
        objs = spec.get("objects") or [{"shape": c["class"], **c} for c in spec["include"]]
        return tuple((SHAPES.index(o["shape"]), list(COLORS).index(o["color"]) + 1 if o.get("color") else 0,
                      o["count"], list(SIZES).index(o["size"]) + 1 if o.get("size") else 0)
                     for o in objs[:MAX_GROUPS])
    return ()


def pixel_features(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Input channels [B, N_FEATURES, H, W] making each of the taste's cues local and easy:
    RGB in [-1, 1]; a soft channel per palette colour (1 at the colour, 0 beyond an RGB distance
    of 0.4); the palette colours the prompt names / does not name; how close each pixel is to the
    named background (0 when none is named); the subject (pixels unlike the border's median
    colour); |Laplacian| (noise and sharp edges); and y, x coordinates (composition)."""
    b, _, h, w = images.shape
    near = (1 - torch.cdist(images.permute(0, 2, 3, 1).reshape(b, -1, 3), PALETTE.to(images)) / 0.4).clamp_min(0)
    near = near.transpose(1, 2).reshape(b, -1, h, w)
    toks = [set(words(p)) for p in prompts]
    named = torch.tensor([[c in t for c in COLORS] for t in toks], dtype=images.dtype)[..., None, None]
    bg = torch.tensor([next((v for k, v in BACKGROUNDS.items() if k in t), (9.0,) * 3) for t in toks])
    bg_match = (1 - (images - bg.to(images)[..., None, None]).abs().amax(1, keepdim=True) / 0.25).clamp_min(0)
    subject = (((images - background_color(images)).abs().amax(1, keepdim=True) - 0.1) / 0.2).clamp(0, 1)
    lap = F.conv2d(F.pad(images, (1,) * 4, mode="replicate"), LAPLACIAN.repeat(3, 1, 1, 1), groups=3)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    return torch.cat([images * 2 - 1, near, (near * named).sum(1, keepdim=True),
                      (near * (1 - named)).sum(1, keepdim=True), bg_match, subject,
                      lap.abs().amax(1, keepdim=True), yy.expand(b, 1, h, w), xx.expand(b, 1, h, w)], 1)


class PickScoreToy(nn.Module):
    def __init__(self, vocab: list[str], width: int = 16, text_dim: int = 32):
        super().__init__()
        self.vocab = {w: i + 1 for i, w in enumerate(vocab)}  # 0 = padding / unknown
        n = len(vocab) + 1  # unigrams, then bigrams
        self.embed = nn.EmbeddingBag(n + n * n, text_dim, mode="mean", padding_idx=0)
        # one embedding per object group: shape + colour + count + size
        self.group_embed = nn.ModuleList(nn.Embedding(k, text_dim) for k in
                                         (len(SHAPES), len(COLORS) + 1, 5, len(SIZES) + 1))
        w = width
        self.conv1 = nn.Conv2d(N_FEATURES, w, 3, padding=1)
        self.conv2 = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(2 * w, 3 * w, 3, stride=2, padding=1)
        self.conv4 = nn.Conv2d(3 * w, 4 * w, 3, stride=2, padding=1)
        self.film = nn.Linear(text_dim, 2 * (2 * w + 3 * w))
        self.keys = nn.Conv2d(3 * w, text_dim + 1, 1)  # per cell: match key, any-object density
        self.query = nn.Linear(text_dim, text_dim)
        self.credit = nn.Sequential(nn.Linear(4, 16), nn.GELU(), nn.Linear(16, 16))
        self.head = nn.Sequential(nn.Linear(8 * w + text_dim + 16 + 2, 64), nn.GELU(), nn.Linear(64, 2))

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        n = len(self.vocab) + 1
        uni = [[self.vocab[t] for t in words(p) if t in self.vocab] for p in prompts]
        ids = [u + [n + a * n + b for a, b in zip(u, u[1:])] or [0] for u in uni]
        flat = torch.tensor([i for seq in ids for i in seq], dtype=torch.long)
        offsets = torch.tensor(np.cumsum([0] + [len(s) for s in ids[:-1]]), dtype=torch.long)
        return self.embed(flat, offsets)

    def encode_groups(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Group embeddings [B, G, D], wanted counts [B, G] and mask [B, G] (G = MAX_GROUPS)."""
        g = torch.zeros(len(prompts), MAX_GROUPS, 4, dtype=torch.long)
        mask = torch.zeros(len(prompts), MAX_GROUPS)
        for b, p in enumerate(prompts):
            groups = object_groups(p)
            if groups:
                g[b, :len(groups)] = torch.tensor(groups)
                mask[b, :len(groups)] = 1
        emb = sum(e(g[..., k]) for k, e in enumerate(self.group_embed)) * mask[..., None]
        return emb, g[..., 2].float() * mask, mask

    def count_features(self, x: torch.Tensor, q: torch.Tensor, counts: torch.Tensor,
                       mask: torch.Tensor) -> torch.Tensor:
        """Sum-pooled densities of objects matching each group and of any object, against the
        wanted counts: [B, 16 + 2]."""
        keys = self.keys(x)
        match = F.softplus(torch.einsum("bgd,bdhw->bghw", self.query(q), keys[:, :-1])).sum((2, 3))
        found = F.softplus(keys[:, -1]).sum((1, 2))
        per_group = torch.stack([match, counts, match - counts, (match - counts).abs() / counts.clamp_min(1)], -1)
        credit = (self.credit(per_group) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        extra = found - counts.sum(1)
        return torch.cat([credit, extra[:, None], extra.abs()[:, None]], 1)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Logits [B] for images [B, 3, H, W] in [0, 1] and prompt texts."""
        if images.shape[-1] != SIZE:
            images = F.interpolate(images, size=(SIZE, SIZE), mode="area")
        q, counts, mask = self.encode_groups(prompts)
        t = self.encode_text(prompts) + q.sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        g2, b2, g3, b3 = self.film(t).split([self.conv2.out_channels] * 2 + [self.conv3.out_channels] * 2, dim=1)
        x = F.gelu(self.conv1(pixel_features(images, prompts)))
        x = F.gelu(self.conv2(x) * (1 + g2[..., None, None]) + b2[..., None, None])
        x3 = F.gelu(self.conv3(x) * (1 + g3[..., None, None]) + b3[..., None, None])
        x = F.gelu(self.conv4(x3))
        feats = torch.cat([x.mean((2, 3)), x.amax((2, 3)), t, self.count_features(x3, q, counts, mask)], dim=1)
        # two learned factors multiplied (an unfaithful image should not be saved by its looks)
        log_t = F.logsigmoid(self.head(feats)).sum(1).clamp_max(-1e-6)
        return log_t - torch.log1p(-log_t.exp())


# ----------------------------------------------------------------------------- data

def image_group(prompt: Prompt, other: Prompt, rng: np.random.Generator, seed: int,
                appealing: bool = False) -> torch.Tensor:
    """GROUP images for one prompt, from perfect to poor, as a GRPO group might look; with
    `appealing`, the second layout and the second wrong scene are made appealing (module docstring)."""
    scene = scene_for_prompt(prompt, rng)
    scenes = [scene, scene_for_prompt(prompt, rng), perturb_scene(scene, rng, SIZE),
              perturb_scene(scene, rng, SIZE), scene_for_prompt(other, rng)]
    if appealing:
        scenes[1], scenes[3] = appeal_scene(scenes[1], rng, SIZE), appeal_scene(scenes[3], rng, SIZE)
    x = render_scenes(scenes)
    sigma = float(rng.uniform(0.4, 1.2))
    extra = torch.stack([blur(x[:1], sigma)[0], blotch(x[1:2], 2)[0], degrade(x[2:3], seed, p=0.6)[0]])
    return degrade(torch.cat([x, extra]), seed + 1, p=0.15)


def make_data(prompts: list[Prompt], seed: int) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Images (uint8 [N * GROUP, 3, 32, 32]), their prompt texts, and taste labels (at the current
    conflict setting)."""
    rng = np.random.default_rng(seed)
    images, texts = [], []
    for i, p in enumerate(prompts):
        other = prompts[int(rng.integers(len(prompts)))]
        images.append(image_group(p, other, rng, seed * 100003 + i, appealing=conflict.get() > 0))
        texts += [p.text] * GROUP
    x = torch.cat(images)
    labels = torch.cat([taste(x[j: j + 4096], [prompts[k // GROUP] for k in range(j, min(j + 4096, len(x)))])
                        for j in range(0, len(x), 4096)])
    return (x * 255).round().to(torch.uint8), texts, labels


def pairs_of(labels: torch.Tensor, min_gap: float = MIN_GAP) -> torch.Tensor:
    """All within-group pairs (winner, loser) whose taste differs by >= min_gap: [P, 2]."""
    i, j = torch.triu_indices(GROUP, GROUP, 1)
    base = torch.arange(0, len(labels), GROUP)[:, None]
    a, b = (base + i).flatten(), (base + j).flatten()
    gap = labels[a] - labels[b]
    keep = gap.abs() >= min_gap
    return torch.stack([torch.where(gap > 0, a, b), torch.where(gap > 0, b, a)], 1)[keep]


@torch.no_grad()
def pairwise_accuracy(model: PickScoreToy, images: torch.Tensor, texts: list[str], pairs: torch.Tensor) -> float:
    s = predict(model, images, texts)
    return float((s[pairs[:, 0]] > s[pairs[:, 1]]).float().mean())


@torch.no_grad()
def predict(model: PickScoreToy, images: torch.Tensor, texts: list[str], batch: int = 1024) -> torch.Tensor:
    model.eval()
    out = [model(images[i: i + batch].float() / 255 if images.dtype == torch.uint8 else images[i: i + batch],
                 texts[i: i + batch]) for i in range(0, len(images), batch)]
    return torch.cat(out)


# ----------------------------------------------------------------------------- training

def group_rank_loss(scores: torch.Tensor, tastes: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry over every within-group pair whose taste differs by >= MIN_GAP, for
    scores and tastes [G, GROUP]: one forward of a group yields up to 28 preference pairs."""
    prefer = (tastes[:, :, None] - tastes[:, None, :]) >= MIN_GAP
    nll = F.softplus(scores[:, None, :] - scores[:, :, None])
    return (nll * prefer).sum() / prefer.sum().clamp_min(1)


def training_prompts(n: int, seed: int) -> list[Prompt]:
    """The train split plus fresh grammar prompts (never a test prompt) up to n distinct ones:
    many distinct prompts keep the scorer from memorising prompts instead of judging images."""
    prompts = read_prompts("pickscore", "train")
    taken = {p.text for p in prompts} | {p.text for p in read_prompts("pickscore", "test")}
    rng = np.random.default_rng(seed)
    while len(prompts) < n:
        p = random_freeform(rng)
        if p.text not in taken:
            taken.add(p.text)
            prompts.append(p)
    return prompts


def train(steps: int = 6000, batch_groups: int = 16, lr: float = 3e-3, seed: int = 0,
          n_prompts: int = 8000, width: int = 16, out_dir: Path | None = WEIGHTS_DIR,
          conflict_setting: float = 0.0) -> dict:
    """Train the scorer on train-split and fresh prompts labelled by the taste at
    `conflict_setting`, measure it on test-split ones, and (with out_dir) save weights + config.
    Returns what was measured."""
    torch.manual_seed(seed)
    t0 = time.time()
    with conflict.setting(conflict_setting):
        x, texts, y = make_data(training_prompts(n_prompts, seed), seed)
        xt, texts_t, yt = make_data(read_prompts("pickscore", "test"), seed + 1)
    pairs, pairs_t = pairs_of(y), pairs_of(yt)
    t_data = time.time() - t0
    model = PickScoreToy(vocabulary(), width=width)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        model.train()
        groups = torch.randint(len(x) // GROUP, (batch_groups,), generator=gen)
        idx = (groups[:, None] * GROUP + torch.arange(GROUP)).flatten()
        images = x[idx].float() / 255
        flip = torch.rand(len(idx), generator=gen) < 0.5  # the taste is mirror-symmetric
        images[flip] = images[flip].flip(-1)
        s, target = model(images, [texts[k] for k in idx.tolist()]).view(-1, GROUP), y[idx].view(-1, GROUP)
        rank = group_rank_loss(s, target)
        calib = F.mse_loss(torch.sigmoid(s), target)   # on the taste's scale
        loss = rank + 4 * calib
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 500 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  rank {rank.item():.4f}  calib {calib.item():.4f}")
    s_t = torch.sigmoid(predict(model, xt, texts_t))
    metrics = {
        "heldout_pairwise_accuracy": pairwise_accuracy(model, xt, texts_t, pairs_t),
        "heldout_pairs": len(pairs_t),
        "heldout_pairwise_accuracy_gap_0.02": pairwise_accuracy(model, xt, texts_t, pairs_of(yt, 0.02)),
        "heldout_pairwise_accuracy_gap_0.2": pairwise_accuracy(model, xt, texts_t, pairs_of(yt, 0.2)),
        "train_pairwise_accuracy": pairwise_accuracy(model, x[:len(xt)], texts[:len(xt)], pairs_of(y[:len(xt)])),
        "heldout_corr_with_taste": float(torch.corrcoef(torch.stack([s_t, yt]))[0, 1]),
        "heldout_mae_to_taste": float((s_t - yt).abs().mean()),
        "train_images": len(x), "train_pairs": len(pairs), "steps": steps, "seed": seed,
        "conflict": conflict_setting,
        "data_seconds": round(t_data, 1), "train_seconds": round(time.time() - t0 - t_data, 1),
    }
    if out_dir is not None:
        config = {"vocab": vocabulary(), "width": model.conv1.out_channels,
                  "text_dim": model.embed.embedding_dim, "size": SIZE, "metrics": metrics}

        def build(folder: Path) -> None:
            save_file(model.state_dict(), str(folder / "model.safetensors"))
            (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")
        # written beside and renamed in: an interrupted run never leaves half a proxy (the old is in git)
        replace_directory(out_dir, build, keep=False)
    return metrics


def folder_of(setting: float) -> Path:
    """The shipped folder of a conflict setting's proxy (WEIGHTS_DIR at 0), whether or not it exists."""
    tag = conflict.tag(setting)
    return ASSETS / f"pickscore_toy_{tag}" if tag else WEIGHTS_DIR


def weights_dir(setting: float | None = None) -> Path:
    """Where the proxy of a conflict setting (default: the current one) lives; an error naming the
    command that trains it when it is not there."""
    directory = folder_of(conflict.get() if setting is None else setting)
    if not (directory / "model.safetensors").exists():
        value = conflict.get() if setting is None else setting
        raise UserError(f"no PickScore proxy for conflict={value:g} (looked in {directory}); train it: "
                        f"python -m flowopd_lib.rewards.pickscore --conflict {value:g}  (about 25 min on one core)")
    return directory


def weights_digest(directory: Path | None = None) -> str:
    """sha256 (16 hex digits) of a proxy's weights file (default: the current setting's): its version."""
    return _digest(directory or weights_dir())


@lru_cache(maxsize=None)
def _digest(directory: Path) -> str:
    return hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()[:16]


@lru_cache(maxsize=4)
def load(directory: Path = WEIGHTS_DIR) -> PickScoreToy:
    """A shipped scorer (cached), in eval mode."""
    config = json.loads((directory / "config.json").read_text())
    model = PickScoreToy(config["vocab"], config["width"], config["text_dim"])
    model.load_state_dict(load_file(str(directory / "model.safetensors")))
    return model.eval()


@torch.no_grad()
def score(images: torch.Tensor, prompts: list[Prompt]) -> dict[str, torch.Tensor]:
    """{"reward": the learned proxy in (0, 1) [B], "true": the hidden taste [B]}, both at the
    current conflict setting."""
    proxy = torch.sigmoid(load(weights_dir())(images.float().clamp(0, 1), [p.text for p in prompts]))
    return {"reward": proxy, "true": taste(images, prompts)}


def main(argv: list[str] | None = None) -> None:
    from .. import cli

    parser = cli.parser(__doc__.split("\n")[0])
    parser.add_argument("--conflict", type=float, default=0.0, help="the conflict setting whose taste labels the data")
    parser.add_argument("--out", default=None, help="weights folder (default: the setting's shipped folder)")
    parser.add_argument("--steps", type=cli.count, default=6000, help="training steps")
    args = parser.parse_args(argv)
    setting = conflict.check(args.conflict)
    out = Path(args.out) if args.out else folder_of(setting)
    torch.set_num_threads(1)
    for k, v in train(steps=args.steps, out_dir=out, conflict_setting=setting).items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    from ..cli import entry
    entry(main)()

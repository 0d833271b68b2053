"""What an OCR model gets wrong: the kinds of error in the text it writes, by the quoted text's length.

The toy base draws crisp glyphs (the reader reads every ground-truth render exactly after the
autoencoder: `autoencoder_ceiling`, printed by the command), so the OCR reward measures whether the
right glyphs land in the right places. Each sample's read text is put in one class:

    exact        the quoted text
    order        the right glyphs (as a multiset) in the wrong order: a binding error ("H6" -> "6H")
    glyphs       the right number of glyphs, some of them wrong
    count        a different number of glyphs

    python -m flowopd_lib.diagnostics.ocr_errors --adapter flowopd_lib/assets/teachers/ocr --out runs/ocr_errors

prints the class shares per model (the base, and each `--adapter`) and text length, and with
`--out` writes the table and a figure: ground-truth renders above each model's samples, with what
the reader saw. Protocol: the teachers' (CFG 1, 20 ODE steps), test prompts, paired noise.

It also prints the order signal of the frozen text encoders (`order_signal`): how much a glyph's
context token changes between `"XY"` and `"YX"`, against how much two glyphs differ in one slot.
An adapter on the MMDiT sees only these tokens, so it can place glyphs no better than they encode
their order.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd
import torch

from .. import cli

CLASSES = ("exact", "order", "glyphs", "count")


def error_class(read: str, target: str) -> str:
    """One of CLASSES for the text read against the quoted target."""
    if read == target:
        return "exact"
    if Counter(read) == Counter(target):
        return "order"
    return "glyphs" if len(read) == len(target) else "count"


def error_table(reads: dict[str, list[str]], targets: list[str]) -> pd.DataFrame:
    """Share of each error class per model and target length (rows: model, length incl. "all")."""
    rows = []
    for model, texts in reads.items():
        if len(texts) != len(targets):
            raise ValueError(f"{model}: {len(texts)} read texts for {len(targets)} targets")
        frame = pd.DataFrame({"length": [len(t) for t in targets],
                              "class": [error_class(r, t) for r, t in zip(texts, targets)]})
        for length, part in [*frame.groupby("length"), ("all", frame)]:
            shares = part["class"].value_counts(normalize=True)
            rows.append({"model": model, "length": str(length), "n": len(part),
                         **{c: float(shares.get(c, 0.0)) for c in CLASSES}})
    return pd.DataFrame(rows).set_index(["model", "length"])


def sample_reads(models: dict, prompts: list, samples_per_prompt: int, cfg_scale: float = 1.0, steps: int = 20,
                 seed: int = 0) -> tuple[dict[str, list[str]], dict[str, torch.Tensor]]:
    """Each model's read texts (prompt-major, sample j from the noise of seed + j) and its images."""
    from .. import rollout
    from ..rewards import ocr

    reads, images = {}, {}
    for name, model in models.items():
        batches = [rollout.generate(model, [p.text for p in prompts], steps=steps, cfg_scale=cfg_scale, seed=seed + j)
                   for j in range(samples_per_prompt)]
        stacked = torch.stack(batches, 1).flatten(0, 1)  # [prompts * samples, 3, H, W], prompt-major
        reads[name], images[name] = ocr.read_text(stacked), stacked
    return reads, images


def figure(prompts: list, images: dict[str, torch.Tensor], reads: dict[str, list[str]], samples_per_prompt: int,
           n: int = 12, path: str | Path | None = None):
    """Ground-truth renders (top row) above each model's first sample of the first n prompts."""
    import matplotlib.pyplot as plt

    from .. import toy

    n = min(n, len(prompts))
    rows = {"render": (toy.render(prompts[:n], seed=0), [p.spec["text"] for p in prompts[:n]])}
    for name, stacked in images.items():
        rows[name] = (stacked[::samples_per_prompt][:n], reads[name][::samples_per_prompt][:n])
    fig, axes = plt.subplots(len(rows), n, figsize=(1.1 * n, 1.35 * len(rows)), squeeze=False)
    for r, (name, (imgs, texts)) in enumerate(rows.items()):
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(imgs[c].permute(1, 2, 0).clamp(0, 1).cpu().numpy(), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(repr(texts[c]), fontsize=7)
            if c == 0:
                ax.set_ylabel(name, fontsize=7)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def order_signal(model, n_pairs: int = 50, seed: int = 0) -> dict[str, float]:
    """Mean relative change of a glyph's context token between first and second place of a two-glyph
    text (`order`), of the pooled vector (`pooled_order`), and between two glyphs in one slot (`glyph`),
    over random glyph pairs in one OCR template."""
    import numpy as np

    from ..toy.font import GLYPHS

    def rel(u, v):
        return ((u - v).norm() / u.norm()).item()

    rng = np.random.default_rng(seed)
    template = 'a sign that says "{}"'
    order, pooled, glyph = [], [], []
    for _ in range(n_pairs):
        a, b = rng.choice(list(GLYPHS), 2, replace=False)
        embeds = model.encode_prompts([template.format(a + b), template.format(b + a)])
        ids = model.tokenizer([template.format(a + b), template.format(b + a)])
        first = int((ids[0] != ids[1]).nonzero()[0])  # the texts differ exactly at the two glyphs' tokens
        t = embeds.tokens
        order.append(rel(t[0, first], t[1, first + 1]))  # a first vs a second
        glyph.append(rel(t[0, first], t[1, first]))  # a vs b in the first slot
        pooled.append(rel(embeds.pooled[0], embeds.pooled[1]))
    return {"order": float(np.mean(order)), "pooled_order": float(np.mean(pooled)), "glyph": float(np.mean(glyph))}


def autoencoder_ceiling(model, prompts: list) -> float:
    """Share of the prompts' ground-truth renders read exactly after the model's autoencoder
    (encode, decode): what OCR could reach if the flow put the right latent down."""
    from .. import toy
    from ..rewards import ocr

    with torch.no_grad():
        decoded = model.decode(model.encode_images(toy.render(prompts, seed=0)))
    return sum(r == p.spec["text"] for r, p in zip(ocr.read_text(decoded), prompts)) / len(prompts)


@cli.entry
def main(argv: list[str] | None = None) -> None:
    from .. import adapters, data, models
    from ..teachers import PROTOCOL

    parser = cli.parser(__doc__)
    parser.add_argument("--adapter", action="append", default=[], help="an adapter directory (repeatable)")
    parser.add_argument("--prompts", type=cli.count, default=90, help="OCR test prompts")
    parser.add_argument("--samples", type=cli.count, default=4, help="samples per prompt")
    parser.add_argument("--out", type=Path, help="folder for ocr_errors.csv and ocr_errors.png")
    args = parser.parse_args(argv)
    for directory in args.adapter:  # every input before the model loads
        adapters.check_folder(directory, "--adapter")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise cli.UserError(f"--out {args.out} is a file: name a folder for ocr_errors.csv and ocr_errors.png")
    prompts = data.prompts("ocr", args.prompts, "test", PROTOCOL["seed"])  # more than the test set: one line
    model = models.load_base("toy")
    views = {"base": adapters.view(model, None)}
    for i, directory in enumerate(args.adapter):
        views[Path(directory).name if Path(directory).name != "adapter" else Path(directory).parent.name] = \
            adapters.view(model, adapters.load(model, directory, f"a{i}"))
    reads, images = sample_reads(views, prompts, args.samples, PROTOCOL["cfg_scale"], PROTOCOL["steps"],
                                 PROTOCOL["seed"])
    targets = [p.spec["text"] for p in prompts for _ in range(args.samples)]
    table = error_table(reads, targets)
    print(table.round(3).to_markdown())
    print(f"\nground-truth renders read exactly through the autoencoder: {autoencoder_ceiling(model, prompts):.3f}")
    signal = order_signal(model)
    print(f"\norder signal of the text encoders (relative change of a glyph's token, first vs second place): "
          f"{signal['order']:.4f}; of the pooled vector: {signal['pooled_order']:.5f}; two glyphs in one slot: "
          f"{signal['glyph']:.3f}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out / "ocr_errors.csv")
        figure(prompts, images, reads, args.samples, path=args.out / "ocr_errors.png")
        print(f"wrote {args.out / 'ocr_errors.csv'} and {args.out / 'ocr_errors.png'}")


if __name__ == "__main__":
    main()

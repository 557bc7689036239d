"""A self-contained HTML evaluation report: metrics, loss curves, sample images with generated vs.
reference captions, and a per-word attention heat-map. Everything is inline (no external files), so
the KFP UI can show it as an ``HTML`` artifact."""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from captioner.data.images import load_image

METRIC_LABELS = {"bleu1": "BLEU-1", "bleu2": "BLEU-2", "bleu3": "BLEU-3", "bleu4": "BLEU-4", "meteor": "METEOR",
                 "rouge_l": "ROUGE-L", "cider": "CIDEr-D"}


def _png(img: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def attention_overlays(pixels: np.ndarray, attention: np.ndarray, size: int = 112) -> list[Image.Image]:
    """One image per word: the picture with that word's attention over the region grid in red."""
    side = int(round(math.sqrt(attention.shape[-1])))
    base = Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR).convert("RGB")
    grey = np.asarray(base.convert("L").convert("RGB"), dtype=np.float32)
    out = []
    for weights in attention:
        grid = np.asarray(weights[: side * side], np.float32).reshape(side, side)
        grid = grid / (grid.max() or 1.0)
        heat = np.asarray(Image.fromarray(np.uint8(grid * 255)).resize((size, size), Image.Resampling.BILINEAR),
                          np.float32)[..., None] / 255.0
        red = np.zeros_like(grey)
        red[..., 0] = 255
        blended = grey * (1 - 0.6 * heat) + red * 0.6 * heat
        out.append(Image.fromarray(np.uint8(np.clip(blended, 0, 255))))
    return out


COLOURS = {"train_loss": "#1f77b4", "val_loss": "#d62728", "dev_bleu4": "#2ca02c", "dev_cider": "#9467bd",
           "train_reward": "#ff7f0e"}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _phase(row: dict[str, Any]) -> str:
    return "scst" if row.get("phase") == "scst" else "xe"


def curves_svg(rows: Sequence[dict[str, Any]], keys: Sequence[str], label: str, width: int = 420,
               height: int = 180) -> str:
    """Line chart of ``keys`` over epochs; the SCST epochs, if any, are shaded and labelled."""
    series = {key: [(r["epoch"], r[key]) for r in rows if _is_number(r.get(key))] for key in keys}
    series = {k: s for k, s in series.items() if s}
    points = [v for s in series.values() for _, v in s]
    if not points:
        return f"<p>No {html.escape(label)} history.</p>"
    epochs = [r["epoch"] for r in rows if _is_number(r.get("epoch"))]
    lo, hi = min(points), max(points)
    emin, emax = min(epochs), max(epochs)

    def x_of(epoch):
        return 40 + (width - 60) * ((epoch - emin) / ((emax - emin) or 1))

    def xy(epoch, value):
        return f"{x_of(epoch):.1f},{10 + (height - 40) * (1 - (value - lo) / ((hi - lo) or 1)):.1f}"

    shading = ""
    scst = [r["epoch"] for r in rows if _phase(r) == "scst"]
    if scst:
        left = x_of(min(scst) - 0.5 if min(scst) > emin else emin)
        shading = (f'<rect x="{left:.1f}" y="10" width="{x_of(emax) - left + 5:.1f}" height="{height - 40}" '
                   f'fill="#fff3e0"/><text x="{left + 4:.1f}" y="22" font-size="11" fill="#e65100">SCST</text>'
                   f'<text x="44" y="22" font-size="11" fill="#555">cross-entropy</text>')
    lines = [f'<polyline fill="none" stroke="{COLOURS[k]}" stroke-width="2" '
             f'points="{" ".join(xy(e, v) for e, v in s)}"/>' for k, s in series.items()]
    # Points too, so that a one-epoch run still shows something.
    lines += [f'<circle r="3" fill="{COLOURS[k]}" cx="{xy(e, v).split(",")[0]}" cy="{xy(e, v).split(",")[1]}"/>'
              for k, s in series.items() for e, v in s]
    legend = " ".join(f'<tspan fill="{COLOURS[k]}">{k}</tspan>' for k in series)
    return (f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">'
            f'<rect width="100%" height="100%" fill="white" stroke="#ccc"/>{shading}{"".join(lines)}'
            f'<text x="40" y="{height - 8}" font-size="11">epochs {emin}-{emax}; '
            f'{html.escape(label)} {lo:.3f}-{hi:.3f}; {legend}</text>'
            "</svg>")


def loss_curves_svg(rows: Sequence[dict[str, Any]], width: int = 420, height: int = 180) -> str:
    # SCST's loss is a reward-weighted log-likelihood, not comparable with cross-entropy: not drawn.
    return curves_svg([r for r in rows if _phase(r) == "xe"], ("train_loss", "val_loss"), "loss", width, height)


def training_curves_html(rows: Sequence[dict[str, Any]]) -> str:
    """Loss (cross-entropy) and dev scores (every epoch, both phases) with the SCST phase marked."""
    dev = curves_svg(rows, ("dev_bleu4", "dev_cider"), "dev score")
    parts = [loss_curves_svg(rows), dev]
    if any(_phase(r) == "scst" for r in rows):
        parts.append(curves_svg([r for r in rows if _phase(r) == "scst"], ("train_reward",), "SCST reward"))
    return "".join(parts)


def history_html(history: Sequence[dict[str, Any]] | dict[str, Sequence[dict[str, Any]]]) -> str:
    """One run's curves, or an ensemble's: each member's under its name."""
    if isinstance(history, dict):
        return "".join(f"<h3>{html.escape(name)}</h3>{training_curves_html(rows)}" for name, rows in history.items())
    return training_curves_html(history)


def evaluation_html(report: dict[str, Any], history: Sequence[dict[str, Any]] | dict[str, Sequence[dict[str, Any]]],
                    image_paths: dict[str, Path],
                    image_size: int, attention_example: dict[str, Any] | None = None,
                    title: str = "Captioner evaluation") -> str:
    esc = html.escape
    metric_rows = "".join(
        f"<tr><th>{label}</th><td>{_fmt(report['beam'].get(key))}</td><td>{_fmt(report['greedy'].get(key))}</td></tr>"
        for key, label in METRIC_LABELS.items())
    samples = []
    for sample in report.get("samples", []):
        path = image_paths.get(sample["image"])
        thumb = ""
        if path is not None and Path(path).is_file():
            thumb = f'<img src="{_png(Image.fromarray(load_image(path, 160)), "JPEG")}" width="160" height="160">'
        refs = "".join(f"<li>{esc(r)}</li>" for r in sample["references"])
        samples.append(f"<div class='sample'>{thumb}<div><b>beam:</b> {esc(sample['generated_beam'])}<br>"
                       f"<b>greedy:</b> {esc(sample['generated_greedy'])}<br><small>{esc(sample['image'])}</small>"
                       f"<ul>{refs}</ul></div></div>")
    attention = ""
    if attention_example:
        pixels = load_image(attention_example["path"], image_size)
        tiles = attention_overlays(pixels, np.asarray(attention_example["attention"]))
        cells = "".join(f"<figure><img src='{_png(tile)}'><figcaption>{esc(word)}</figcaption></figure>"
                        for tile, word in zip(tiles, attention_example["words"], strict=False))
        attention = (f"<h2>Attention: {esc(' '.join(attention_example['words']))}</h2>"
                     f"<div class='attention'>{cells}</div>")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>body{{font-family:sans-serif;margin:20px}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;
padding:4px 10px;text-align:right}}.sample{{display:flex;gap:12px;margin:10px 0;align-items:flex-start}}
.attention{{display:flex;flex-wrap:wrap;gap:6px}}figure{{margin:0;text-align:center}}</style></head><body>
<h1>{esc(title)}</h1>
<p>Split <b>{esc(str(report.get('split')))}</b>, {report.get('images')} images; COCO caption metrics
(tokenizer: {esc(str(report.get('tokenizer')))}); beam size {report['beam'].get('beam_size')},
length penalty {report['beam'].get('length_penalty')}.</p>
<table><tr><th></th><th>beam</th><th>greedy</th></tr>{metric_rows}</table>
<h2>Training curves</h2>{history_html(history)}
{attention}
<h2>Samples</h2>{''.join(samples)}
</body></html>"""


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "n/a"


def attention_example(model, tokenizer, store, image: str, path: Path, cfg) -> dict[str, Any]:
    """Beam-decode one image from its cached features and keep the attention of the best caption."""
    import tensorflow as tf

    from captioner.model.decoding import decode
    from captioner.predictor import results_from_decode

    features = tf.constant(store.load([image]))
    out = decode(model, model.encode(features), beam_size=cfg.decode.beam_size, max_length=cfg.decode.max_length,
                 length_penalty=cfg.decode.length_penalty, no_repeat_ngram_size=cfg.decode.no_repeat_ngram_size)
    result = results_from_decode({k: v.numpy() for k, v in out.items()}, tokenizer.tokens, with_attention=True)[0]
    return {"path": path, "words": result.words, "attention": result.attention}

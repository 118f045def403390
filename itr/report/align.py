"""Word x region alignments of one image-caption pair, drawn over the image's region boxes (inline SVG).

A model with ``alignment(img_emb, cap_emb)`` (SCAN's attention, TERAN's and TGDT's region-word dot products)
gives (words, regions) weights; each word gets a small panel: the picture (or an empty frame for feature-only
data) with every region's box filled in proportion to the word's weight on it, the strongest outlined.
Attention weights are shown against the word's largest; dot products from the word's smallest to its largest.
"""
from html import escape

import numpy as np

from itr.eval.scores import rows

SPECIAL = {"<start>", "<end>", "<pad>", "<unk>", "[CLS]", "[SEP]", "[PAD]"}
MAX_WORDS = 12


def token_labels(tokenizer, caption):
    """The caption's tokens as the model reads them (word vocabulary or transformers tokenizer)."""
    ids = tokenizer.encode(caption)
    if hasattr(tokenizer, "idx2word"):
        return [tokenizer.idx2word[i] for i in ids]
    return tokenizer.tok.convert_ids_to_tokens(ids)


def _panel(label, weights, boxes, thumb, attention):
    if attention:
        v = weights / max(float(weights.max()), 1e-12)
    else:
        lo, hi = float(weights.min()), float(weights.max())
        v = (weights - lo) / max(hi - lo, 1e-12)
    w, h = (thumb["w"], thumb["h"]) if thumb else (100, 100)
    if thumb:
        bg = f'<image href="{escape(thumb["href"])}" x="0" y="0" width="{w}" height="{h}" preserveAspectRatio="none"/>'
    else:
        bg = f'<rect class="frame" x="0" y="0" width="{w}" height="{h}"/>'
    top = int(np.argmax(weights))
    rects = []
    for r in np.argsort(v, kind="stable"):  # the strongest drawn last, on top
        x1, y1, x2, y2 = (boxes[r] * np.array([w, h, w, h])).tolist()
        stroke = 'stroke="#d00" stroke-width="2.5"' if r == top else 'stroke="#fff" stroke-width="0.5"'
        rects.append(f'<rect x="{x1:.1f}" y="{y1:.1f}" width="{max(x2 - x1, 0.5):.1f}" height="{max(y2 - y1, 0.5):.1f}" '
                     f'fill="rgb(255,90,0)" fill-opacity="{0.6 * float(v[r]):.3f}" {stroke}/>')
    return (f'<figure class="word"><svg class="align" viewBox="0 0 {w} {h}" width="150" height="{150 * h / w:.0f}">'
            f'{bg}{"".join(rects)}</svg><figcaption>{escape(label)} <span class="w">{float(weights[top]):.2f}'
            f'</span></figcaption></figure>')


def figure(inputs, i, j, thumb, title):
    """{"title", "html"} of image ``i`` x caption ``j``, or None: a model without ``alignment`` or data without
    region boxes."""
    model, split = inputs.model, inputs.split
    if not hasattr(model, "alignment") or split.boxes is None:
        return None
    p = next(model.parameters(), None)
    dev = p.device if p is not None else "cpu"
    a = model.alignment(rows(inputs.img, i, i + 1, dev), rows(inputs.cap, j, j + 1, dev))
    weights = a["weights"].float().cpu().numpy()
    boxes = np.asarray(split.boxes[i], np.float32)
    if getattr(split, "lens", None) is not None:  # variable regions: the image's own, zero padded past them
        boxes = boxes[:int(split.lens[i])]
    if boxes.shape[0] != weights.shape[1]:
        return None
    labels = token_labels(inputs.tokenizer, split.captions[j])[a["first_token"]:]
    words = [(label, weights[k]) for k, label in enumerate(labels[:weights.shape[0]]) if label not in SPECIAL]
    attention = "attention" in a["kind"]
    panels = "".join(_panel(label, w, boxes, thumb, attention) for label, w in words[:MAX_WORDS])
    return {"title": f"{a['kind']}, {title}", "html": panels}

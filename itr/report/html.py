"""The report page's HTML: one self-contained file (inline CSS, no script, no network), images linked
relatively. Hooks for tools and tests: ``table#metrics``; ``section#t2i`` / ``section#i2t`` holding
``div.query`` blocks (``data-direction``, ``data-gt-rank``, class ``failure`` when the ground truth is not
first); ``div.result`` cards, ``gt`` on the ground truth, with a ``span.gt-mark``; ``img.thumb``;
``figure.word`` alignment panels.
"""
from html import escape

CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px;margin-bottom:4px} .meta{color:#555;font-size:13px}
table#metrics{border-collapse:collapse;margin:12px 0 24px} #metrics td,#metrics th{border:1px solid #ccc;
padding:4px 10px;text-align:right} #metrics th:first-child,#metrics td:first-child{text-align:left}
.query{border:1px solid #ddd;border-radius:6px;padding:10px 12px;margin:12px 0;background:#fff}
.query.failure{border-left:6px solid #d33} .query.success{border-left:6px solid #2a2}
.qhead{font-size:15px;margin-bottom:8px} .rank{font-weight:600}
.results{display:flex;gap:10px;flex-wrap:wrap;align-items:flex-start}
.result{width:190px;border:1px solid #ccc;border-radius:4px;padding:6px;font-size:12px;background:#fafafa}
.result.gt{border:3px solid #2a2;background:#efe} .result.outside{border-style:dashed}
.gt-mark{color:#171;font-weight:700;display:block} .score{color:#555}
img.thumb{display:block;width:176px;height:auto;margin-bottom:4px}
.qimg img.thumb{width:220px} .caps{margin:2px 0 0 16px;padding:0} .id{font-family:monospace;font-size:11px}
.aligns{margin-top:8px} .aligns h4{margin:6px 0;font-size:13px;font-weight:500}
figure.word{display:inline-block;margin:3px;text-align:center;font-size:12px} .frame{fill:#e6e6e6}
.w{color:#777}
"""


def _metrics(m, protocol):
    rows = []
    for side, name in (("i2t", "image -> text"), ("t2i", "text -> image")):
        cells = "".join(f"<td>{m[f'{side}_{k}']:.1f}</td>" for k in ("R1", "R5", "R10", "medr", "meanr"))
        rows.append(f'<tr data-side="{side}"><td>{name}</td>{cells}</tr>')
    note = " (mean over 5 folds)" if protocol == "coco-5fold" else ""
    return (f'<table id="metrics"><tr><th>protocol {escape(protocol)}{note}</th><th>R@1</th><th>R@5</th>'
            f'<th>R@10</th><th>medr</th><th>meanr</th></tr>{"".join(rows)}'
            f'<tr><td>rsum</td><td colspan="5" id="rsum">{m["rsum"]:.1f}</td></tr></table>')


def _image_body(r):
    """An image: its thumbnail, or its captions where the data has no pictures; its id."""
    if r.get("thumb"):
        body = (f'<img class="thumb" src="{escape(r["thumb"]["href"])}" alt="image {escape(r["image_id"])}" '
                f'width="{r["thumb"]["w"]}" height="{r["thumb"]["h"]}">')
    else:
        body = '<ul class="caps">' + "".join(f"<li>{escape(c)}</li>" for c in r["captions"]) + "</ul>"
    return f'{body}<span class="id">{escape(r["image_id"])}</span>'


def _card(r, image):
    classes = "result" + (" gt" if r["gt"] else "") + (" outside" if r.get("outside") else "")
    mark = '<span class="gt-mark">&#10003; ground truth</span>' if r["gt"] else ""
    body = _image_body(r) if image else f'<div class="cap">{escape(r["caption"])}</div><span class="id">' \
                                         f'{escape(r["image_id"])}</span>'
    return (f'<div class="{classes}" data-rank="{r["rank"]}"><span class="rank">#{r["rank"]}</span> '
            f'<span class="score">score {r["score"]:.4f}</span>{mark}{body}</div>')


def _query(q):
    image_results = q["direction"] == "t2i"
    failed = q["gt_rank"] > 1
    if image_results:
        head = f'<div class="qhead">&ldquo;{escape(q["query"]["caption"])}&rdquo;</div>'
    else:
        head = f'<div class="qhead qimg"><b>query image</b>{_image_body(q["query"])}</div>'
    where = "first" if not failed else f"at rank {q['gt_rank']}"
    cards = [_card(r, image_results) for r in q["results"]]
    if q["gt_outside"]:
        cards.append(_card({**q["gt_outside"], "outside": True}, image_results))
    aligns = ""
    if q["alignments"]:
        aligns = '<div class="aligns">' + "".join(f'<h4>{escape(a["title"])}</h4><div>{a["html"]}</div>'
                                                  for a in q["alignments"]) + "</div>"
    return (f'<div class="query {"failure" if failed else "success"}" data-direction="{q["direction"]}" '
            f'data-gt-rank="{q["gt_rank"]}">{head}<div class="meta">ground truth {where}</div>'
            f'<div class="results">{"".join(cards)}</div>{aligns}</div>')


def _section(page, side, title):
    blocks = page[side]
    n = page["n_captions"] if side == "t2i" else page["n_images"]
    return (f'<section id="{side}"><h2>{title}</h2><p class="meta">{len(blocks)} of {n} queries, failures first '
            f'({page[f"{side}_failures"]} of the {n} queries fail: ground truth not first)</p>'
            + "".join(_query(q) for q in blocks) + "</section>")


def render(page):
    """The page of ``write_report``'s collected data."""
    title = f"{page.get('model', 'model')} on {page.get('data', '')} [{page.get('split', '')}]"
    chance = 100.0 / max(page["n_images"], 1)
    head = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>itr report: {escape(title)}</title>'
            f'<style>{CSS}</style></head><body><h1>What {escape(page.get("model", "the model"))} retrieves</h1>'
            f'<div class="meta">checkpoint {escape(page.get("checkpoint", ""))} &middot; data {escape(page.get("data", ""))}'
            f' &middot; split {escape(page.get("split", ""))}: {page["n_images"]} images, {page["n_captions"]} captions'
            f' &middot; chance t2i R@1 {chance:.2f}</div>')
    body = (_metrics(page["metrics"], page["protocol"]) + _section(page, "t2i", "Text &rarr; image")
            + _section(page, "i2t", "Image &rarr; text"))
    return head + body + "</body></html>\n"

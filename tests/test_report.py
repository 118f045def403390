"""The report page (``itr report``, ``itr eval --report``): what a checkpoint retrieves, as a person sees it in
a real browser (headless Chromium), its ranks agreeing with ``itr eval``, logged to MLflow, served on request."""
import json
import os
import re
import shutil
import subprocess
import threading
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from itr.report import sample_queries, serve

from conftest import run_itr
from helpers.retrieval import retrieval  # noqa: F401  (a fixture)

ROOT = Path(__file__).resolve().parents[1]
F8K_IMAGES = ROOT.parent / "shared" / "data" / "f8k_images"


def _images_by_id(data, split, out):
    """A folder of the split's pictures named by its ids: the real Flickr8k JPEGs (cycled) where ../shared/data
    has them, otherwise generated ones of several sizes."""
    from PIL import Image

    ids = (Path(data) / f"{split}_ids.txt").read_text().split()
    jpegs = sorted(F8K_IMAGES.glob("*.jpg")) if F8K_IMAGES.is_dir() else []
    out.mkdir()
    for n, name in enumerate(ids):
        if jpegs:
            shutil.copy(jpegs[n % len(jpegs)], out / name)
        else:
            Image.new("RGB", (320 + 10 * n, 240), (40 * n % 256, 90, 160)).save(out / name, format="JPEG")
    return out


@pytest.fixture(scope="module")
def scan_page(retrieval, tmp_path_factory):  # noqa: F811
    """``itr report`` of the SCAN checkpoint on the synthetic test split (boxes), with pictures by id."""
    data, ckpt = retrieval
    base = tmp_path_factory.mktemp("report")
    images = _images_by_id(data, "test", base / "pictures")
    out = base / "page"
    p = run_itr("report", ckpt("scan"), "--data", data, "--split", "test", "--out", out, "--queries", 6,
                "--images", images, "--json", base / "metrics.json")
    assert f"wrote the report page {out / 'index.html'}" in p.stdout
    return {"out": out, "html": (out / "index.html").read_text(), "metrics": json.loads((base / "metrics.json").read_text()),
            "data": data, "ckpt": ckpt("scan")}


class _Elements(HTMLParser):
    """Tags with their attributes, in document order."""

    def __init__(self, html):
        super().__init__()
        self.tags = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def classed(self, cls):
        return [a for t, a in self.tags if cls in (a.get("class") or "").split()]


def test_sampled_queries_show_failures_first_worst_first():
    ranks = np.array([0, 3, 0, 9, 1, 0, 0, 0, 2, 0])
    q = sample_queries(ranks, 6)
    assert len(q) == 6 and len(set(q)) == 6
    assert all(ranks[i] > 0 for i in q[:3]) and all(ranks[i] == 0 for i in q[3:])  # half of them failures...
    assert [ranks[i] for i in q[:3]] == sorted((ranks[i] for i in q[:3]), reverse=True)  # ...worst first
    assert sorted(q[3:]) == q[3:]
    assert sample_queries(ranks, 6) == q  # the same for a seed
    assert sample_queries(np.array([4, 2, 0]), 3) == [0, 1, 2]  # too few successes: more failures
    assert sample_queries(np.zeros(4, int), 3) == sorted(sample_queries(np.zeros(4, int), 3))


def test_the_page_agrees_with_itr_eval(scan_page):
    """The metric table holds the evaluation's figures; every query block's ground-truth rank is its rank in the
    evaluation's top-5 lists, and its marked card is the ground truth."""
    from itr.eval.job import run_eval

    html, m = scan_page["html"], scan_page["metrics"]
    for side in ("i2t", "t2i"):
        row = re.search(rf'<tr data-side="{side}">(.*?)</tr>', html).group(1)
        assert [float(x) for x in re.findall(r"<td>([\d.]+)</td>", row)] == \
            [round(m[f"{side}_{k}"], 1) for k in ("R1", "R5", "R10", "medr", "meanr")]
    top = Path(scan_page["out"]).parent / "top.npz"
    run_eval(scan_page["ckpt"], scan_page["data"], "test", save_topk=5, topk_path=top)
    z = np.load(top)
    blocks = re.findall(r'<div class="query (\w+)" data-direction="t2i" data-gt-rank="(\d+)"><div class="qhead">'
                        r'&ldquo;(.*?)&rdquo;.*?<div class="results">(.*?)</div></div>(?=<div class="query|</section>)',
                        html, re.S)
    caps = (Path(scan_page["data"]) / "test_caps.txt").read_text().splitlines()
    assert len(blocks) == 6
    for kind, gt_rank, caption, cards in blocks:
        j = caps.index(caption)
        cands = z["t2i_candidate"][z["t2i_query"] == j]
        where = np.flatnonzero(cands == j // 5)
        assert int(gt_rank) == (where[0] + 1 if len(where) else int(gt_rank)) and int(gt_rank) >= 1
        assert (kind == "failure") == (int(gt_rank) > 1)
        shown = re.findall(r'<div class="result( gt)?( outside)?" data-rank="(\d+)">', cards)
        marked = [int(r) for g, _, r in shown if g]
        assert marked == [int(gt_rank)]  # exactly one ground truth, at its rank (inside the top 5 or after it)
    kinds = [k for k, *_ in blocks]
    assert kinds == sorted(kinds, key=lambda k: k != "failure")  # failures first


def test_the_report_in_a_real_browser(scan_page, tmp_path):
    """Headless Chromium opens the page from disk: the metric table, both directions' query blocks, ground-truth
    marks, alignment panels over the pictures, and every picture loaded (no broken link). A screenshot is kept
    under the test's temp folder (and $ITR_TEST_ARTIFACTS)."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.geteuid() == 0:  # root can install it: `python3 dev.py test` does (apt-get install chromium)
            pytest.fail("chromium is not installed: apt-get install -y chromium (python3 dev.py test does it)")
        pytest.skip("no chromium (not root, so it cannot be installed here)")
    out = Path(scan_page["out"])
    # the browser's own count of broken pictures, written into the DOM it dumps: a copy of the page (same folder,
    # same relative links) with a script; the page itself has none
    probe = """<script>window.addEventListener('load', () => {
      const imgs = [...document.images];
      const bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src'));
      document.body.setAttribute('data-images', imgs.length);
      document.body.setAttribute('data-broken', JSON.stringify(bad));
      document.body.setAttribute('data-svg-images', document.querySelectorAll('svg image').length);
    });</script></body>"""
    check = out / "check.html"
    check.write_text(scan_page["html"].replace("</body>", probe))
    shot = tmp_path / "report.png"
    p = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        "--allow-file-access-from-files", f"--user-data-dir={tmp_path / 'profile'}",
                        "--window-size=1400,2400", "--virtual-time-budget=10000",
                        f"--screenshot={shot}", "--dump-dom", check.as_uri()],
                       capture_output=True, text=True, timeout=180)
    check.unlink()
    print(f"report screenshot: {shot}")
    if os.environ.get("ITR_TEST_ARTIFACTS"):
        os.makedirs(os.environ["ITR_TEST_ARTIFACTS"], exist_ok=True)
        shutil.copy(shot, os.environ["ITR_TEST_ARTIFACTS"])
    assert p.returncode == 0 and shot.is_file(), p.stderr[-3000:]
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(png[16:20], "big") == 1400 and len(png) > 30_000
    dom = _Elements(p.stdout)
    body = next(a for t, a in dom.tags if t == "body")
    assert "data-broken" in body, "the page's load event never came"
    assert int(body["data-images"]) >= 12 and json.loads(body["data-broken"]) == []
    assert int(body["data-svg-images"]) > 0  # alignments drawn over the pictures
    assert [t for t, a in dom.tags if a.get("id") == "metrics"] == ["table"]
    queries = dom.classed("query")
    assert [q["data-direction"] for q in queries] == ["t2i"] * 6 + ["i2t"] * 6
    marks, cls = [], [(a.get("class") or "").split() for _, a in dom.tags]
    for c in cls:
        if "query" in c:
            marks.append(0)
        elif "gt-mark" in c:
            marks[-1] += 1
    assert marks[:6] == [1] * 6 and all(1 <= m <= 5 for m in marks[6:])  # an image has 5 true captions
    assert len(dom.classed("word")) > 0 and len(dom.classed("thumb")) == int(body["data-images"])
    # every picture the page links (thumbnails and alignment backgrounds) is a file beside it
    hrefs = [a.get("src") or a.get("href") for t, a in dom.tags if t in ("img", "image")]
    assert hrefs and all((out / h).is_file() for h in hrefs)


@pytest.mark.slow
def test_eval_report_is_an_artifact_of_the_mlflow_run(retrieval, tmp_path):  # noqa: F811
    """``itr eval --report DIR --log-run``: the page and its pictures are logged under eval/ of the new run."""
    import mlflow

    data, ckpt = retrieval
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = run_itr("eval", ckpt("vsepp"), "--data", data, "--split", "test", "--report", tmp_path / "page",
                "--report-queries", 3, "--log-run", "--tracking-uri", uri)
    run_id = re.search(r"logged \S+ metrics to MLflow run (\w+)", p.stdout).group(1)
    client = mlflow.tracking.MlflowClient(uri)
    (folder,) = [f.path for f in client.list_artifacts(run_id, "eval") if f.is_dir]
    assert folder.endswith("report")
    names = {Path(f.path).name for f in client.list_artifacts(run_id, folder)}
    assert "index.html" in names
    local = client.download_artifacts(run_id, f"{folder}/index.html", str(tmp_path / "dl"))
    html = Path(local).read_text()
    assert 'id="metrics"' in html and html.count('class="query ') == 6
    assert "<img" not in html  # feature data without --report-images: images shown by their captions and ids


def test_serve_answers_on_localhost(scan_page):
    server = serve(scan_page["out"], 0)
    assert server.server_address[0] == "127.0.0.1"
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        with urllib.request.urlopen(f"{base}/index.html", timeout=30) as r:
            assert r.status == 200 and b'id="metrics"' in r.read()
        thumb = re.search(r'src="(images/[^"]+)"', scan_page["html"]).group(1)
        with urllib.request.urlopen(f"{base}/{thumb}", timeout=30) as r:
            assert r.read()[:2] == b"\xff\xd8"  # a JPEG
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("name", ["scan", "tgdt", "teran"])
def test_alignment_panels_are_the_models_own_word_region_weights(retrieval, name, request):  # noqa: F811
    """SCAN's attention (each word's softmax over the regions), TGDT's scaled region-word products and TERAN's
    region-word products, one panel per caption word in order, every region's box drawn, the strongest outlined."""
    import torch

    from itr.checkpoint import load_for_eval
    from itr.data.sources import load_split
    from itr.eval.embed import embed_split
    from itr.eval.scores import rows
    from itr.report import ReportInputs
    from itr.report.align import figure

    data, ckpt = retrieval
    split = load_split(data, "test")
    words = [w for w in re.findall(r"[\w]+|,", split.captions[15].lower())]
    text = [f"model.text.path={request.getfixturevalue('tiny_bert')}"] if name == "teran" else []
    model, tok, _, _ = load_for_eval(ckpt(name, *text))
    img, cap = embed_split(model, split, tok)
    w = model.alignment(rows(img, 3, 4), rows(cap, 15, 16))["weights"]
    if name == "scan":  # t2i: every word's attention over the 4 regions sums to 1
        assert w.shape[1] == 4 and torch.allclose(w.sum(1), torch.ones(w.shape[0]), atol=1e-5)
    else:
        regions = img["regions"][3, :int(img["lens"][3])] if name == "tgdt" else img[3]
        scale = model.cfg.local_scale if name == "tgdt" else 1.0
        want = scale * cap["words"][15, :int(cap["lens"][15])] @ regions.t()
        if name == "teran":  # every word of the caption, without [CLS] and [SEP] (TGDT's has <start>, <end>)
            assert want.shape == (len(words), 4)
        torch.testing.assert_close(w, want)
        # what is drawn is what is scored: the score sums each word's best region
        score = model.local_score if name == "tgdt" else model.score
        torch.testing.assert_close(w.max(1).values.sum(), score(rows(img, 3, 4), rows(cap, 15, 16))[0, 0],
                                   rtol=1e-5, atol=1e-5)
    fig = figure(ReportInputs(model, tok, split, img, cap, {}, [], "1k", {}), 3, 15, None, "with its ground truth")
    labels = re.findall(r"<figcaption>(.*?) <span", fig["html"])
    assert labels == words[:12], (name, labels, words)
    panels = fig["html"].split('<figure class="word">')[1:]
    assert all(p.count("<rect ") == 1 + 4 and p.count('stroke="#d00"') == 1 for p in panels)

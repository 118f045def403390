"""Retrieval you can use: ``itr index`` (embeddings + manifest, FAISS with its recall against exact search) and
``itr search`` (text -> image, image -> text; cross-attention models rerank a shortlist), and their errors."""
import json
import shutil
import sys

import numpy as np
import pytest
import torch

from itr.ann import FaissParams, build_faiss, exact_topk, faiss_topk, measure_recall, recall_at, scored_topk
from itr.errors import CheckpointError, ConfigError, DataError
from itr.index import Index, IndexRequest, build_index
from itr.search import SearchRequest, run_search

from conftest import run_itr
from helpers.retrieval import retrieval  # noqa: F401  (a fixture)

def _has_faiss():
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


needs_faiss = pytest.mark.skipif(not _has_faiss(), reason="faiss-cpu is not installed (pip install 'itr[faiss]'; "
                                                          "dev.py installs it)")


# ----------------------------------------------------------------------------- nearest neighbours


def test_exact_chunked_topk_equals_a_full_sort():
    g = torch.Generator().manual_seed(0)
    gallery, queries = torch.randn(1000, 16, generator=g), torch.randn(30, 16, generator=g)
    s, i = exact_topk(queries, gallery, 7, chunk=64)  # 16 chunks
    full = (queries @ gallery.t()).numpy()
    ref = np.argsort(-full, 1, kind="stable")[:, :7]
    assert np.array_equal(i, ref)
    np.testing.assert_allclose(s, np.take_along_axis(full, ref, 1), rtol=1e-6)
    s2, i2 = scored_topk(lambda lo, hi: full[:, lo:hi], 1000, 7, chunk=100)
    assert np.array_equal(i2, ref) and np.array_equal(s2, np.take_along_axis(full, ref, 1))


def test_recall_at_counts_the_exact_neighbours_found():
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert recall_at(exact, exact, 4) == 1.0
    assert recall_at(np.array([[1, 2, 9, 9], [8, 7, 6, 5]]), exact, 4) == pytest.approx((0.5 + 1.0) / 2)


@needs_faiss
def test_faiss_flat_is_exact_and_a_narrow_ivf_probe_loses_recall():
    rng = np.random.default_rng(0)
    gallery, queries = rng.standard_normal((4000, 24), np.float32), rng.standard_normal((200, 24), np.float32)
    flat, _ = build_faiss(gallery, FaissParams("flat"))
    assert measure_recall(flat, queries, gallery) == 1.0
    _, ids = faiss_topk(flat, queries, 10)
    assert np.array_equal(ids, exact_topk(queries, gallery, 10)[1])
    narrow, _ = build_faiss(gallery, FaissParams("ivf", nlist=64, nprobe=1))
    wide, _ = build_faiss(gallery, FaissParams("ivf", nlist=64, nprobe=64))
    # random vectors have no clusters: one cell of 64 holds few of a query's neighbours; all 64 cells hold all
    assert measure_recall(narrow, queries, gallery) < 0.8
    assert measure_recall(wide, queries, gallery) == 1.0
    hnsw, _ = build_faiss(gallery, FaissParams("hnsw", hnsw_m=16, ef_search=64))
    assert 0.5 < measure_recall(hnsw, queries, gallery) <= 1.0


# ----------------------------------------------------------------------------- the index


def test_index_round_trip(retrieval, tmp_path):
    from itr.checkpoint import load_for_eval
    from itr.data.sources import load_split
    from itr.eval.embed import embed_split

    data, ckpt = retrieval
    m = build_index(IndexRequest(ckpt("vsepp"), data, "test", tmp_path / "idx"))
    model, tok, recipe, meta = load_for_eval(ckpt("vsepp"))
    split = load_split(data, "test")
    img, cap = embed_split(model, split, tok)
    index = Index(tmp_path / "idx")
    got_img, glob = index.embeddings("images")
    assert torch.equal(got_img, img) and glob is got_img  # VSE++: its embedding is what is searched
    assert torch.equal(index.embeddings("captions")[0], cap)
    assert index.image_ids == split.ids and index.captions == split.captions
    assert m["checkpoint"]["path"] == str(ckpt("vsepp").resolve()) and m["recipe"]["model"]["name"] == "vsepp"
    assert m["checkpoint"]["global_step"] == meta["train_state"]["global_step"]
    assert m["shortlist"]["source"] == "self" and m["counts"] == {"images": 40, "captions": 200}


@pytest.mark.slow
def test_itr_search_finds_a_captions_own_image_first_for_most_queries(retrieval, tmp_path):
    """End to end through the command line; the results equal the evaluation job's top-5 lists."""
    from itr.eval.job import run_eval

    data, ckpt = retrieval
    run_itr("index", ckpt("vsepp"), "--data", data, "--split", "test", "--out", tmp_path / "idx")
    caps = (data / "test_caps.txt").read_text().splitlines()
    queries = caps[::5]  # each test image's first caption
    p = run_itr("search", tmp_path / "idx", *queries, "--k", 5, "--json")
    found = json.loads(p.stdout)
    assert [f["query"]["text"] for f in found] == queries
    firsts = np.array([f["results"][0]["image_row"] for f in found])
    n = len(queries)
    rate = float((firsts == np.arange(n)).mean())
    assert rate > 0.5 and rate > 10 / n, f"own image first for {rate:.0%} of {n} queries (chance {1 / n:.1%})"
    run_eval(ckpt("vsepp"), data, "test", save_topk=5, topk_path=tmp_path / "top.npz")
    z = np.load(tmp_path / "top.npz")
    for j, f in enumerate(found):
        rows = z["t2i_query"] == 5 * j
        np.testing.assert_allclose([r["score"] for r in f["results"]], z["t2i_score"][rows], rtol=1e-4, atol=1e-5)
        if z["t2i_score"][rows][0] - z["t2i_score"][rows][1] > 1e-4:
            assert f["results"][0]["image_row"] == z["t2i_candidate"][rows][0]
    table = run_itr("search", tmp_path / "idx", "--image", "synth-test-000003", "--k", 5).stdout
    assert "image->text" in table and "synth-test-000003" in table and "rank" in table


def test_image_to_text_marks_the_query_images_captions(retrieval, tmp_path):
    data, ckpt = retrieval
    build_index(IndexRequest(ckpt("vsepp"), data, "test", tmp_path / "idx"))
    (q,) = run_search(SearchRequest(tmp_path / "idx", image="synth-test-000007", k=10))
    assert q["direction"] == "image->text" and len(q["results"]) == 10
    scores = [r["score"] for r in q["results"]]
    assert scores == sorted(scores, reverse=True)
    assert all(r["ground_truth"] == (r["caption_row"] // 5 == 7) for r in q["results"])


@needs_faiss
def test_faiss_index_reports_its_recall_and_searches_like_exact(retrieval, tmp_path, capsys):
    data, ckpt = retrieval
    m = build_index(IndexRequest(ckpt("vsepp"), data, "test", tmp_path / "flat", faiss="flat"))
    assert m["faiss"]["images"]["recall_at_10"] == 1.0 and m["faiss"]["images"]["sample"] == 200
    assert "recall@10 1.000 against exact search on 200 caption queries" in capsys.readouterr().out
    texts = tuple((data / "test_caps.txt").read_text().splitlines()[:6])
    a = run_search(SearchRequest(tmp_path / "flat", texts, k=5))
    b = run_search(SearchRequest(tmp_path / "flat", texts, k=5, exact=True))
    assert "FAISS flat" in a[0]["how"] and "exact" in b[0]["how"]
    assert [[r["image_row"] for r in q["results"]] for q in a] == [[r["image_row"] for r in q["results"]] for q in b]
    for kind in ("ivf", "hnsw"):
        m = build_index(IndexRequest(ckpt("vsepp"), data, "test", tmp_path / kind, faiss=kind, sample=50))
        for side, sample in (("images", 50), ("captions", 40)):  # caption queries sampled; all 40 image queries
            assert 0.0 <= m["faiss"][side]["recall_at_10"] <= 1.0 and m["faiss"][side]["sample"] == sample
        saved = json.loads((tmp_path / kind / "index.json").read_text())
        assert saved["faiss"]["params"]["kind"] == kind and "recall_at_10" in saved["faiss"]["captions"]
        assert len(run_search(SearchRequest(tmp_path / kind, texts[:1], k=5))[0]["results"]) == 5


# ----------------------------------------------------------------------------- cross-attention: shortlist + rerank


def test_scan_reranks_a_vsepp_shortlist_and_with_every_candidate_equals_scoring_all(retrieval, tmp_path):
    data, ckpt = retrieval
    m = build_index(IndexRequest(ckpt("scan"), data, "test", tmp_path / "short", shortlist=ckpt("vsepp")))
    assert m["shortlist"]["source"] == "shortlist"
    assert build_index(IndexRequest(ckpt("scan"), data, "test", tmp_path / "all"))["shortlist"]["source"] is None
    texts = tuple((data / "test_caps.txt").read_text().splitlines()[1:30:7])
    every = run_search(SearchRequest(tmp_path / "all", texts, k=8))
    whole = run_search(SearchRequest(tmp_path / "short", texts, k=8, rerank=40))  # the whole gallery shortlisted
    for a, b in zip(every, whole):
        assert [r["image_row"] for r in a["results"]] == [r["image_row"] for r in b["results"]]
        np.testing.assert_allclose([r["score"] for r in a["results"]], [r["score"] for r in b["results"]], rtol=1e-5)
    short = run_search(SearchRequest(tmp_path / "short", texts, k=3, rerank=5))
    build_index(IndexRequest(ckpt("vsepp"), data, "test", tmp_path / "v"))
    vsepp = run_search(SearchRequest(tmp_path / "v", texts, k=5))
    ordered = run_search(SearchRequest(tmp_path / "all", texts, k=40))  # SCAN's order of the whole gallery
    for s, v, a in zip(short, vsepp, ordered):
        got = [r["image_row"] for r in s["results"]]
        assert set(got) <= {r["image_row"] for r in v["results"]}  # only the shortlist's five...
        scan_order = [r for r in [x["image_row"] for x in a["results"]] if r in {x["image_row"] for x in v["results"]}]
        assert got == scan_order[:3]  # ...in SCAN's order
    (img,) = run_search(SearchRequest(tmp_path / "short", image="synth-test-000002", k=4))
    assert len(img["results"]) == 4 and "reranked by scan" in img["how"]


def test_tgdt_shortlists_by_its_global_tokens(retrieval, tmp_path):
    data, ckpt = retrieval
    m = build_index(IndexRequest(ckpt("tgdt"), data, "test", tmp_path / "idx"))
    assert m["shortlist"]["source"] == "self:global"
    glob = Index(tmp_path / "idx").embeddings("images")[1]
    assert glob.shape == (40, 16)
    (q,) = run_search(SearchRequest(tmp_path / "idx", ("a photo of a dog",), k=5, rerank=40))
    (g,) = run_search(SearchRequest(tmp_path / "idx", ("a photo of a dog",), k=40, rerank=40))
    assert "global tokens" in q["how"] and [r["image_row"] for r in q["results"]] == \
        [r["image_row"] for r in g["results"]][:5]


# ----------------------------------------------------------------------------- errors


def test_clear_errors(retrieval, tmp_path, monkeypatch):
    data, ckpt = retrieval
    build_index(IndexRequest(ckpt("vsepp"), data, "test", tmp_path / "idx"))
    with pytest.raises(DataError, match="image id 'synth-test-999999' is not in .*40 images"):
        run_search(SearchRequest(tmp_path / "idx", image="synth-test-999999"))
    with pytest.raises(DataError, match="cannot read the query 'ein Hund läuft am Strand': every word of it is unknown"):
        run_search(SearchRequest(tmp_path / "idx", ("ein Hund läuft am Strand",)))
    with pytest.raises(DataError, match="--image-file needs an index of a raw-image model"):
        run_search(SearchRequest(tmp_path / "idx", image_file=tmp_path / "x.jpg"))
    with pytest.raises(DataError, match="is not an itr index"):
        run_search(SearchRequest(tmp_path / "nothing", ("a dog",)))
    with pytest.raises(ConfigError, match="one of them"):
        run_search(SearchRequest(tmp_path / "idx", ("a dog",), image="synth-test-000001"))
    # another model version: the checkpoint was trained further (its itr.json changed) after the index was built
    moved = tmp_path / "ckpt"
    shutil.copytree(ckpt("vsepp"), moved)
    build_index(IndexRequest(moved, data, "test", tmp_path / "idx2"))
    meta = json.loads((moved / "itr.json").read_text())
    meta["train_state"]["global_step"] += 1
    (moved / "itr.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="built by another model version"):
        run_search(SearchRequest(tmp_path / "idx2", ("a dog",)))
    with pytest.raises(CheckpointError, match="built by another model version"):
        run_search(SearchRequest(tmp_path / "idx", ("a dog",), checkpoint=ckpt("scan")))
    # FAISS asked for where the package is missing (import faiss raises ImportError), before any embedding
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ConfigError, match="needs the faiss-cpu package"):
        build_index(IndexRequest(ckpt("vsepp"), data, "test", tmp_path / "f", faiss="hnsw"))


@needs_faiss
def test_faiss_for_a_model_without_global_vectors_asks_for_a_shortlist(retrieval, tmp_path):
    data, ckpt = retrieval
    with pytest.raises(ConfigError, match="SCAN has none: give --shortlist CKPT"):
        build_index(IndexRequest(ckpt("scan"), data, "test", tmp_path / "g", faiss="flat"))


def test_the_command_line_prints_an_error_in_one_line(retrieval, tmp_path):
    data, ckpt = retrieval
    run_itr("index", ckpt("vsepp"), "--data", data, "--split", "test", "--out", tmp_path / "idx")
    p = run_itr("search", tmp_path / "idx", "--image", "nope", check=False)
    assert p.returncode == 2 and p.stderr.strip().startswith("itr search: error: image id 'nope' is not in")
    assert len(p.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- raw images


@pytest.fixture(scope="module")
def raw_image_index(tiny_bert, tmp_path_factory):
    """A tiny sentence_matcher (raw pixels, a BERT text encoder) trained 1 epoch on 80 of the real Flickr8k JPEGs,
    and its index of the other 20."""
    from conftest import F8K, F8K_IMAGES
    from itr.config import load_recipe
    from itr.shards.images import shard_images
    from itr.train import train

    if not (F8K_IMAGES / "ids.txt").is_file():
        pytest.skip(f"real Flickr8k images not found at {F8K_IMAGES} (../shared/data beside the checkout; CI has it)")
    base = tmp_path_factory.mktemp("raw_index")
    ids = (F8K_IMAGES / "ids.txt").read_text().split()
    caps = (F8K / "dev_caps.txt").read_text().splitlines()
    images = [{"filename": f, "imgid": i, "split": "test" if i < 20 else "train",
               "sentences": [{"raw": c} for c in caps[5 * i:5 * i + 5]]} for i, f in enumerate(ids)]
    (base / "f8k.json").write_text(json.dumps({"images": images}))
    for split in ("train", "test"):
        shard_images(base / "f8k.json", F8K_IMAGES, split, base / "shards", images_per_shard=40, progress=False)
    from transformers import BertTokenizerFast

    from helpers.retrieval import ROOT

    # conftest's tiny_bert passes vocab_file=, which transformers 5 ignores (a 5-token vocabulary: every word
    # [UNK]); the positional argument is the vocabulary in transformers 4 and 5
    bert = base / "bert"
    shutil.copytree(tiny_bert, bert)
    BertTokenizerFast(str(bert / "vocab.txt"), do_lower_case=True).save_pretrained(bert)
    recipe = load_recipe(ROOT / "recipes" / "f8k" / "sentence_matcher_images.yaml", [
        f"data.root={base / 'shards'}", f"model.text.path={bert}", "model.embed_dim=32", "model.mlp_dim=64",
        "model.image.hidden_sizes=[8, 16]", "model.image.embedding_size=8", "data.image_size=32",
        "data.num_workers=0", "data.shuffle_buffer=100", "train.epochs=1", "train.batch_size=40",
        "train.log_every=5", "tracking.enabled=false"])
    train(recipe, base / "run")
    build_index(IndexRequest(base / "run" / "best", base / "shards", "test", base / "idx"))
    return base / "idx", ids[:20]


@pytest.mark.slow
def test_image_file_of_a_raw_image_model_searches_like_its_indexed_image(raw_image_index):
    """``--image-file`` embeds a picture through the evaluation's transform: the JPEG of an indexed image finds
    the captions its indexed copy finds, with the same scores."""
    from conftest import F8K_IMAGES

    idx, ids = raw_image_index
    assert Index(idx).image_ids == ids  # the images' ids as the dataset names them: their file names
    (by_id,) = run_search(SearchRequest(idx, image=ids[3], k=10))
    (by_file,) = run_search(SearchRequest(idx, image_file=F8K_IMAGES / ids[3], k=10))
    assert [r["caption_row"] for r in by_file["results"]] == [r["caption_row"] for r in by_id["results"]]
    np.testing.assert_allclose([r["score"] for r in by_file["results"]], [r["score"] for r in by_id["results"]],
                               rtol=1e-4, atol=1e-5)
    (text,) = run_search(SearchRequest(idx, ("a dog runs on the beach",), k=3))
    assert text["direction"] == "text->image" and len(text["results"]) == 3
    bad = idx.parent / "not_a_picture.jpg"
    bad.write_bytes(b"GIF89a, not a JPEG at all")
    with pytest.raises(DataError, match="not_a_picture.jpg is not a readable image"):
        run_search(SearchRequest(idx, image_file=bad))
    # the tiny BERT's whole-word vocabulary (the synthetic captions' English words) reads none of these: [UNK]
    with pytest.raises(DataError, match="tokenizer cannot read the query 'ein Hund läuft am Strand'"):
        run_search(SearchRequest(idx, ("ein Hund läuft am Strand",)))


@pytest.mark.slow
def test_a_report_on_raw_image_shards_shows_thumbnails_of_the_split_own_pixels(raw_image_index, tmp_path):
    """Without ``--images``, a raw-image split's report draws its thumbnails from the shards' pixels (the
    evaluation's center crop, 32 x 32 here: a thumbnail is never enlarged): every <img> is a file that decodes to
    that size, and it is the picture of the image it names."""
    from html.parser import HTMLParser

    from PIL import Image

    from conftest import F8K_IMAGES
    from itr.cli import main
    from itr.data.images import eval_transform

    class Imgs(HTMLParser):
        def __init__(self):
            super().__init__()
            self.found = []

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                self.found.append(dict(attrs))

    idx, ids = raw_image_index
    base = idx.parent
    crops = {}
    for i in ids:  # the evaluation's center crop of each test JPEG
        with Image.open(F8K_IMAGES / i) as src:
            crops[i] = eval_transform(src.convert("RGB"), 32).transpose(1, 2, 0).astype(np.float32)
    assert main(["report", str(base / "run" / "best"), "--data", str(base / "shards"), "--split", "test",
                 "--out", str(tmp_path / "page"), "--queries", "4"]) == 0
    page = Imgs()
    page.feed((tmp_path / "page" / "index.html").read_text())
    assert len({a["src"] for a in page.found}) >= 4, page.found
    for a in page.found:
        path = tmp_path / "page" / a["src"]
        assert path.is_file(), a
        with Image.open(path) as im:
            im.load()
            assert im.format == "JPEG" and im.size == (32, 32) == (int(a["width"]), int(a["height"]))
            got = np.asarray(im.convert("RGB"), np.float32)
        # it is the picture of the image it names: of the split's 20 crops, that image's is the nearest
        err = {i: np.abs(got - crops[i]).mean() for i in ids}
        image_id = a["alt"].removeprefix("image ")
        assert min(err, key=err.get) == image_id and err[image_id] < 16, (image_id, sorted(err.values())[:3])

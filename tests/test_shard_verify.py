"""`itr shard verify` (every problem, named; exit code) and `itr shard stats`."""
import io
import json
import tarfile

import numpy as np
from convert_inputs import karpathy_json, precomp_dir, tsv_rows

from itr.cli import main
from itr.data.manifest import sha256_file
from itr.shards.precomp import shard_precomp
from itr.shards.tsv import shard_tsv


def _shards(tmp_path):
    precomp_dir(tmp_path / "src", {"train": 9, "test": 3})
    for split in ("train", "test"):
        shard_precomp(tmp_path / "src", split, tmp_path / "out", images_per_shard=4, shuffle=False, progress=False)
    return tmp_path / "out"


def _rewrite(shard, change):
    """Rewrite a shard's samples through ``change(name, bytes) -> bytes or None (dropped)``."""
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            data = change(name, data)
            if data is not None:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _accept(out, split):
    """Make the manifest agree with the shards' bytes again (so only the sample checks can find the problem)."""
    p = out / f"{split}.manifest.json"
    m = json.loads(p.read_text())
    for s in m["shards"]:
        s["bytes"], s["sha256"] = (out / s["name"]).stat().st_size, sha256_file(out / s["name"])
    p.write_text(json.dumps(m))


def test_verify_passes_sound_shards_and_names_a_corrupt_one(tmp_path, capsys):
    out = _shards(tmp_path)
    assert main(["shard", "verify", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out.split() == ["test:", "ok", "train:", "ok"]
    bad = out / "train-000001.tar"
    data = bytearray(bad.read_bytes())
    data[600] ^= 0xFF
    bad.write_bytes(bytes(data))
    assert main(["shard", "verify", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "train: " in err and "train-000001.tar is corrupt: sha256" in err and "test: " not in err


def test_verify_decodes_every_sample_and_lists_every_problem(tmp_path, capsys):
    out = _shards(tmp_path)

    def change(name, data):
        if name == "000000001.feat.npy":  # wrong shape
            buf = io.BytesIO()
            np.save(buf, np.zeros((2, 4), np.float16))
            return buf.getvalue()
        if name.startswith("000000002."):  # image 2 dropped
            return None
        if name == "000000003.json":  # another caption text
            meta = json.loads(data)
            meta["captions"][0] = "edited"
            return json.dumps(meta).encode()
        return data

    _rewrite(out / "train-000000.tar", change)
    _accept(out, "train")
    assert main(["shard", "verify", str(out), "--split", "train", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "train: 4 problem(s)" in err, err
    assert "holds 3 images but" in err  # the count check of verify_shards
    assert "sample 000000001: features (2, 4), manifest says (3, 4)" in err
    assert "sample 000000003: its captions differ from train.captions.txt lines 16-20" in err
    assert "1 of 9 images are in no shard (first: image 2)" in err


def test_stats_reports_counts_caption_lengths_norms_and_region_counts(tmp_path, capsys):
    karpathy_json(tmp_path / "k.json", 6)
    tsv_rows(tmp_path / "a.tsv", range(1000, 1006), [1, 2, 3, 4, 5, 9])
    shard_tsv([tmp_path / "a.tsv"], tmp_path / "k.json", "test", tmp_path / "out", dtype="float32", progress=False)
    assert main(["shard", "stats", str(tmp_path / "out"), "--quiet", "--json", str(tmp_path / "s.json")]) == 0
    text = capsys.readouterr().out
    assert "test: 6 images, 30 captions, 1 shard(s)" in text and "variable regions" in text
    s = json.loads((tmp_path / "s.json").read_text())[0]
    assert s["regions"]["min"] == 1 and s["regions"]["max"] == 9 and s["regions"]["mean"] == 4
    words = [len(c.split()) for c in (tmp_path / "out" / "test.captions.txt").read_text().splitlines()]
    assert s["caption_words"]["max"] == max(words) and s["caption_words"]["mean"] == np.mean(words)
    assert 0 < s["region_norm"]["min"] <= s["region_norm"]["max"] and s["zero_regions"] == 0

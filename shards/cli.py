"""The ``itr shard`` subcommands added with the converters: teran, tsv, verify, stats (``itr.cli`` adds them)."""
import sys


def common_args(sp, order="source"):
    """Options every converter shares (precomp and images have theirs in ``itr.cli``)."""
    sp.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="stored feature dtype")
    sp.add_argument("--images-per-shard", type=int, default=1000)
    sp.add_argument("--seed", type=int, default=0, help="seed of the image order across shards")
    sp.add_argument("--no-shuffle", action="store_true", help=f"keep the {order} image order")
    sp.add_argument("--force", action="store_true", help="rebuild a split made from other input or options (a rerun "
                                                         "of the same keeps its verified shards)")
    sp.add_argument("--workers", type=int, default=1, help="processes writing shards in parallel")


def _ids_args(sp):
    sp.add_argument("--id-key", default="auto", choices=["auto", "cocoid", "imgid", "index", "stem", "id"],
                    help="the id that names an image's features in a Karpathy file (auto: cocoid, else "
                         "TERAN: index, TSV: stem)")
    sp.add_argument("--ann-ids", help="COCO captions file: VSE++/TERAN's coco_{split}_ids.npy (caption ids, 5 per "
                                      "image) selects and orders the split")


def _opts(a):
    return dict(dtype=a.dtype, images_per_shard=a.images_per_shard, seed=a.seed, shuffle=not a.no_shuffle,
                force=a.force, workers=a.workers, id_key=a.id_key, ann_ids=a.ann_ids)


def said(m, out_dir):
    kept = f", {m['resumed']} kept from an earlier run" if m.get("resumed") else ""
    regions = f" (regions {m['regions']['min']}..{m['regions']['max']})" if m.get("variable_regions") else ""
    print(f"wrote {len(m['shards'])} shard(s){kept}: {m['num_images']} images, {m['num_captions']} captions, "
          f"features {m['feature_shape']}{regions} {m['dtype']} -> {out_dir}/{m['split']}.manifest.json")


def _teran(a):
    from itr.shards.teran import shard_teran

    said(shard_teran(a.features_dir, a.captions_json, a.split, a.out_dir, sizes=a.sizes, image_dir=a.image_dir,
                      **_opts(a)), a.out_dir)


def _tsv(a):
    from itr.shards.tsv import shard_tsv

    *files, captions, split, out = a.paths
    if not files:
        from itr.errors import ConfigError

        raise ConfigError("usage: itr shard tsv TSV_FILE [TSV_FILE ...] CAPTIONS_JSON SPLIT OUT_DIR")
    said(shard_tsv(files, captions, split, out, **_opts(a)), out)


def _verify(a):
    from itr.shards.verify import splits_of, verify_split

    failed = 0
    for split in splits_of(a.shard_dir, a.split):
        problems = verify_split(a.shard_dir, split, progress=not a.quiet)
        if problems:
            failed += 1
            print(f"{split}: {len(problems)} problem(s)", file=sys.stderr)
            for p in problems:
                print(f"  {p}", file=sys.stderr)
        else:
            print(f"{split}: ok")
    return 1 if failed else 0


def _stats(a):
    from itr.shards.stats import report, shard_stats

    stats = shard_stats(a.shard_dir, a.split, a.max_images, progress=not a.quiet, json_out=a.json)
    print("\n".join(report(stats)))


def add_parsers(ssub):
    t = ssub.add_parser("teran", help="TERAN/TGDT features (bu_att/ID.npz + bu_box/ID.npy) + captions JSON -> shards")
    t.add_argument("features_dir", help="features_36/ (or its parent): bu_att/ and bu_box/")
    t.add_argument("captions_json", help="Karpathy's dataset_{f30k,coco}.json or a COCO captions file")
    t.add_argument("split", help="Karpathy split field (train, val, test, restval; join with +)")
    t.add_argument("out_dir")
    t.add_argument("--sizes", help="JSON {image id: [width, height]} (Karpathy files have no sizes)")
    t.add_argument("--image-dir", help="read the sizes from the images' headers here (Karpathy filepath/filename)")
    common_args(t)
    _ids_args(t)
    t.set_defaults(fn=_teran)
    v = ssub.add_parser("tsv", help="bottom-up-attention TSV file(s) + captions JSON -> shards (variable region "
                                    "counts kept)")
    v.add_argument("paths", nargs="+", metavar="TSV_FILE ... CAPTIONS_JSON SPLIT OUT_DIR")
    common_args(v)
    _ids_args(v)
    v.set_defaults(fn=_tsv)
    c = ssub.add_parser("verify", help="check every shard and sample against its manifest; exit 1 on a problem")
    c.add_argument("shard_dir")
    c.add_argument("--split", help="only this split (default: every *.manifest.json)")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.set_defaults(fn=_verify)
    s = ssub.add_parser("stats", help="counts, caption lengths, feature norms and region counts of a shard dir")
    s.add_argument("shard_dir")
    s.add_argument("--split", help="only this split (default: every *.manifest.json)")
    s.add_argument("--max-images", type=int, help="read at most this many images per split")
    s.add_argument("--json", help="also write the figures here")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(fn=_stats)

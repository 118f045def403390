"""``itr`` command line. Each subcommand is a thin wrapper over one module."""
import argparse
import sys


def _train(a):
    from itr.config import load_recipe
    from itr.distributed import finish_job
    from itr.train import train

    recipe = load_recipe(a.recipe, a.overrides)
    train(recipe, a.out)
    finish_job()  # as `itr eval`: a rank that exits with gloo's threads still up can abort at teardown


def _shard(a):
    from itr.shards.cli import said
    from itr.shards.precomp import shard_precomp_splits

    for m in shard_precomp_splits(a.data_dir, a.split, a.out_dir, dtype=a.dtype, images_per_shard=a.images_per_shard,
                                  seed=a.seed, shuffle=not a.no_shuffle, force=a.force, workers=a.workers):
        said(m, a.out_dir)


def _shard_images(a):
    from itr.shards.images import shard_images

    m = shard_images(a.captions_json, a.image_dir, a.split, a.out_dir, images_per_shard=a.images_per_shard,
                     seed=a.seed, shuffle=not a.no_shuffle, force=a.force)
    print(f"wrote {len(m['shards'])} shard(s): {m['num_images']} images, {m['num_captions']} captions "
          f"-> {a.out_dir}/{a.split}.manifest.json")


def _eval(a):
    """Exit code 75 (EX_TEMPFAIL) when a signal stopped a resumable evaluation: slurm/eval.sbatch requeues it."""
    from itr.eval.ensemble import run_ensemble
    from itr.eval.job import run_eval
    from itr.eval.stream import EvalStopped

    try:
        req = _eval_request(a)
        (run_ensemble if req.ensemble else run_eval)(req)
    except EvalStopped as e:
        print(f"[itr] evaluation {e}", flush=True)
        return 75
    return 0


def _eval_request(a):
    from itr.errors import ConfigError
    from itr.eval.job import EvalRequest

    if len(a.checkpoint) > 1 and not a.ensemble:
        raise ConfigError(f"itr eval got {len(a.checkpoint)} checkpoints: pass --ensemble to average them")
    if a.weights and not a.ensemble:
        raise ConfigError("--weights needs --ensemble")
    return (EvalRequest(a.checkpoint[0], a.data, a.split, protocol=a.protocol, json_out=a.json, save_sims=a.save_sims,
                         chunk_size=a.chunk_size, batch_size=a.batch_size, spill_gib=a.spill_gib, device=a.device,
                         two_stage=a.two_stage, shortlist=a.shortlist, k=a.k, compare_full=a.compare_full, save_topk=a.save_topk,
                         topk_path=a.topk_path, state=a.state, state_every=a.state_every, log_to_run=a.log_to_run,
                         log_run=a.log_run, experiment=a.experiment, tracking_uri=a.tracking_uri, run_name=a.run_name,
                         report=a.report, report_queries=a.report_queries, report_images=a.report_images,
                         ensemble=a.checkpoint if a.ensemble else None, weights=a.weights))


def _import(a):
    from itr.imports import ImportRequest, import_checkpoint

    best = import_checkpoint(ImportRequest(a.checkpoint, a.family, a.out, vocab=a.vocab, bert=a.bert,
                                           data_name=a.data_name, overrides=tuple(a.overrides)))
    print(f"imported {a.checkpoint} ({a.family}) -> {best}\n"
          f"  evaluate:  itr eval {best} --data DATA --split test\n"
          f"  fine-tune: itr train {best / 'recipe.yaml'} --out RUN train.init_from={best}")


def _compare(a):
    from itr.compare import compare

    compare(experiment=a.experiment, filter_string=a.filter, run_ids=a.runs, tracking_uri=a.tracking_uri, csv=a.csv,
            markdown=a.markdown, plot=a.plot, metric=a.metric, max_runs=a.max_runs)


def _sync(a):
    from itr.tracking import sync

    sync(a.run_dir, uri=a.tracking_uri)


def _score(a):
    from itr.eval.job import run_score

    run_score(a.sims, protocol=a.protocol, json_out=a.json, chunk_size=a.chunk_size)


def _synth(a):
    from itr.data.synthetic import generate

    out = generate(a.out_dir, splits=(("train", a.train), ("dev", a.dev), ("test", a.test)), dim=a.dim,
                   regions=a.regions, noise=a.noise, seed=a.seed)
    print(f"wrote synthetic precomp data to {out}")


def _demo(a):
    from itr.demo import demo

    demo(a.out, a.recipe, a.overrides)


def _submit(a):
    from itr.submit import main as submit

    submit(a)


def _recipes(a):
    from itr import resources

    if a.action == "ls":
        print(resources.listing())
    else:
        print(f"copied {resources.find(a.name)} -> {resources.copy(a.name, a.dest, force=a.force)}")


def _config(a):
    from itr.config import describe, load_recipe

    recipe = load_recipe(a.recipe, a.overrides)
    if a.yaml:
        from itr.recipe_yaml import dump_recipe

        print(dump_recipe(recipe, a.recipe), end="")
        return
    print("\n".join(describe(values=recipe)))


class _Version(argparse.Action):
    """``--version`` printed as it is: argparse's own action wraps a long install path at the terminal width."""

    def __init__(self, option_strings, version, dest=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, help=help)
        self.version = version

    def __call__(self, parser, namespace, values, option_string=None):
        print(self.version)
        parser.exit()


def parser():
    from pathlib import Path

    from itr import __version__

    p = argparse.ArgumentParser(prog="itr", description="Image-text retrieval training toolkit")
    p.add_argument("--version", action=_Version, version=f"itr {__version__} ({Path(__file__).resolve().parent})",
                   help="print the version and where itr is installed, then exit")
    sub = p.add_subparsers(dest="cmd", required=True)
    for add in (_add_train, _add_shard, _add_eval, _add_import, _add_compare, _add_tools):
        add(sub)
    from itr.retrieval import add_parsers as add_retrieval_parsers
    from itr.submit import add_parser as add_submit_parser

    add_retrieval_parsers(sub)

    add_submit_parser(sub).set_defaults(fn=_submit)
    from itr.shards.extract import add_parser as add_extract_parser, run_cli as extract_cli

    add_extract_parser(sub).set_defaults(fn=extract_cli)
    c = sub.add_parser("config", help="print every recipe key with its value and meaning")
    c.add_argument("recipe", nargs="?")
    c.add_argument("overrides", nargs="*")
    c.add_argument("--yaml", action="store_true", help="print a complete recipe (every default filled in, the values "
                                                       "that differ from the defaults marked) to save and edit")
    c.set_defaults(fn=_config)
    r = sub.add_parser("recipes", help="list (ls) or copy (cp NAME DEST) the bundled recipes, launch configs and "
                                       "sbatch files")
    r.add_argument("action", choices=["ls", "cp"])
    r.add_argument("name", nargs="?", help="cp: f30k/vse_infty, launch/multi_gpu.yaml, slurm/train.sbatch, or a "
                                           "whole folder: launch, slurm")
    r.add_argument("dest", nargs="?", help="cp: a file name, or a folder to copy into")
    r.add_argument("--force", action="store_true", help="cp: overwrite what is there")
    r.set_defaults(fn=_recipes)
    return p


def _add_train(sub):
    t = sub.add_parser("train", help="train from a YAML recipe (also under `accelerate launch -m itr train`)")
    t.add_argument("recipe", help="recipe YAML (see recipes/)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=5 optim.lr=1e-4")
    t.add_argument("--out", required=True, help="run directory: checkpoints DIR/last and DIR/best, results.json")
    t.set_defaults(fn=_train)


def _shard_order_args(sp, order):
    sp.add_argument("--images-per-shard", type=int, default=1000)
    sp.add_argument("--seed", type=int, default=0, help="seed of the image order across shards")
    sp.add_argument("--no-shuffle", action="store_true", help=f"keep the {order} image order")
    sp.add_argument("--force", action="store_true", help="rebuild a split made from other input or options (a rerun "
                                                         "of the same keeps its verified shards)")


def _add_shard(sub):
    from itr.shards.cli import add_parsers, common_args

    s = sub.add_parser("shard", help="build WebDataset shards from a research data format")
    ssub = s.add_subparsers(dest="format", required=True)
    sp = ssub.add_parser("precomp", help="SCAN precomp split ({split}_ims.npy + {split}_caps.txt) -> shards")
    sp.add_argument("data_dir")
    sp.add_argument("split", help="a split, several (train,dev,test,testall) or all (every {split}_caps.txt)")
    sp.add_argument("out_dir")
    common_args(sp)
    sp.set_defaults(fn=_shard)
    si = ssub.add_parser("images", help="captions JSON (Karpathy or COCO) + image folder -> shards of JPEG bytes")
    si.add_argument("captions_json")
    si.add_argument("image_dir")
    si.add_argument("split", help="Karpathy split field (train, val, test, restval; join with +)")
    si.add_argument("out_dir")
    _shard_order_args(si, "file's")
    si.set_defaults(fn=_shard_images)
    add_parsers(ssub)


def _add_eval(sub):
    e = sub.add_parser("eval", help="evaluate a checkpoint (R@1/5/10, medr, meanr, rsum)")
    e.add_argument("checkpoint", nargs="+", help="DIR/best, DIR/last or a run directory (several with --ensemble)")
    e.add_argument("--ensemble", action="store_true", help="average the checkpoints' similarity matrices and report "
                                                           "each checkpoint and the ensemble side by side")
    e.add_argument("--weights", metavar="W1,W2,...", help="with --ensemble: one weight per checkpoint (normalised to "
                                                          "sum to 1; default: equal)")
    e.add_argument("--data", required=True, help="precomp directory or shard directory")
    e.add_argument("--split", required=True)
    e.add_argument("--protocol", choices=["1k", "coco-5fold", "5k"], default=None,
                   help="1k/5k: the whole split; coco-5fold: mean over 5 folds (default: the recipe's eval.protocol)")
    e.add_argument("--json", help="write the metrics here")
    e.add_argument("--save-sims", help="save the (n_images, 5 n_images) similarity matrix as .npy")
    e.add_argument("--chunk-size", type=int, help="tile size of the similarity / rank computation")
    e.add_argument("--batch-size", type=int, help="embedding batch size")
    e.add_argument("--spill-gib", type=float, metavar="GIB",
                   help="embeddings of a side over GIB go to a node-local file read tile by tile (0: always; "
                        "default: the recipe's eval.spill_gib)")
    e.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    e.add_argument("--two-stage", type=int, metavar="K",
                   help="models with a global score: shortlist the K best candidates per query by it, then apply "
                        "the model's full score to the shortlist only (a ground truth outside it is a miss)")
    e.add_argument("--shortlist", metavar="CKPT_OR_TOPK",
                   help="a cascade: K candidates per query from this checkpoint's global score (or a --save-topk "
                        "file), reranked by CHECKPOINT's score; a ground truth outside the shortlist is a miss")
    e.add_argument("--k", type=int, help="with --shortlist: the shortlist length")
    e.add_argument("--compare-full", action="store_true",
                   help="with a cascade: also score every pair and report the recall lost and the speedup")
    e.add_argument("--save-topk", type=int, metavar="K", help="save every query's K best candidates (both directions)")
    e.add_argument("--topk-path", help="where --save-topk writes (.npz; default topk-SPLIT.npz)")
    e.add_argument("--state", metavar="DIR", help="resumable: finished tiles and counters are kept here, and a "
                                                  "restarted evaluation skips them (slurm/eval.sbatch uses it)")
    e.add_argument("--state-every", type=float, default=300.0, help="seconds between state writes")
    e.add_argument("--log-to-run", metavar="RUN_ID",
                   help="MLflow: add the metrics (as SPLIT_PROTOCOL_METRIC, e.g. test_1k_rsum) to this existing run")
    e.add_argument("--log-run", action="store_true", help="MLflow: log the metrics into a new evaluation run")
    e.add_argument("--experiment", help="MLflow experiment of the new evaluation run (implies --log-run; "
                                        "default: the checkpoint recipe's tracking.experiment)")
    e.add_argument("--tracking-uri", help="MLflow tracking URI (default: the checkpoint recipe's tracking.uri, "
                                          "$MLFLOW_TRACKING_URI, sqlite:///<cwd>/mlflow.db)")
    e.add_argument("--run-name", help="name of the new evaluation run")
    e.add_argument("--report", metavar="DIR", help="also write the report page (what the model retrieves) into DIR; "
                                                   "with MLflow logging it is an artifact of the run")
    e.add_argument("--report-queries", type=int, default=10, help="queries the report shows each way")
    e.add_argument("--report-images", metavar="DIR", help="the split's image files by id, for the report's thumbnails")
    e.set_defaults(fn=_eval)


def _add_import(sub):
    from itr.imports import FAMILIES

    i = sub.add_parser("import", help="a reference repository's released checkpoint -> an itr run directory")
    i.add_argument("checkpoint", help="the released file, e.g. model_best.pth.tar (read weights-only)")
    i.add_argument("--from", dest="family", required=True, choices=sorted(FAMILIES), help="the repository it comes from")
    i.add_argument("--out", required=True, help="run directory; the checkpoint lands in DIR/best")
    i.add_argument("--vocab", help="GRU families: the repository's word vocabulary (vocab/DATA_vocab.json or .pkl)")
    i.add_argument("--bert", help="BERT families: a local BERT directory (config + tokenizer; weights come from CKPT)")
    i.add_argument("--data-name", help="override the data_name stored in the checkpoint (f30k_precomp, coco_precomp)")
    i.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a recipe override of the imported run (repeatable), e.g. --set model.test_mode=global")
    i.set_defaults(fn=_import)


def _add_compare(sub):
    cm = sub.add_parser("compare", help="MLflow runs side by side, sorted by rsum (table, CSV, Markdown, plot)")
    cm.add_argument("--experiment", help="experiment name (default: itr; ignored with --runs)")
    cm.add_argument("--filter", help="MLflow search filter, e.g. \"tags.sweep = 'lr'\" or \"params.optim.lr = '0.0002'\"")
    cm.add_argument("--runs", nargs="+", metavar="RUN_ID", help="these runs (any experiment)")
    cm.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, sqlite:///<cwd>/mlflow.db)")
    cm.add_argument("--metric", help="metric prefix to compare: test (training's test split), dev / dev_ema (the best "
                                     "dev epoch, what chose DIR/best / DIR/best_ema), or an `itr eval` prefix such as "
                                     "test_1k (default: dev if a run has train.score_test=false, else test, else the "
                                     "run's one other family, else dev)")
    cm.add_argument("--csv", metavar="OUT", help="write the table as CSV")
    cm.add_argument("--markdown", metavar="OUT", help="write the table as Markdown")
    cm.add_argument("--plot", metavar="OUT.png", help="rsum per run (bars) and dev rsum over epochs (lines)")
    cm.add_argument("--max-runs", type=int, default=200, help="at most this many runs from a search")
    cm.set_defaults(fn=_compare)


def _add_tools(sub):
    sy = sub.add_parser("sync", help="upload a run directory's MLflow journal (after the server was unreachable)")
    sy.add_argument("run_dir", help="the --out directory of `itr train` (holds mlflow_journal.jsonl)")
    sy.add_argument("--tracking-uri", help="MLflow tracking URI (default: the one the run was started with)")
    sy.set_defaults(fn=_sync)

    sc = sub.add_parser("score", help="metrics from a saved (n_images, 5 n_images) similarity matrix")
    sc.add_argument("sims", help="SIMS.npy; caption j belongs to image j // 5")
    sc.add_argument("--protocol", choices=["1k", "coco-5fold", "5k"], default="1k")
    sc.add_argument("--json", help="write the metrics here")
    sc.add_argument("--chunk-size", type=int, default=1024)
    sc.set_defaults(fn=_score)

    g = sub.add_parser("synth", help="generate the synthetic precomp dataset")
    g.add_argument("out_dir")
    g.add_argument("--train", type=int, default=3000)
    g.add_argument("--dev", type=int, default=500)
    g.add_argument("--test", type=int, default=1000)
    g.add_argument("--dim", type=int, default=256)
    g.add_argument("--regions", type=int, default=36)
    g.add_argument("--noise", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(fn=_synth)

    d = sub.add_parser("demo", help="generate -> shard -> train -> eval -> MLflow, on synthetic data")
    d.add_argument("overrides", nargs="*", help="recipe overrides, e.g. train.epochs=2")
    d.add_argument("--out", default="itr-demo", help="demo directory (data, shards, run)")
    d.add_argument("--recipe", default=None, help="default: recipes/synthetic/vsepp_gru.yaml")
    d.set_defaults(fn=_demo)


def _drop_local_rank(argv):
    """The `deepspeed` launcher passes --local_rank=N (also exported as LOCAL_RANK): ignore it."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            continue
        elif arg in ("--local_rank", "--local-rank"):
            skip = True
        else:
            out.append(arg)
    return out


def main(argv=None):
    import os

    from itr.errors import ItrError

    argv = _drop_local_rank(sys.argv[1:] if argv is None else list(argv))
    p = parser()
    a, extra = p.parse_known_args(argv)
    if "DS_ACCELERATOR" not in os.environ and a.cmd != "recipes":
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"  # else DeepSpeed (imported by accelerate) warns on every start
    if a.cmd == "recipes" and ((a.name, a.dest) != (None, None) if a.action == "ls" else not (a.name and a.dest)):
        p.error("usage: itr recipes ls, or itr recipes cp NAME DEST (e.g. itr recipes cp f30k/vse_infty my.yaml)")
    if extra:  # overrides after --out DIR
        if hasattr(a, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            a.overrides += extra
        else:
            p.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return a.fn(a) or 0
    except ItrError as e:
        print(f"itr {a.cmd}: error: {e}", file=sys.stderr)
        return 2

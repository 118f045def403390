"""The command lines of retrieval you can use and look at: ``itr index``, ``itr search``, ``itr report``
(thin wrappers over ``itr.index``, ``itr.search`` and the evaluation job with ``itr.report``)."""


def _index(a):
    from itr.index import IndexRequest, build_index

    m = build_index(IndexRequest(a.checkpoint, a.data, a.split, a.out, shortlist=a.shortlist, faiss=a.faiss,
                                 nlist=a.nlist, nprobe=a.nprobe, hnsw_m=a.hnsw_m, ef_search=a.ef_search,
                                 sample=a.sample, batch_size=a.batch_size, device=a.device or "cpu"))
    short = m["shortlist"]["source"]
    how = {"self": "searched by its embeddings", "self:global": "shortlisted by its global tokens, reranked",
           "shortlist": "shortlisted by the --shortlist checkpoint, reranked",
           None: "every gallery item scored by the model"}[short]
    print(f"wrote the index of {m['counts']['images']} images and {m['counts']['captions']} captions to {a.out} "
          f"({m['model']}: {how})")


def _search(a):
    from itr.search import SearchRequest, print_results, run_search

    found = run_search(SearchRequest(a.index, tuple(a.text), image=a.image, image_file=a.image_file, k=a.k,
                                     rerank=a.rerank, checkpoint=a.checkpoint, exact=a.exact, device=a.device or "cpu"))
    print_results(found, a.json)


def _report(a):
    from itr.eval.job import EvalRequest, run_eval

    run_eval(EvalRequest(a.checkpoint, a.data, a.split, protocol=a.protocol, device=a.device, report=a.out,
                         report_queries=a.queries, report_images=a.images, log_to_run=a.log_to_run,
                         tracking_uri=a.tracking_uri, json_out=a.json))
    if a.serve is not None:
        from itr.report import serve

        server = serve(a.out, a.serve)
        print(f"serving {a.out} at http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C stops)", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()


def add_parsers(sub):
    i = sub.add_parser("index", help="embed a split with a checkpoint and save it to search (exact or FAISS)")
    i.add_argument("checkpoint", help="DIR/best, DIR/last or a run directory")
    i.add_argument("--data", required=True, help="precomp directory or shard directory")
    i.add_argument("--split", required=True)
    i.add_argument("--out", required=True, help="the index directory")
    i.add_argument("--shortlist", metavar="CKPT", help="models without global vectors (SCAN, TERAN, DIME): this "
                                                       "checkpoint's global vectors shortlist, the model reranks")
    i.add_argument("--faiss", choices=["flat", "ivf", "hnsw"], help="also build a FAISS index (needs faiss-cpu: "
                                                                   "pip install 'itr[faiss]'); its recall@10 against "
                                                                   "exact search is measured and stored")
    i.add_argument("--nlist", type=int, default=0, help="ivf: cells (default sqrt(n))")
    i.add_argument("--nprobe", type=int, default=32, help="ivf: cells searched per query")
    i.add_argument("--hnsw-m", type=int, default=32, help="hnsw: links per node")
    i.add_argument("--ef-search", type=int, default=128, help="hnsw: search candidate list")
    i.add_argument("--sample", type=int, default=1000, help="queries per direction for the FAISS recall@10")
    i.add_argument("--batch-size", type=int, help="embedding batch size")
    i.add_argument("--device", help="cpu or cuda")
    i.set_defaults(fn=_index)

    s = sub.add_parser("search", help="text -> image or image -> text over an index")
    s.add_argument("index", help="an `itr index` directory")
    s.add_argument("text", nargs="*", help="text queries (one search each)")
    s.add_argument("--image", metavar="ID", help="image -> text: an image of the index, by its id")
    s.add_argument("--image-file", metavar="PATH", help="image -> text: a picture (raw-image models)")
    s.add_argument("--k", type=int, default=10, help="results per query")
    s.add_argument("--rerank", type=int, default=100, help="shortlist length of models that rerank")
    s.add_argument("--checkpoint", help="the index's checkpoint where it has moved (must be the same version)")
    s.add_argument("--exact", action="store_true", help="exact search even where the index has a FAISS index")
    s.add_argument("--json", action="store_true", help="print the results as JSON")
    s.add_argument("--device", help="cpu or cuda")
    s.set_defaults(fn=_search)

    r = sub.add_parser("report", help="a static HTML page of what a checkpoint retrieves (metrics, sampled "
                                      "queries with failures first, alignments)")
    r.add_argument("checkpoint", help="DIR/best, DIR/last or a run directory")
    r.add_argument("--data", required=True, help="precomp directory or shard directory")
    r.add_argument("--split", required=True)
    r.add_argument("--out", required=True, help="folder of the page (index.html, images/)")
    r.add_argument("--queries", type=int, default=10, help="queries shown each way")
    r.add_argument("--images", metavar="DIR", help="the split's image files, named by their ids (thumbnails of "
                                                   "feature datasets)")
    r.add_argument("--protocol", choices=["1k", "coco-5fold", "5k"])
    r.add_argument("--json", metavar="PATH", help="also write the metrics to this JSON file")
    r.add_argument("--device", help="cpu or cuda")
    r.add_argument("--log-to-run", metavar="RUN_ID", help="MLflow: add the metrics and the page to this run")
    r.add_argument("--tracking-uri", help="MLflow tracking URI")
    r.add_argument("--serve", type=int, nargs="?", const=8000, metavar="PORT",
                   help="then serve the page on 127.0.0.1:PORT (default 8000)")
    r.set_defaults(fn=_report)

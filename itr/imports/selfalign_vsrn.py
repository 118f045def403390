"""SelfAlign on VSRN (Zjamie813/SelfAlign ``vsrn_SelfAlign/``) checkpoints: ``runs/{flickr,coco}/model_best.pth.tar``
as ``train_SelfAlign.py`` writes them (README.md@26343b7 ``--logger_name runs/flickr``; the repository releases no
trained model).

Layout (train_SelfAlign.py@26343b7 ``save_checkpoint``; model_SelfAlign.py@26343b7 ``VSRN.state_dict``): a dict with
``epoch``, ``best_rsum``, ``Eiters``, ``opt`` and ``model`` = [img_enc, txt_enc, region_loss]:

- ``model[0]``: VSRN's ``EncoderImagePrecompAttn`` (``fc``, ``Rs_GCN_1..4``, ``img_rnn``, ``bn`` on f30k_precomp:
  see ``itr.imports.vsrn``) plus the image context head: ``ctx_fc``, ``ctx_fc_bn1`` (attended global),
  ``ctx_fc_bn2`` (context locals), ``fusion_fn.{0,2}`` (the gate);
- ``model[1]``: ``EncoderText``: ``embed``, ``local_fc`` (word_dim -> embed_size), ``rnn`` (GRU on the projected
  words), and the same context head (``ctx_fc``, ``ctx_fc_bn1``, ``ctx_fc_bn2``, ``fusion_fn``);
- ``model[2]``: ``LCA_loss`` (loss_SelfAlign.py): ``v_prototypes.weight`` (local_clu_num, embed_size).

So everything the evaluation embedding needs is saved ([emb; 0.5 fused; 0.5 mean locals] for images,
[emb; mean locals; fused] for captions, itr.models.selfalign), the prototypes too; only the S2VT captioner is
not, hence ``model.caption_weight: 0`` in the derived recipe (as ``itr.imports.vsrn``).

Options read: VSRN's (``itr.imports.vsrn``), local_clu_num (the prototypes' shape decides), ctx_relu, v5_tao,
v6_tao, and max_len as ``model.word_slots`` (the word slots the alignment losses gather; ``data.max_words`` stays 0
because the reference never truncates the retrieval caption). model_SelfAlign.py hard-codes the rest
(sinkhorn_iterations=2, student_temp 0.1, epsilon 0.05, the 0.5 factors; ``--exp_sim`` is parsed but never read):
itr's defaults. Refused: as VSRN.

Evaluation differs from the reference in one documented place (itr.models.selfalign "Padding"): the reference's
caption context features (the mean of the GRU states, the BatchNorm of every position, the mean of the context
locals) include the zero padding up to the longest caption of the evaluation batch, so a caption's embedding
there depends on its batch; itr leaves padding out. Captions as long as their batch's longest are the same.
"""
from itr.errors import CheckpointError
from itr.imports.vsrn import check_layout, image_weights, text_weights, vsrn_recipe

# model_SelfAlign.py context head names -> itr.modules.alignment.ContextHead names
CTX = {"ctx_fc.": "ctx_fc.", "ctx_fc_bn1.": "bn_glo.", "ctx_fc_bn2.": "bn_loc.", "fusion_fn.": "fusion."}


def three_parts(ckpt, source):
    model = ckpt.get("model")
    if not (isinstance(model, (list, tuple)) and all(isinstance(m, dict) for m in model)):
        raise CheckpointError(f"{source}: expected 'model' to be a list of state dicts, got {type(model).__name__}")
    if len(model) == 2:
        raise CheckpointError(f"{source}: 'model' holds two state dicts (image, text) and no LCA_loss prototypes: "
                              f"a VSRN checkpoint (use --from vsrn), not vsrn_SelfAlign's "
                              f"[img_enc, txt_enc, region_loss]")
    if len(model) != 3:
        raise CheckpointError(f"{source}: expected 'model' to be [img_enc, txt_enc, region_loss], "
                              f"got {len(model)} parts")
    return model


def context_head(state, prefix, source, part):
    """A context head's tensors (``ctx_fc``, ``ctx_fc_bn1/2``, ``fusion_fn``) under ``prefix``; others are errors."""
    out = {}
    for k, v in state.items():
        key = next((c for c in CTX if k.startswith(c)), None)
        if key is None:
            raise CheckpointError(f"{source}: {part} key {k} is neither VSRN's nor SelfAlign's context head")
        out[f"{prefix}.{CTX[key]}{k[len(key):]}"] = v
    return out


def convert(ckpt, opt, req):
    img, txt, lca = three_parts(ckpt, req.ckpt)
    check_layout(opt, img, txt, req.ckpt)
    weights, rest, layers = image_weights(img, req.ckpt)
    weights.update(context_head(rest, "img_ctx", req.ckpt, "image encoder"))
    ctx = {k: v for k, v in txt.items() if k.startswith(tuple(CTX))}
    weights.update(text_weights({k: v for k, v in txt.items() if k not in ctx}, req.ckpt, extra=("local_fc.",)))
    weights.update(context_head(ctx, "txt_ctx", req.ckpt, "text encoder"))
    if set(lca) != {"v_prototypes.weight"}:
        raise CheckpointError(f"{req.ckpt}: model[2] should be LCA_loss's v_prototypes.weight, got {sorted(lca)}")
    weights["lca.prototypes.weight"] = lca["v_prototypes.weight"]
    recipe = vsrn_recipe("selfalign_vsrn", opt, req, img, txt, layers)
    recipe["model"].update({
        "concept": True, "context": True, "prototypes": lca["v_prototypes.weight"].shape[0],
        "ctx_relu": bool(opt.get("ctx_relu", 1)), "tau_image_locals": float(opt.get("v5_tao", 0.7)),
        "tau_text_locals": float(opt.get("v6_tao", 0.7)), "word_slots": int(opt.get("max_len", 60))})
    recipe["loss"]["max_violation"] = bool(opt.get("max_violation", True))  # train_SelfAlign.py: default True
    return {"recipe": recipe, "weights": weights, "img_dim": img["fc.weight"].shape[1]}

"""SelfAlign on CAMERA (Zjamie813/SelfAlign ``camera_SelfAlign/``) checkpoints: ``runs/*/model_best.pth.tar`` of
its train_SelfAlign.py. The repository releases no trained model (README@88c25a6): these are a user's own.

Layout (train_SelfAlign.py@c1b0c15 ``save_checkpoint``, model_SelfAlign.py@c1b0c15 ``CAMERA.state_dict``): as
CAMERA's (``itr.imports.camera``), ``model`` being [image encoder, text encoder, LCA loss]:

- the image encoder: CAMERA's keys, and the context head ``ctx_fc``, ``ctx_fc_bn1`` (attended global),
  ``ctx_fc_bn2`` (locals), ``fusion_fn.{0,2}``;
- the text encoder: CAMERA's keys with transformers' ``BertModel`` under ``bert.`` (README: Transformers 2.1.1;
  LayerNorm weight/bias), and the same context head;
- ``LCA_loss``: ``v_prototypes.weight`` (prototypes, embed) (loss_SelfAlign.py@0bfac53).

Everything the evaluation embedding reads is there (evaluation_SelfAlign.py@c1b0c15 ``encode_data``: the views
with 0.5 x [mean locals; fused] appended, the caption with [fused; mean locals]); the prototypes only train.
Options read: CAMERA's, and ctx_fc_relu, local_clu_num (from the tensor), v5_tao, v6_tao. Refused: as CAMERA.
"""
from itr.errors import CheckpointError
from itr.imports.camera import IMAGE_RULES, TEXT_RULES, camera_recipe, check_agsa
from itr.imports.common import check_bert_dir, layernorm_names, rename, state_parts

REPO = "Zjamie813/SelfAlign camera_SelfAlign"


def context_rules(dst):
    """model_SelfAlign.py's CRA head -> itr's ``ContextHead``."""
    return [("ctx_fc_bn1.", f"{dst}.bn_glo."), ("ctx_fc_bn2.", f"{dst}.bn_loc."), ("ctx_fc.", f"{dst}.ctx_fc."),
            ("fusion_fn.", f"{dst}.fusion.")]


def convert(ckpt, opt, req):
    img, txt, lca = state_parts(ckpt, ("image encoder", "text encoder", "LCA loss"), req.ckpt, REPO)
    for part, state, key in (("image encoder", img, "ctx_fc.weight"), ("text encoder", txt, "ctx_fc.weight"),
                             ("LCA loss", lca, "v_prototypes.weight"), ("image encoder", img, "fc.weight")):
        if key not in state:
            raise CheckpointError(f"{req.ckpt}: the {part} has no {key}: not SelfAlign-CAMERA's model")
    check_agsa(img, "image encoder", req.ckpt)
    check_agsa(txt, "text encoder", req.ckpt)
    check_bert_dir(txt, req)
    weights = rename(img, IMAGE_RULES + context_rules("img_ctx"), "image encoder", req.ckpt)
    weights.update(layernorm_names(rename(txt, TEXT_RULES + context_rules("txt_ctx"), "text encoder", req.ckpt)))
    weights.update(rename(lca, [("v_prototypes.", "lca.prototypes.")], "LCA loss", req.ckpt))
    recipe = camera_recipe(opt, req, img, name="selfalign_camera")
    recipe["model"].update(
        concept=True, context=True, prototypes=lca["v_prototypes.weight"].shape[0], sinkhorn_iters=2,
        tau_image_locals=opt.get("v5_tao", 0.7), tau_text_locals=opt.get("v6_tao", 0.7),
        ctx_relu=bool(opt.get("ctx_fc_relu", 1)))
    recipe["loss"]["max_violation"] = bool(opt.get("max_violation", True))  # train_SelfAlign.py: type=bool, default True
    return {"recipe": recipe, "weights": weights, "img_dim": img["fc.weight"].shape[1]}

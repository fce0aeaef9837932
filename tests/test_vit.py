"Parity grids for the biased ViT: fast vs explicit path, float64, outputs and gradients."
import itertools
import pytest
import timm
import torch
import inspect
from functools import partial
import torch.nn as nn
from timm.layers import Attention
import mgab.mre
from mgab.mre import TokenRelations, mask_bias
from mgab.vit import biased_sdpa, create_vit, load_vit_checkpoint, MaskBiasAttention



def _randomise_bias(model, gen):
    with torch.no_grad():
        for blk in model.blocks:
            for n in ("u_pos", "u_neg"):
                u = getattr(blk.attn, n)
                if isinstance(u, torch.nn.Parameter): u.copy_(torch.randn(u.shape, generator=gen, dtype=u.dtype) * 3)


def _labels(B, N, num_distinct, gen):
    "Token labels using exactly labels 0..num_distinct (0 = no mask)"
    if num_distinct == 0: return torch.zeros(B, N, dtype=torch.long)
    m = torch.randint(0, num_distinct + 1, (B, N), generator=gen)
    m[:, : num_distinct + 1] = torch.arange(num_distinct + 1)  # every label present
    return m


def _grads(model, x, m):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = model.forward_features(x, m)  # all tokens: the last layer's bias reaches no CLS-only output
    (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum().backward()
    g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), x.grad.clone(), g


GRID = [
    # arch, img, extra kwargs, bias options
    ("vit_tiny_patch16_224", 48, {}, {}),
    ("vit_small_patch16_224", 48, {"reg_tokens": 2}, {}),
    ("vit_small_patch8_224", 32, {}, {"share_heads": True}),
    ("vit_tiny_patch16_224", 48, {"class_token": False, "global_pool": "avg"}, {"relations": "pos"}),
    ("vit_tiny_patch16_224", 48, {}, {"relations": "neg"}),
    ("vit_tiny_patch16_224", 48, {}, {"share_layers": True}),
    ("vit_tiny_patch16_224", 48, {}, {"bias": "fixed"}),
    ("vit_base_patch16_224", 48, {"depth": 2}, {}),
]


@pytest.mark.parametrize("arch,img,kw,bias_kw", GRID)
@pytest.mark.parametrize("num_distinct", [0, 1, 3, 5])
def test_fast_matches_explicit_float64(arch, img, kw, bias_kw, num_distinct):
    gen = torch.Generator().manual_seed(num_distinct)
    model = create_vit(arch, img_size=img, num_classes=7, **kw, **bias_kw).double().eval()
    _randomise_bias(model, gen)
    grid = model.patch_embed.grid_size
    x = torch.randn(3, 3, img, img, generator=gen, dtype=torch.float64)
    m = _labels(3, grid[0] * grid[1], num_distinct, gen)
    out_f, gx_f, g_f = _grads(model, x, m)
    for blk in model.blocks: blk.attn.fused_attn = False
    out_e, gx_e, g_e = _grads(model, x, m)
    torch.testing.assert_close(out_f, out_e, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(gx_f, gx_e, rtol=1e-9, atol=1e-10)
    assert g_f.keys() == g_e.keys()
    for n in g_f: torch.testing.assert_close(g_f[n], g_e[n], rtol=1e-8, atol=1e-10, msg=n)
    learnable = [n for n in g_f if n.endswith(("u_pos", "u_neg"))]
    if bias_kw.get("bias") == "fixed": assert learnable == []
    else:
        assert learnable, "bias parameters got no gradient"
        if num_distinct >= 2:  # both relations occur: every learnable u has a nonzero gradient
            assert all(g_f[n].abs().max() > 0 for n in learnable)
        if num_distinct == 0:  # no masks: the bias cannot matter
            assert all(g_f[n].abs().max() == 0 for n in learnable)


def test_biased_sdpa_matches_formula_with_dropout_off():
    gen = torch.Generator().manual_seed(1)
    B, H, N, D = 2, 4, 23, 20
    q, k, v = (torch.randn(B, H, N, D, generator=gen, dtype=torch.float64) for _ in range(3))
    m = torch.randint(0, 4, (B, N), generator=gen)
    up, un = torch.randn(H, generator=gen, dtype=torch.float64), torch.randn(H, generator=gen, dtype=torch.float64)
    scale = D ** -0.5
    ref = (((q @ k.transpose(-1, -2)) + mask_bias(m, up, un)) * scale).softmax(-1) @ v  # Eq. 5 literally
    torch.testing.assert_close(biased_sdpa(q, k, v, TokenRelations(m, 5).factors, up, un, scale), ref)
    # the bias is divided by sqrt(d): adding it after scaling would differ
    wrong = ((q @ k.transpose(-1, -2)) * scale + mask_bias(m, up, un)).softmax(-1) @ v
    assert (wrong - ref).abs().max() > 1e-3


@pytest.mark.parametrize("arch,kw", [("vit_tiny_patch16_224", {}), ("vit_small_patch8_224", {"reg_tokens": 4})])
def test_zero_bias_equals_timm(arch, kw):
    torch.manual_seed(0)
    model = create_vit(arch, img_size=64, **kw).eval()
    ref = timm.create_model(arch, img_size=64, **kw).eval()
    missing, unexpected = ref.load_state_dict(model.state_dict(), strict=False)
    assert unexpected and all(k.endswith(("u_pos", "u_neg")) for k in unexpected) and not missing
    x = torch.randn(2, 3, 64, 64)
    m = torch.randint(0, 6, (2, model.patch_embed.num_patches))
    with torch.no_grad():
        torch.testing.assert_close(model(x, m), ref(x), rtol=1e-4, atol=1e-5)
        assert torch.equal(model(x), ref(x))  # m=None runs timm's own code
        assert torch.equal(model.forward_features(x), ref.forward_features(x))


def test_timm_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=5)
    p = tmp_path / "vanilla.pth"
    torch.save(ref.state_dict(), p)
    model = create_vit("vit_tiny_patch16_224", img_size=64, num_classes=5, checkpoint_path=p).eval()
    for k, v in ref.state_dict().items(): assert torch.equal(model.state_dict()[k], v), k
    # and back: a trained mgab model saves and reloads with its bias
    with torch.no_grad(): model.blocks[2].attn.u_pos.fill_(0.7)
    q = tmp_path / "biased.pth"
    torch.save(model.state_dict(), q)
    again = create_vit("vit_tiny_patch16_224", img_size=64, num_classes=5, checkpoint_path=q)
    assert again.blocks[2].attn.u_pos[0].item() == pytest.approx(0.7)
    # a checkpoint at another resolution gets its position embedding resampled by timm
    bigger = create_vit("vit_tiny_patch16_224", img_size=96, num_classes=5, checkpoint_path=p)
    assert bigger.pos_embed.shape == (1, 37, 192)


def test_checkpoint_errors(tmp_path):
    model = create_vit("vit_tiny_patch16_224", img_size=64)
    with pytest.raises(FileNotFoundError, match="nope.pth"): load_vit_checkpoint(model, tmp_path / "nope.pth")
    small = timm.create_model("vit_small_patch16_224", img_size=64)
    torch.save(small.state_dict(), tmp_path / "small.pth")
    with pytest.raises(ValueError, match="small.pth.*another architecture"): load_vit_checkpoint(model, tmp_path / "small.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"): load_vit_checkpoint(model, tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="does not download"): create_vit("vit_tiny_patch16_224", pretrained=True)


def test_wrong_labels_name_expected_shape():
    model = create_vit("vit_tiny_patch16_224", img_size=64)
    x = torch.randn(2, 3, 64, 64)
    with pytest.raises(ValueError, match=r"`m` must have shape \(2, 16\), got \(2, 17\)"): model(x, torch.zeros(2, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`m` must have shape \(2, 16\), got \(2, 4, 4\)"): model(x, torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"): model(x, torch.zeros(2, 16))
    with pytest.raises(ValueError, match="num_labels"): model(x, torch.full((2, 16), 6))
    big = create_vit("vit_tiny_patch16_224", img_size=64, num_labels=8)
    big(x, torch.full((2, 16), 8))


def test_dynamic_img_size_multicrop_grids():
    "DINO's local crops: one model, other resolutions, labels for each crop's own grid"
    model = create_vit("vit_tiny_patch16_224", img_size=64, dynamic_img_size=True).eval()
    for s in (32, 64, 96):
        g = s // 16
        out = model.forward_features(torch.randn(2, 3, s, s), torch.randint(0, 6, (2, g * g)))
        assert out.shape == (2, 1 + g * g, 192)
    with pytest.raises(ValueError, match=r"\(2, 4\)"): model(torch.randn(2, 3, 32, 32), torch.zeros(2, 16, dtype=torch.long))


def test_attention_maps_differentiable_and_bias_effect():
    torch.manual_seed(0)
    model = create_vit("vit_tiny_patch16_224", img_size=64).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    m = torch.randint(0, 6, (2, 16))
    maps = model.attention_maps(x, m)
    assert len(maps) == 12 and maps[0].shape == (2, 3, 17, 17)
    torch.stack(maps).pow(2).sum().backward()
    assert model.blocks[0].attn.u_pos.grad.abs().max() > 0  # gradients reach the bias through the maps
    assert model.blocks[0].attn.attn_probs is None and not model.blocks[0].attn.stash_attn  # stash switched off
    # bias off changes attention only in rows of tokens that have a relation
    with torch.no_grad():
        for blk in model.blocks: blk.attn.u_pos.fill_(5.); blk.attn.u_neg.fill_(-5.)
        on, off = model.attention_maps(x, m)[0], model.attention_maps(x)[0]
    rel_rows = (model.prefix_labels(m) != 0)  # (B, T)
    diff = (on - off).abs().amax(dim=(1, 3))  # (B, T) largest change per query row
    assert diff[~rel_rows].max() < 1e-12 and diff[rel_rows].min() > 1e-6


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = create_vit("vit_tiny_patch16_224", img_size=32).double()
    _randomise_bias(model, torch.Generator().manual_seed(0))
    x, m = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.randint(0, 6, (2, 4))
    _, gx, g = _grads(model, x, m)
    model.set_grad_checkpointing(True)
    _, gx2, g2 = _grads(model, x, m)
    torch.testing.assert_close(gx, gx2)
    for n in g: torch.testing.assert_close(g[n], g2[n], msg=n)


@pytest.mark.gpu
def test_cuda_bf16_fast_path_close_to_explicit():
    model = create_vit("vit_small_patch16_224", img_size=224).cuda().eval()
    _randomise_bias(model, torch.Generator().manual_seed(0))
    x, m = torch.randn(4, 3, 224, 224, device="cuda"), torch.randint(0, 6, (4, 196), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        fast = model(x, m).float()
        for blk in model.blocks: blk.attn.fused_attn = False
        ref = model(x, m).float()
    torch.testing.assert_close(fast, ref, rtol=5e-2, atol=5e-2)


# What `MaskBiasAttention.forward` copies from timm's `Attention` (timm 1.0.x). A new timm release that changes these
# fails here: read timm's `Attention.forward`, update the override in nbs/04_vit.ipynb, then these lists.
_TIMM_INIT = ["self", "dim", "num_heads", "attn_head_dim", "dim_out", "qkv_bias", "qk_norm", "scale_norm", "proj_bias",
              "gated", "attn_drop", "proj_drop", "norm_layer", "device", "dtype"]
_TIMM_FORWARD = ["self", "x", "attn_mask", "is_causal"]
_TIMM_ATTRS = ("num_heads", "head_dim", "attn_dim", "scale", "fused_attn", "qkv", "q_norm", "k_norm", "attn_drop",
               "norm", "gate", "proj", "proj_drop")


def test_attention_follows_timm_signature():
    "The override relies on timm's constructor options, forward arguments and attributes as of timm 1.0"
    init = list(inspect.signature(Attention.__init__).parameters)
    fwd = list(inspect.signature(Attention.forward).parameters)
    assert init == _TIMM_INIT, (f"timm.layers.Attention.__init__ changed ({init}): check that "
                                "MaskBiasAttention.forward (nbs/04_vit.ipynb) handles the new options, then update "
                                "_TIMM_INIT")
    assert fwd == _TIMM_FORWARD, (f"timm.layers.Attention.forward changed ({fwd}): update MaskBiasAttention.forward "
                                  "(nbs/04_vit.ipynb) to follow it, then _TIMM_FORWARD")
    a = Attention(16, num_heads=2)
    missing = [n for n in _TIMM_ATTRS if not hasattr(a, n)]
    assert not missing, (f"timm's Attention lost {missing}: MaskBiasAttention.forward reads them; follow timm's new "
                         "forward")


_OPTIONS = [dict(), dict(qkv_bias=True), dict(qk_norm=True), dict(scale_norm=True), dict(proj_bias=False),
            dict(gated=True), dict(attn_head_dim=12), dict(dim_out=24), dict(qk_norm=True, scale_norm=True, gated=True)]


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("opts", _OPTIONS, ids=lambda o: ",".join(o) or "default")
def test_attention_follows_timm(opts, fused):
    "With zero bias the override's own path (labels given) gives timm's `Attention` output, for each timm option"
    gen = torch.Generator().manual_seed(0)
    kw = dict(opts, norm_layer=nn.LayerNorm) if {"qk_norm", "scale_norm"} & set(opts) else opts
    ref = Attention(32, num_heads=4, **kw).double()
    ours = MaskBiasAttention(32, num_heads=4, **kw).double()
    with torch.no_grad():
        for p in ref.parameters(): p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    missing, unexpected = ours.load_state_dict(ref.state_dict(), strict=False)
    assert set(missing) == {"u_pos", "u_neg"} and not unexpected
    ref.fused_attn = ours.fused_attn = fused
    x, m = torch.randn(2, 7, 32, generator=gen, dtype=torch.float64), torch.randint(0, 6, (2, 7), generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, m=m), ref(x), rtol=1e-10, atol=1e-10)  # u = 0: the bias path is timm's
        ours.stash_attn = True  # the explicit path too, which keeps the softmax
        torch.testing.assert_close(ours(x, m=m), ref(x), rtol=1e-10, atol=1e-10)
        ours.u_pos.fill_(2.)
        assert (ours(x, m=m) - ref(x)).abs().max() > 1e-3  # and the bias does enter that path


def test_relations_built_once_per_forward(monkeypatch):
    "`m` travels once: one `relation_factors` call per forward, whatever the depth (it was one per block)"
    calls = []
    real = mgab.mre.relation_factors
    monkeypatch.setattr(mgab.mre, "relation_factors", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = create_vit("vit_tiny_patch16_224", img_size=32, depth=3, num_classes=0).eval()
    with torch.no_grad():
        for b in model.blocks: b.attn.u_pos.fill_(1.)
        model(torch.randn(2, 3, 32, 32), torch.randint(0, 6, (2, 4)))
    assert len(calls) == 1
    with torch.no_grad(): model.blocks[0].attn(torch.randn(2, 5, 192), m=torch.randint(0, 6, (2, 5)))  # called alone
    assert len(calls) == 2

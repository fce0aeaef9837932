"MAE with mask-guided attention bias: masking, Eq. 7 against a brute-force bias, loss, training runs and resume."
import json
import pytest
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback, CancelFitException
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from torch.utils.data import Dataset
from mgab.mae import MAE, pretrain_mae, random_masking, sincos_pos_embed
from mgab.core import UsageError
from mgab.vit import uses_masks
from mgab.mre import labels2tokens, mask_bias
from mgab.vit import create_vit
from mgab.runs import RunFolder

TINY = dict(name="vit_tiny_patch16_224", img_size=32)


def _set_u(model, gen, scale=2.):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.rsplit(".", 1)[-1] in ("u_pos", "u_neg"):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


# --- masking ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("L,ratio", [(16, .75), (49, .75), (196, .75), (10, .5), (7, 0.), (20, .85)])
def test_random_masking_counts_and_restore(L, ratio):
    gen = torch.Generator().manual_seed(L)
    x = torch.randn(4, L, 6, generator=gen)
    noise = torch.rand(4, L, generator=gen)
    xm, mask, ids_restore, ids_keep = random_masking(x, ratio, noise)
    K = int(L * (1 - ratio))
    assert xm.shape == (4, K, 6)
    assert torch.equal(mask.sum(1), torch.full((4,), float(L - K)))
    # the kept tokens are those with the K smallest noise values, in increasing noise order
    kept = noise.argsort(1)[:, :K]
    assert torch.equal(xm, x.gather(1, kept[..., None].expand(-1, -1, 6)))
    assert torch.equal(mask, (noise > noise.sort(1).values[:, K - 1:K]).float())
    # ids_restore inverts the shuffle: kept tokens + anything for the rest, unshuffled, puts kept tokens back in place
    filled = torch.cat([xm, torch.zeros(4, L - K, 6)], 1).gather(1, ids_restore[..., None].expand(-1, -1, 6))
    assert torch.equal(filled, x * (1 - mask[..., None]))
    assert torch.equal(ids_restore.argsort(1)[:, :K], kept) and torch.equal(ids_keep, kept)


def test_random_masking_bad_input():
    with pytest.raises(ValueError, match="mask_ratio"): random_masking(torch.zeros(1, 4, 2), 0.8)
    with pytest.raises(ValueError, match="`noise` must have shape"):
        random_masking(torch.zeros(1, 4, 2), .5, torch.rand(1, 5))


def test_sincos_pos_embed_is_fixed_and_timm_compatible():
    enc = create_vit("vit_tiny_patch16_224", img_size=64, num_classes=0, reg_tokens=2)
    keys = set(enc.state_dict())
    mae = MAE(enc)
    assert set(mae.encoder.state_dict()) == keys
    assert torch.equal(mae.encoder.pos_embed, sincos_pos_embed(192, 4, num_prefix_tokens=3))
    assert not mae.encoder.pos_embed.requires_grad
    mae(torch.randn(2, 3, 64, 64), torch.randint(0, 6, (2, 16))).backward()
    assert mae.encoder.pos_embed.grad is None and mae.encoder.cls_token.grad is not None


# --- Eq. 7: the encoder's bias comes from the visible tokens only ------------------------------------------------

def _brute_force_latent(enc, x, m, noise, ratio):
    "The encoder on the visible tokens with the full (B, H, N, N) Eq. 4 bias restricted to them, via timm's attn_mask"
    B, L = m.shape
    P, C = enc.num_prefix_tokens, enc.embed_dim
    K = int(L * (1 - ratio))
    keep = noise.argsort(1)[:, :K]  # MAE's ids_keep
    prefix = [t.expand(B, -1, -1) for t in (enc.cls_token, enc.reg_token) if t is not None]
    full = torch.cat(prefix + [enc.patch_embed(x)], 1) + enc.pos_embed  # (B, P+L, C)
    sel = torch.cat([torch.arange(P).expand(B, P), P + keep], 1)  # (B, P+K) positions of the visible tokens
    t = enc.norm_pre(full.gather(1, sel[..., None].expand(-1, -1, C)))
    m_all = F.pad(m, (P, 0))  # (B, P+L), label 0 for prefix tokens
    for blk in enc.blocks:
        a = blk.attn
        b = mask_bias(m_all, a.u_pos, a.u_neg)  # (B, H or 1, P+L, P+L): Eq. 4 between all tokens
        h = b.shape[1]
        b = b.gather(2, sel[:, None, :, None].expand(-1, h, -1, P + L))  # rows of the visible queries
        b = b.gather(3, sel[:, None, None, :].expand(-1, h, P + K, -1))  # columns of the visible keys
        t = blk(t, m=None, attn_mask=b * a.scale)  # Eq. 5: (q k + b) / sqrt(d); timm adds the mask after scaling
    return enc.norm(t)


DESIGNS = [
    ({}, {}),
    ({"share_heads": True}, {}),
    ({"share_layers": True}, {}),
    ({"relations": "pos"}, {}),
    ({"relations": "neg"}, {"fused": False}),
    ({"bias": "fixed"}, {}),
    ({"reg_tokens": 2}, {}),
    ({"class_token": False, "global_pool": "avg"}, {}),
    ({}, {"fused": False}),
    ({}, {"ratio": .5}),
]


@pytest.mark.parametrize("kw,opt", DESIGNS)
def test_encoder_bias_sees_visible_tokens_only(kw, opt):
    gen = torch.Generator().manual_seed(0)
    ratio = opt.get("ratio", .75)
    enc = create_vit("vit_tiny_patch16_224", img_size=64, num_classes=0, depth=3, **kw)
    mae = MAE(enc, mask_ratio=ratio).double().eval()
    _set_u(mae, gen)
    for blk in enc.blocks: blk.attn.fused_attn = opt.get("fused", True)
    x = torch.randn(3, 3, 64, 64, generator=gen, dtype=torch.float64)
    m = torch.randint(0, 6, (3, 16), generator=gen)
    noise = torch.rand(3, 16, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        latent, mask, _ = mae.forward_encoder(x, m, noise)
        for blk in enc.blocks: blk.attn.fused_attn = True  # the brute force runs timm's own attention
        ref = _brute_force_latent(enc, x, m, noise, ratio)
        torch.testing.assert_close(latent, ref, rtol=1e-9, atol=1e-9)
        # the test can tell: the labels of the first K positions put on the visible tokens give another result
        K = int(16 * (1 - ratio))
        m_wrong = m.clone(); m_wrong.scatter_(1, noise.argsort(1)[:, :K], m[:, :K])
        assert not torch.equal(m_wrong, m)
        assert (_brute_force_latent(enc, x, m_wrong, noise, ratio) - latent).abs().max() > 1e-6
        assert torch.equal(mask.sum(1), torch.full((3,), 16. - K, dtype=mask.dtype))


def test_zero_bias_is_vanilla_mae():
    torch.manual_seed(0)
    kw = dict(TINY, img_size=64, num_classes=0, depth=4)  # 4x4 tokens: 4 visible, so pairs of both relations
    biased = MAE(create_vit(**kw), decoder_embed_dim=64, decoder_depth=2)
    vanilla = MAE(create_vit(**kw, bias=None), decoder_embed_dim=64, decoder_depth=2)
    vanilla.load_state_dict(biased.state_dict())  # u are zero-valued buffers in the vanilla model
    assert not uses_masks(vanilla) and uses_masks(biased)
    x, m = torch.randn(4, 3, 64, 64), torch.tensor([1, 2] * 8).repeat(4, 1)  # labels 1 and 2, no 0
    m[:, 0] = 0  # and one token outside every mask
    torch.manual_seed(1); lb = biased(x, m)
    torch.manual_seed(1); lv = vanilla(x, m)  # m is dropped: timm's own attention everywhere
    torch.manual_seed(1); ln = biased(x)  # m=None: the vanilla path
    torch.testing.assert_close(lb, lv, rtol=1e-5, atol=1e-6)
    assert torch.equal(ln, lv)
    lb.backward(); lv.backward()
    gv = dict(vanilla.named_parameters())
    for n, p in biased.named_parameters():
        if n.rsplit(".", 1)[-1] in ("u_pos", "u_neg"):
            assert (p.grad.abs() > 1e-9).all(), n  # every head: ~2e-7 at least, float noise ~1e-13
        else: torch.testing.assert_close(p.grad, gv[n].grad, rtol=1e-4, atol=1e-6)


def test_decoder_bias_uses_all_labels():
    torch.manual_seed(0)
    mae = MAE(create_vit(**TINY, num_classes=0, depth=2, bias=None), decoder_embed_dim=64, decoder_depth=2,
              decoder_bias=True).eval()
    assert uses_masks(mae) and len(mae.encoder.bias_parameters()) == 0
    u = [p for n, p in mae.named_parameters() if n.startswith("decoder_blocks") and n.endswith(("u_pos", "u_neg"))]
    assert len(u) == 4
    x, m = torch.randn(2, 3, 32, 32), torch.randint(1, 6, (2, 4))
    noise = torch.rand(2, 4)
    with torch.no_grad():
        lat, mask, ids_restore = mae.forward_encoder(x, m, noise)
        p0 = mae.forward_decoder(lat, ids_restore, m)
        torch.testing.assert_close(p0, mae.forward_decoder(lat, ids_restore, None), rtol=1e-5, atol=1e-5)  # u = 0
        _set_u(mae, torch.Generator().manual_seed(1))
        p1 = mae.forward_decoder(lat, ids_restore, m)
        vis_label = m.gather(1, ids_restore.argsort(1)[:, :1])  # (B, 1) a visible token's label
        m2 = torch.where(mask.bool(), vis_label, m)  # removed tokens now in the same mask as that visible token
        assert not torch.equal(mask_bias(m2, 1., -1.), mask_bias(m, 1., -1.))
        assert (p1 - p0).abs().max() > 1e-4 and (mae.forward_decoder(lat, ids_restore, m2) - p1).abs().max() > 1e-4


# --- loss -------------------------------------------------------------------------------------------------------

def _mae_ref_loss(imgs, pred, mask, p, norm_pix_loss):
    "MAE's patchify and forward_loss, transcribed from the reference code"
    h = w = imgs.shape[2] // p
    x = imgs.reshape(shape=(imgs.shape[0], 3, h, p, w, p))
    x = torch.einsum('nchpwq->nhwpqc', x)
    target = x.reshape(shape=(imgs.shape[0], h * w, p**2 * 3))
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.e-6)**.5
    loss = (pred - target) ** 2
    loss = loss.mean(dim=-1)
    loss = (loss * mask).sum() / mask.sum()
    return loss


@pytest.mark.parametrize("norm_pix_loss", [True, False])
@pytest.mark.parametrize("patch,img", [(16, 32), (8, 32)])
def test_loss_matches_mae_reference(norm_pix_loss, patch, img):
    gen = torch.Generator().manual_seed(patch)
    mae = MAE(create_vit("vit_tiny_patch16_224", img_size=img, patch_size=patch, num_classes=0, depth=1),
              decoder_embed_dim=32, decoder_depth=1, norm_pix_loss=norm_pix_loss)
    L = (img // patch) ** 2
    imgs = torch.randn(3, 3, img, img, generator=gen)
    pred = torch.randn(3, L, patch * patch * 3, generator=gen)
    _, mask, _, _ = random_masking(torch.zeros(3, L, 1), .75, torch.rand(3, L, generator=gen))
    ref = _mae_ref_loss(imgs, pred, mask, patch, norm_pix_loss)
    torch.testing.assert_close(mae.forward_loss(imgs, pred, mask), ref)
    torch.testing.assert_close(mae.unpatchify(mae.patchify(imgs)), imgs, rtol=0, atol=0)


def test_reconstruct_undoes_norm_pix():
    "A decoder that predicts the normalised target exactly reconstructs the image"
    mae = MAE(create_vit(**TINY, num_classes=0, depth=1), decoder_embed_dim=32, decoder_depth=1).eval()
    x = torch.randn(2, 3, 32, 32)
    t = mae.patchify(x)
    target = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** .5
    mae.forward_decoder = lambda latent, ids_restore, m=None: target
    recon, mask = mae.reconstruct(x, noise=torch.rand(2, 4))
    torch.testing.assert_close(recon, x, rtol=1e-4, atol=1e-4)
    assert mask.shape == (2, 1, 32, 32) and mask.sum() == 2 * 3 * 16 * 16


# --- training runs ----------------------------------------------------------------------------------------------

class Shapes(Dataset):
    "Images of 2-3 flat-coloured rectangles on a noisy background, labelled 1..3 in their token labels"
    def __init__(self, n, size=32, patch=16): self.n, self.size, self.patch = n, size, patch
    def __len__(self): return self.n
    def __getitem__(self, i):
        g, S = torch.Generator().manual_seed(1000 + i), self.size
        x = 0.2 * torch.randn(3, S, S, generator=g)
        lm = torch.zeros(S, S, dtype=torch.long)
        for k in range(1, 2 + i % 2 + 1):
            h, w = torch.randint(S // 4, S // 2 + 1, (2,), generator=g).tolist()
            y0 = torch.randint(0, S - h + 1, (1,), generator=g).item()
            x0 = torch.randint(0, S - w + 1, (1,), generator=g).item()
            x[:, y0:y0 + h, x0:x0 + w] = torch.rand(3, 1, 1, generator=g) * 2 - 1
            lm[y0:y0 + h, x0:x0 + w] = k
        x = x + 0.05 * torch.randn(3, S, S)  # augmentation noise from the global RNG, restored on resume
        return x, labels2tokens(lm, S // self.patch)[0]


def shapes_dls(n=32, bs=8, size=32, patch=16, device=None):
    dls = DataLoaders(DataLoader(Shapes(n, size, patch), bs=bs, shuffle=True, drop_last=True, device=device),
                      DataLoader(Shapes(8, size, patch), bs=bs, device=device), device=device)
    dls.n_inp = 2
    return dls


class KillAfter(Callback):
    order = 100  # after RunCheckpoint wrote the epoch, like a kill between epochs
    def __init__(self, epoch): self.stop = epoch
    def after_epoch(self):
        if self.epoch == self.stop: raise CancelFitException()


def _metrics(run): return json.loads((run/"metrics.json").read_text())


def test_short_run_learns_and_moves_u(tmp_path):
    cfg = dict(epochs=5, out=tmp_path/"run", lr=2e-3, warmup_epochs=1, progress=False, decoder_embed_dim=64,
               decoder_depth=1, model=dict(TINY, depth=2, patch_size=8))  # 16 tokens, 4 visible
    run = pretrain_mae(cfg, dls=shapes_dls(n=32, bs=8, patch=8))
    rows = _metrics(run)
    assert [r["epoch"] for r in rows] == list(range(5))
    assert rows[-1]["train_loss"] < 0.8 * rows[0]["train_loss"]
    hist = json.loads((run/"bias_history.json").read_text())
    u = torch.tensor([hist[-1]["u_pos"], hist[-1]["u_neg"]])  # (2, layers, heads)
    print("mean |u| after 20 steps:", float(u.abs().mean()))
    assert u.shape == (2, 2, 3) and u.abs().mean() > 0.02  # 20 steps at bias lr 2e-2 (bias_lr_mult 10)
    saved = json.loads((run/"config.json").read_text())
    assert (saved["bias_lr_mult"], saved["lr"], saved["model"]["num_classes"]) == (10., 2e-3, 0)
    enc = RunFolder(run).load_encoder()
    torch.testing.assert_close(enc.bias_values()["u_pos"], torch.tensor(hist[-1]["u_pos"]))


def test_bias_lr_mult_moves_u_further(tmp_path):
    moved = {}
    for mult in (1., 10.):
        cfg = dict(epochs=2, out=tmp_path/f"run{mult}", lr=1e-3, warmup_epochs=0, progress=False, bias_lr_mult=mult,
                   decoder_embed_dim=32, decoder_depth=1, model=dict(TINY, depth=2))
        u = RunFolder(pretrain_mae(cfg, dls=shapes_dls(n=16))).load_encoder().bias_values()
        moved[mult] = float(torch.cat([u["u_pos"], u["u_neg"]]).abs().mean())
    assert moved[10.] > 4 * moved[1.] > 0


def test_resume_reproduces_uninterrupted_run(tmp_path):
    def fit(run, **kw):
        cfg = dict(epochs=3, out=run, lr=1e-3, warmup_epochs=1, progress=False, decoder_embed_dim=32, decoder_depth=1,
                   model=dict(TINY, depth=2, relations="pos"))
        return pretrain_mae(cfg, dls=shapes_dls(n=16), **kw)
    a = fit(tmp_path/"a")
    b = fit(tmp_path/"b", cbs=[KillAfter(1)])
    assert len(_metrics(b)) == 2
    fit(tmp_path/"b", resume=True)
    ra, rb = _metrics(a), _metrics(b)
    assert [r["epoch"] for r in rb] == [0, 1, 2]
    for x, y in zip(ra, rb):
        assert x["train_loss"] == y["train_loss"] and x["u_pos_mean"] == y["u_pos_mean"] and x["lr"] == y["lr"]
    assert ra[2]["u_pos_mean"] != ra[1]["u_pos_mean"]
    sa, sb = (torch.load(r/"encoder.pth", weights_only=True) for r in (a, b))
    for k in sa: assert torch.equal(sa[k], sb[k]), k


def test_pretrain_errors(tmp_path):
    with pytest.raises(ValueError, match="'data'"): pretrain_mae(dict(epochs=1, out=tmp_path/"r", model=TINY))
    dls = shapes_dls(); dls.n_inp = 1
    with pytest.raises(ValueError, match="n_inp=1"): pretrain_mae(dict(epochs=1, out=tmp_path/"r", model=TINY), dls=dls)
    cfg = dict(epochs=1, out=tmp_path/"r", progress=False, decoder_embed_dim=32, decoder_depth=1,
               model=dict(TINY, depth=1))
    pretrain_mae(cfg, dls=shapes_dls(n=8))
    with pytest.raises(UsageError, match="already holds a run"): pretrain_mae(cfg, dls=shapes_dls(n=8))
    with pytest.raises(ValueError, match="mask_ratio"):
        pretrain_mae(dict(cfg, mask_ratio=.6), resume=True, dls=shapes_dls(n=8))


def test_extend_run_keeps_automatic_warmup(tmp_path):
    cfg = dict(epochs=1, out=tmp_path/"r", progress=False, decoder_embed_dim=32, decoder_depth=1,
               model=dict(TINY, depth=1))
    pretrain_mae(cfg, dls=shapes_dls(n=8))
    pretrain_mae(dict(cfg, epochs=2), resume=True, dls=shapes_dls(n=8))  # min(40, epochs / 10) would change
    saved = json.loads((tmp_path/"r"/"config.json").read_text())
    assert (saved["epochs"], saved["warmup_epochs"], len(_metrics(tmp_path/"r"))) == (2, 0.1, 2)


@pytest.mark.gpu
def test_bf16_run_on_cuda(tmp_path):
    cfg = dict(epochs=3, out=tmp_path/"run", lr=2e-3, warmup_epochs=1, progress=False, model=dict(TINY, depth=4),
               decoder_embed_dim=64)
    run = pretrain_mae(cfg, dls=shapes_dls(n=64, bs=16, device="cuda"))
    rows = _metrics(run)
    assert all(r["train_loss"] == r["train_loss"] for r in rows)  # no NaN
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] and abs(rows[-1]["u_pos_mean"]) > 0


# --- with mgab.data (after merge) -------------------------------------------------------------------------------

def _store(image_root, out):
    from mgab.masks import SuperpixelMasker
    from mgab.store import make_mask_store
    make_mask_store(image_root, out, SuperpixelMasker(c=5), progress=False)
    return out


@pytest.mark.slow
def test_short_run_on_embedded_data(tmp_path):
    from mgab.datasets import embedded_dataset
    root = embedded_dataset()
    cfg = dict(epochs=3, out=tmp_path/"run", data=root, masks=_store(root, tmp_path/"masks"), blr=1.5e-3, bs=32,
               progress=False, model=dict(name="vit_tiny_patch16_224", img_size=64), num_workers=0)
    rows = _metrics(pretrain_mae(cfg))
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] and abs(rows[-1]["u_pos_mean"]) > 0


@pytest.mark.slow
def test_short_run_on_imagenette(tmp_path, imagenette):
    cfg = dict(epochs=2, out=tmp_path/"run", data=imagenette, masks=_store(imagenette, tmp_path/"masks"), blr=1.5e-3,
               bs=32, progress=False, model=dict(name="vit_tiny_patch16_224", img_size=64), num_workers=0)
    rows = _metrics(pretrain_mae(cfg))
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] and abs(rows[-1]["u_pos_mean"]) > 0

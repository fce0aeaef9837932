"Evaluation protocols against transcriptions of MAE/DINO reference code, and the report's tables and Fig. 4."
import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.metrics import accuracy

from mgab.evaluate import (LARS, Classifier, append_result, bias_stats, evaluate_run, extract_features, fine_tune,
                           knn_accuracy, knn_scores, linear_head, linear_probe, load_runs, lrd_param_groups,
                           read_results, report, table1, table2, to_markdown, top1, warmup_cosine)
from mgab.vit import create_vit

ARCH, DEPTH = "vit_tiny_patch16_224", 4  # a 4-block ViT-Ti at 32 px (2x2 patches) keeps every test quick


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- labelled loaders as mgab.data makes them (contract 3)
class Items(torch.utils.data.Dataset):
    "`(x, m, y)` items; `n_inp` and `vocab` reach the DataLoaders through fastai's attribute delegation"
    n_inp = 2

    def __init__(self, n, num_classes=3, img_size=32, seed=0, shift=2.):
        g = torch.Generator().manual_seed(seed)
        self.vocab = [f"c{i}" for i in range(num_classes)]
        self.y = torch.arange(n) % num_classes
        colour = shift * F.one_hot(self.y, 3).float()[:, :, None, None] if num_classes <= 3 else 0.
        self.x = torch.randn(n, 3, img_size, img_size, generator=g) + colour
        self.m = torch.randint(0, 6, (n, (img_size // 16) ** 2), generator=g)

    def __len__(self): return len(self.y)
    def __getitem__(self, i): return self.x[i], self.m[i], self.y[i]


def tiny_dls(n_train=24, n_valid=12, bs=8, device="cpu", **kw):
    dls = DataLoaders.from_dsets(Items(n_train, seed=0, **kw), Items(n_valid, seed=1, **kw), bs=bs, device=device,
                                 num_workers=0)
    dls.has_masks = True
    return dls


def biased_encoder(u_pos=3., u_neg=-2., seed=0, **kw):
    torch.manual_seed(seed)
    enc = create_vit(ARCH, img_size=32, num_classes=0, depth=DEPTH, **kw)
    with torch.no_grad():
        for blk in enc.blocks:
            if isinstance(blk.attn.u_pos, nn.Parameter): blk.attn.u_pos.fill_(u_pos); blk.attn.u_neg.fill_(u_neg)
    return enc


# ---------------------------------------------------------------- features
def test_extract_features_order_pool_and_masks():
    dls = tiny_dls()
    enc = biased_encoder()
    f_m, y = extract_features(enc, dls.train, with_masks=True, progress=False)
    ds = dls.train.dataset
    test = dict(with_m=(ds.m, True), without=(None, False))
    with torch.no_grad():
        for m, wm in test.values():
            ref = enc.forward_features(ds.x, m)
            feats, labels = extract_features(enc, dls.train, with_masks=wm, progress=False)
            torch.testing.assert_close(feats, ref[:, 0], atol=1e-4, rtol=1e-4)  # every item once, in order
            torch.testing.assert_close(labels, ds.y)
            avg, _ = extract_features(enc, dls.train, with_masks=wm, pool="avg", progress=False)
            torch.testing.assert_close(avg, ref[:, 1:].mean(1), atol=1e-4, rtol=1e-4)
    f_nm, _ = extract_features(enc, dls.train, with_masks=False, progress=False)
    assert (f_m - f_nm).abs().max() > 1e-2  # the bias is used only with masks
    assert enc.training  # left as it was
    vanilla = biased_encoder(bias=None)
    a, _ = extract_features(vanilla, dls.train, with_masks=True, progress=False)
    b, _ = extract_features(vanilla, dls.train, with_masks=False, progress=False)
    torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- kNN
@torch.no_grad()
def dino_knn_classifier(train_features, train_labels, test_features, test_labels, k, T, num_classes=1000):
    "DINO's eval_knn.knn_classifier (facebookresearch/dino), transcribed, also returning the vote matrix"
    top1, top5, total = 0.0, 0.0, 0
    train_features = train_features.t()
    num_test_images, num_chunks = test_labels.shape[0], 100
    imgs_per_chunk = num_test_images // num_chunks
    retrieval_one_hot = torch.zeros(k, num_classes).to(train_features.device)
    all_probs = []
    for idx in range(0, num_test_images, imgs_per_chunk):
        features = test_features[idx: min((idx + imgs_per_chunk), num_test_images), :]
        targets = test_labels[idx: min((idx + imgs_per_chunk), num_test_images)]
        batch_size = targets.shape[0]
        similarity = torch.mm(features, train_features)
        distances, indices = similarity.topk(k, largest=True, sorted=True)
        candidates = train_labels.view(1, -1).expand(batch_size, -1)
        retrieved_neighbors = torch.gather(candidates, 1, indices)
        retrieval_one_hot.resize_(batch_size * k, num_classes).zero_()
        retrieval_one_hot.scatter_(1, retrieved_neighbors.view(-1, 1), 1)
        distances_transform = distances.clone().div_(T).exp_()
        probs = torch.sum(torch.mul(retrieval_one_hot.view(batch_size, -1, num_classes),
                                    distances_transform.view(batch_size, -1, 1)), 1)
        _, predictions = probs.sort(1, True)
        correct = predictions.eq(targets.data.view(-1, 1))
        top1 = top1 + correct.narrow(1, 0, 1).sum().item()
        top5 = top5 + correct.narrow(1, 0, min(5, k)).sum().item()
        total += targets.size(0)
        all_probs.append(probs)
    return top1 * 100.0 / total, top5 * 100.0 / total, torch.cat(all_probs)


@pytest.mark.parametrize("k,T", [(20, 0.07), (5, 0.5), (1, 0.07)])
def test_knn_matches_dino(k, T):
    g = torch.Generator().manual_seed(k)
    C = 6  # DINO's top-5 needs at least 5 classes
    centres = torch.randn(C, 8, generator=g)
    tr_y, te_y = torch.arange(60) % C, torch.arange(200) % C
    tr_x = centres[tr_y] + 1.5 * torch.randn(60, 8, generator=g)  # overlapping classes: accuracy well below 100%
    te_x = centres[te_y] + 1.5 * torch.randn(200, 8, generator=g)
    ref_top1, _, ref_probs = dino_knn_classifier(F.normalize(tr_x, dim=1), tr_y, F.normalize(te_x, dim=1), te_y,
                                                 k, T, num_classes=C)
    assert 30 < ref_top1 < 95
    torch.testing.assert_close(knn_scores(tr_x, tr_y, te_x, k=k, T=T, num_classes=C, chunk_size=7), ref_probs,
                               rtol=1e-4, atol=1e-6)
    assert knn_accuracy(tr_x, tr_y, te_x, te_y, k=k, T=T, num_classes=C) == pytest.approx(ref_top1)


def test_knn_separable_scores_100():
    g = torch.Generator().manual_seed(0)
    centres = 10 * torch.eye(5, 32)
    tr_y, te_y = torch.arange(100) % 5, torch.arange(50) % 5
    tr_x = centres[tr_y] + torch.randn(100, 32, generator=g)
    te_x = 3 * (centres[te_y] + torch.randn(50, 32, generator=g))  # cosine: the scale does not matter
    assert knn_accuracy(tr_x, tr_y, te_x, te_y) == 100.
    assert knn_accuracy(tr_x, tr_y, te_x, (te_y + 1) % 5) == 0.


# ---------------------------------------------------------------- optimiser and schedule
class MaeLARS(torch.optim.Optimizer):
    "MAE's util/lars.py, transcribed"
    def __init__(self, params, lr=0, weight_decay=0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g['params']:
                dp = p.grad
                if dp is None: continue
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g['weight_decay'])
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0., torch.where(update_norm > 0,
                                    (g['trust_coefficient'] * param_norm / update_norm), one), one)
                    dp = dp.mul(q)
                param_state = self.state[p]
                if 'mu' not in param_state: param_state['mu'] = torch.zeros_like(p)
                mu = param_state['mu']
                mu.mul_(g['momentum']).add_(dp)
                p.add_(mu, alpha=-g['lr'])


def test_lars_matches_mae():
    torch.manual_seed(0)
    ours, ref = nn.Linear(6, 3), nn.Linear(6, 3)
    ref.load_state_dict(ours.state_dict())
    o1 = LARS(list(ours.parameters()), lr=0.5, wd=0.1, trust_coeff=0.01)
    o2 = MaeLARS(ref.parameters(), lr=0.5, weight_decay=0.1, trust_coefficient=0.01)
    for _ in range(3):
        x = torch.randn(5, 6)
        for m, o in ((ours, o1), (ref, o2)):
            m.zero_grad(); m(x).pow(2).sum().backward(); o.step()
    torch.testing.assert_close(ours.weight, ref.weight); torch.testing.assert_close(ours.bias, ref.bias)


def mae_adjust_lr(epoch, lr, min_lr, warmup_epochs, epochs):
    "MAE's util/lr_sched.adjust_learning_rate, transcribed"
    if epoch < warmup_epochs: return lr * epoch / warmup_epochs
    return min_lr + (lr - min_lr) * 0.5 * (1. + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def test_warmup_cosine_matches_mae():
    for e in np.linspace(0, 9.9, 34):
        assert warmup_cosine(e / 10, 2., 0.2, 1e-3) == pytest.approx(mae_adjust_lr(e, 2., 1e-3, 2, 10))


# ---------------------------------------------------------------- linear probe
def test_linear_probe_frozen_backbone():
    dls = tiny_dls()
    enc = biased_encoder()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    modes = []
    enc.patch_embed.register_forward_hook(lambda mod, inp, out: modes.append((mod.training, torch.is_grad_enabled())))
    torch.manual_seed(1)
    learn = linear_probe(enc, dls, epochs=3, progress=False)
    torch.manual_seed(1)
    init = linear_head(192, 3)  # the head `linear_probe` started from
    head = learn.classifier.head
    assert [type(l) for l in head] == [nn.BatchNorm1d, nn.Linear]
    assert head[0].affine is False and head[0].eps == 1e-6 and head[0].weight is None
    assert all(torch.equal(v, enc.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None and not p.requires_grad for p in enc.parameters())
    assert modes and all(not training and not grad for training, grad in modes)  # eval mode, no autograd
    assert not torch.allclose(head[1].weight, init[1].weight) and head[0].num_batches_tracked == 9  # trained
    assert 0 <= top1(learn) <= 100


def test_linear_probe_precompute_is_the_same_model():
    dls = tiny_dls()
    enc = biased_encoder()
    learn = linear_probe(enc, dls, epochs=3, precompute=True, progress=False)
    assert learn.model is learn.classifier.head
    feats = learn.dls.train.dataset.tensors[0]
    torch.testing.assert_close(feats, extract_features(enc, dls.train, progress=False)[0])
    # the head trained on cached features, put back on the encoder, scores the same on the images
    full = Learner(dls, learn.classifier, loss_func=learn.loss_func, metrics=accuracy)
    assert top1(full) == pytest.approx(top1(learn))
    no_masks = linear_probe(enc, dls, epochs=1, precompute=True, with_masks=False, progress=False)
    assert not torch.allclose(no_masks.dls.train.dataset.tensors[0], feats)


def test_linear_probe_lr_and_schedule():
    dls = tiny_dls(bs=8)
    learn = linear_probe(biased_encoder(), dls, epochs=4, warmup_pct=0.25, progress=False)
    lrs = learn.recorder.lrs
    peak = 0.1 * 8 / 256  # MAE: lr = blr * bs / 256
    n = len(lrs)
    assert n == 4 * 3
    for i, lr in enumerate(lrs):
        assert lr == pytest.approx(mae_adjust_lr(4 * i / n, peak, 0., 1, 4))


# ---------------------------------------------------------------- fine-tuning
def test_finetune_layer_decay_groups():
    enc = biased_encoder()
    clf = Classifier(enc, nn.Linear(192, 3))
    groups = lrd_param_groups(clf, weight_decay=0.05, layer_decay=0.5)
    of = {id(p): g for g in groups for p in g["params"]}
    depth = len(enc.blocks)
    assert of[id(enc.patch_embed.proj.weight)]["lr_scale"] == 0.5 ** (depth + 1)
    assert of[id(enc.cls_token)]["lr_scale"] == 0.5 ** (depth + 1) and of[id(enc.cls_token)]["weight_decay"] == 0
    for i, blk in enumerate(enc.blocks):
        assert of[id(blk.attn.qkv.weight)]["lr_scale"] == 0.5 ** (depth - i)
        assert of[id(blk.attn.qkv.weight)]["weight_decay"] == 0.05
        assert of[id(blk.attn.u_pos)] is of[id(blk.norm1.weight)]  # u: its layer's lr, no weight decay
        assert of[id(blk.attn.u_neg)]["weight_decay"] == 0.
    assert of[id(enc.norm.weight)]["lr_scale"] == 1 and of[id(clf.head.weight)]["lr_scale"] == 1
    assert of[id(clf.head.weight)]["weight_decay"] == 0.05 and of[id(clf.head.bias)]["weight_decay"] == 0
    assert sum(len(g["params"]) for g in groups) == len(list(clf.parameters()))


def test_finetune_learner_rates_masks_and_regularisation():
    dls = tiny_dls()
    enc = biased_encoder(u_pos=0.5, u_neg=-0.5)
    u0 = enc.bias_values()
    learn = fine_tune(enc, dls, epochs=2, layer_decay=0.75, drop_path=0.2, progress=False)
    groups = learn.param_groups
    lrs = np.array([h["lr"] for h in learn.opt.hypers])
    head_lr = lrs[-1]
    assert head_lr > 0
    for g, lr in zip(groups, lrs):  # the lr each group got at the last step is the head's times 0.75^(L+1-layer)
        assert lr == pytest.approx(head_lr * 0.75 ** (len(enc.blocks) + 1 - g["layer"]))
    assert [h["wd"] for h in learn.opt.hypers] == [g["weight_decay"] for g in groups]
    assert learn.loss_func.func.label_smoothing == 0.1
    rates = [blk.drop_path1.drop_prob if hasattr(blk.drop_path1, "drop_prob") else 0. for blk in enc.blocks]
    np.testing.assert_allclose(rates, np.linspace(0, 0.2, DEPTH), atol=1e-6)
    assert not torch.equal(enc.bias_values()["u_pos"], u0["u_pos"])  # masks given: the bias keeps training
    enc2 = biased_encoder(u_pos=0.5, u_neg=-0.5)
    fine_tune(enc2, dls, epochs=1, with_masks=False, progress=False)
    assert torch.equal(enc2.bias_values()["u_pos"], u0["u_pos"])  # no masks: the bias is never used


def test_too_few_items_for_a_batch():
    with pytest.raises(ValueError, match="fewer items than bs=32"):
        linear_probe(biased_encoder(), tiny_dls(bs=32), epochs=1, progress=False)


@pytest.mark.gpu
def test_protocols_on_gpu(tmp_path):
    dls = tiny_dls(device="cuda")
    enc = biased_encoder()
    torch.save(enc.state_dict(), tmp_path/"encoder.pth")
    (tmp_path/"config.json").write_text(json.dumps(dict(method="mae", epochs=1,
                                                        model=dict(name=ARCH, img_size=32, depth=DEPTH))))
    for proto, kw in (("knn", {}), ("linear", dict(precompute=True)), ("linear", {}), ("finetune", {})):
        row = evaluate_run(tmp_path, dls, proto, epochs=1, progress=False, **kw)
        assert 0 <= row["value"] <= 100 and row["with_masks"] is True
    assert len(read_results(tmp_path)) == 4


# ---------------------------------------------------------------- report
def make_run(root, name, bias, epochs, rows, method="mae", u=None, **extra):
    "A run folder by hand: config.json, a tiny encoder.pth (with `u` (L, H) values if given), results.csv rows"
    d = root/name
    d.mkdir()
    enc = create_vit(ARCH, img_size=32, num_classes=0, depth=DEPTH, bias=bias)
    if u is not None:
        with torch.no_grad():
            for i, blk in enumerate(enc.blocks): blk.attn.u_pos.copy_(u[i]); blk.attn.u_neg.copy_(-u[i] / 2)
    torch.save(enc.state_dict(), d/"encoder.pth")
    (d/"config.json").write_text(json.dumps(dict(method=method, epochs=epochs, data="x", masks="y",
                                                 model=dict(name=ARCH, img_size=32, depth=DEPTH, bias=bias), **extra)))
    for proto, frac, wm, v in rows:
        append_result(d, dict(protocol=proto, fraction=frac, with_masks=wm, metric="top1", value=v, epochs=epochs,
                              arch=ARCH, method=method, timestamp="t"))
    return d


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("runs")
    u = torch.arange(3 * DEPTH, dtype=torch.float32).reshape(DEPTH, 3) / 10
    return dict(
        u=u,
        base=make_run(tmp_path, "base", None, 1600, [("linear", 1, False, 70.0), ("linear", 1, False, 73.3),
                                                     ("finetune", 0.01, False, 64.8), ("finetune", 0.1, False, 78.5),
                                                     ("finetune", 1, False, 88.1)]),
        ours=make_run(tmp_path, "ours", "learnable", 1600, [("linear", 1, True, 77.1), ("finetune", 0.01, True, 65.0),
                                                            ("finetune", 0.1, True, 79.0), ("finetune", 1, True, 88.6),
                                                            ("linear", 1, False, 76.0)], u=u),
        dino=make_run(tmp_path, "dino", "learnable", 300, [("linear", 1, True, 81.7)], method="dino"),
        dist=make_run(tmp_path, "dist", None, 100, [("linear", 1, False, 77.2)], method="mae_distill",
                      teacher="../ours"),  # 100 distillation epochs of the 1600-epoch teacher
        other=make_run(tmp_path, "other", None, 3200, [("linear", 1, False, 76.9)]),
    )


def test_table1_layout_and_differences(runs, tmp_path):
    cols, rows = table1(load_runs([runs[k] for k in ("ours", "dist", "base", "dino", "other")]))
    assert cols == ["Method", "Arch", "Epochs", "Linear", "1%", "10%", "100%"]
    md = to_markdown(cols, rows).splitlines()
    assert md[2:] == [
        "| DINO + our method | ViT-Ti/16 | 300 | 81.7 | - | - | - |",  # no DINO baseline: no difference
        "| MAE | ViT-Ti/16 | 1600 | 73.3 | 64.8 | 78.5 | 88.1 |",  # the latest linear row counts
        "| MAE + our method | ViT-Ti/16 | 1600 | 77.1 (+3.8) | 65.0 (+0.2) | 79.0 (+0.5) | 88.6 (+0.5) |",
        "| MAE + our method (no masks) | ViT-Ti/16 | 1600 | 76.0 (+2.7) | - | - | - |",
        "| MAE + our method (distilled) | ViT-Ti/16 | 1600 | 77.2 (+3.9) | - | - | - |",
        "| MAE | ViT-Ti/16 | 3200 | 76.9 | - | - | - |",  # other epochs: its own baseline
    ]


def test_table2_only_with_ablation_rows(runs):
    cols, rows = table2(load_runs([runs["base"], runs["ours"], runs["dist"], runs["dino"]]))
    assert cols == ["SSL method", "Arch", "Epochs", "Mask-guided attention bias", "Post-processing", "Linear"]
    assert to_markdown(cols, rows).splitlines()[2:] == [
        "| MAE | ViT-Ti/16 | 1600 | - | - | 73.3 |",
        "| MAE + our method (1st phase) | ViT-Ti/16 | 1600 | ✓ | - | 77.1 (+3.8) |",
        "| MAE + our method (1st phase, no masks) | ViT-Ti/16 | 1600 | - | - | 76.0 (+2.7) |",
        "| MAE + our method (2nd phase) | ViT-Ti/16 | 1600 | - | ✓ | 77.2 (+3.9) |",
    ]  # the DINO run has neither no-mask rows nor a distilled student: no ablation block
    assert table2(load_runs([runs["base"], runs["dino"]]))[1] == []


def test_report_files_and_fig4(runs, tmp_path):
    written = report([runs["base"], runs["ours"], runs["dist"]], tmp_path/"rep")
    assert sorted(written) == ["fig4.png", "table1.csv", "table1.md", "table2.csv", "table2.md"]
    with open(written["table1.csv"], newline="") as fh: rows = list(csv.DictReader(fh))
    ours = next(r for r in rows if r["Method"] == "MAE + our method")
    assert float(ours["Linear"]) == 77.1 and float(ours["Linear diff"]) == pytest.approx(3.8)
    assert float(ours["10%"]) == 79.0 and float(ours["10% diff"]) == pytest.approx(0.5)
    assert next(r for r in rows if r["Method"] == "MAE")["Linear diff"] == ""
    assert written["fig4.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stats = bias_stats(create_vit(ARCH, img_size=32, num_classes=0, depth=DEPTH,
                                  checkpoint_path=runs["ours"]/"encoder.pth"))
    u = runs["u"].double().numpy()
    np.testing.assert_allclose(stats["u_pos_mean"], u.mean(1), rtol=1e-6)
    np.testing.assert_allclose(stats["u_pos_std"], u.std(1), rtol=1e-6)  # across heads: 0.0816 per layer here
    np.testing.assert_allclose(stats["u_neg_mean"], -u.mean(1) / 2, rtol=1e-6)
    only_baseline = report([runs["base"]], tmp_path/"rep2")
    assert sorted(only_baseline) == ["table1.csv", "table1.md"]  # no biased run, no Table 2: no figure either


def test_read_results_types(tmp_path):
    append_result(tmp_path, dict(protocol="knn", fraction=1.0, with_masks=False, metric="top1", value=12.5))
    append_result(tmp_path, dict(protocol="finetune", fraction=0.1, with_masks=True, metric="top1", value=50))
    rows = read_results(tmp_path)
    assert [(r["protocol"], r["fraction"], r["with_masks"], r["value"]) for r in rows] == [
        ("knn", 1.0, False, 12.5), ("finetune", 0.1, True, 50.0)]
    header = (tmp_path/"results.csv").read_text().splitlines()[0]
    assert header == "protocol,fraction,with_masks,metric,value,epochs,arch,method,timestamp"


def test_arch_label_uses_the_runs_patch_size():
    from mgab.evaluate import _arch_name, arch_label
    assert arch_label(_arch_name(dict(name="vit_tiny_patch16_224", patch_size=8))) == "ViT-Ti/8"
    assert arch_label(_arch_name(dict(name="vit_base_patch16_224"))) == "ViT-B/16"

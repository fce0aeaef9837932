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
from scipy.stats import norm, t as t_dist

from mgab.evaluate import (LARS, Classifier, LastBlocks, dino_pool, encoder_features, extract_features, knn_accuracy,
                           knn_scores, linear_head, linear_probe, top1)
from mgab.figures import bias_stats, plot_attention, plot_bias_stats
from mgab.report import Cell, design_notes, load_runs, recipe_notes, report, table1, table2, to_markdown
from mgab.runs import RESULT_COLUMNS, RunFolder
from mgab.results import (compare_outcomes, evaluate_run, items_digest, load_predictions, paired_outcomes,
                          save_predictions, valid_predictions)
from mgab.finetune import (MAE_FINETUNE, UNALIGNED, MixupErase, MixedTargetLoss, fine_tune, finetune_augs,
                           lrd_param_groups, mae_train_dls)
from mgab.vit import create_vit

ARCH, DEPTH = "vit_tiny_patch16_224", 4  # a 4-block ViT-Ti at 32 px (2x2 patches) keeps every test quick


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
    "The one schedule (mgab.train.cosine_schedule) is MAE's per iteration: 10 epochs of 7 steps, 2 warmup epochs"
    from mgab.train import cosine_schedule
    lrs = cosine_schedule(2., 1e-3, 70, 14)
    for i in range(70): assert lrs[i] == pytest.approx(mae_adjust_lr(i / 7, 2., 1e-3, 2, 10))
    short = cosine_schedule(2., 1e-3, 14, 28)  # 2 epochs of a 4-epoch warmup: half the peak at the end, as MAE
    for i in range(14): assert short[i] == pytest.approx(mae_adjust_lr(i / 7, 2., 1e-3, 4, 2))


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
    vds = dls.valid.dataset
    with torch.no_grad(): pred = learn.classifier.eval()(vds.x, vds.m).argmax(1)  # the probe on the items, by hand
    assert top1(learn) == pytest.approx(100 * (pred == vds.y).float().mean().item())


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
    n = 2 * len(dls.train)  # steps; the last one set the rates read here
    peak, f = MAE_FINETUNE["blr"] * 8 / 256, MAE_FINETUNE["warmup_epochs"] / MAE_FINETUNE["epochs"]
    assert head_lr == pytest.approx(mae_adjust_lr(2 * (n - 1) / n, peak, MAE_FINETUNE["min_lr"], 2 * f, 2))
    for g, lr in zip(groups, lrs):  # the lr each group got at the last step is the head's times 0.75^(L+1-layer)
        assert lr == pytest.approx(head_lr * 0.75 ** (len(enc.blocks) + 1 - g["layer"]))
    assert [h["wd"] for h in learn.opt.hypers] == [g["weight_decay"] for g in groups]
    assert learn.loss_func.hard.smoothing == 0.1 and learn.augs == UNALIGNED  # with masks: no pixel-moving augs
    assert not any(isinstance(cb, MixupErase) for cb in learn.cbs)
    rates = [blk.drop_path1.drop_prob if hasattr(blk.drop_path1, "drop_prob") else 0. for blk in enc.blocks]
    np.testing.assert_allclose(rates, np.linspace(0, 0.2, DEPTH), atol=1e-6)
    assert not torch.equal(enc.bias_values()["u_pos"], u0["u_pos"])  # masks given: the bias keeps training
    enc2 = biased_encoder(u_pos=0.5, u_neg=-0.5)
    fine_tune(enc2, dls, epochs=1, with_masks=False, aa="none", progress=False)  # in-memory items: no RandAugment
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
    def outcomes(row):  # the saved per-image outcomes of a row: its value is the share right
        p = load_predictions(tmp_path/row["predictions"])
        np.testing.assert_array_equal(p["label"], dls.valid.dataset.y.numpy())
        assert row["value"] == pytest.approx(100 * p["correct"].mean(), abs=1e-3)
        return p["pred"]
    cpu = evaluate_run(tmp_path, tiny_dls(), "knn", save=False, progress=False)
    for proto, kw in (("knn", {}), ("linear", dict(precompute=True)), ("linear", {}), ("finetune", {})):
        row = evaluate_run(tmp_path, dls, proto, epochs=1, progress=False, **kw)
        assert row["with_masks"] is True and len(outcomes(row)) == 12
        if proto == "knn": assert row["value"] == cpu["value"]  # kNN trains nothing: the CPU's votes
    # MAE's batch augmentations (RandomErasing, Mixup) and DINO's features on the GPU
    row = evaluate_run(tmp_path, dls, "finetune", with_masks=False, epochs=1, aa="none", progress=False)
    assert row["with_masks"] is False and row["recipe"] == "mae"
    row = evaluate_run(tmp_path, dls, "linear", recipe="dino", epochs=1, progress=False)
    assert row["recipe"] == "dino" and len(outcomes(row)) == 12
    assert len(RunFolder(tmp_path).results()) == 6


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
        RunFolder(d).append_result(dict(protocol=proto, fraction=frac, with_masks=wm, metric="top1", value=v, epochs=epochs,
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
        "| MAE | ViT-Ti/16 | 3200 | 76.9 | - | - | - |",  # other epochs: its own baseline
        # its epochs are the teacher's and its own; without a continued baseline it says the compute differs
        "| MAE + our method (distilled) [compute not matched: against 1600 epochs] | ViT-Ti/16 | 1600 + 100 | "
        "77.2 (+3.9) | - | - | - |",
    ]


def test_matched_compute_and_control_rows(runs, tmp_path):
    "A distilled run is compared with its continued vanilla twin (same epochs); the control with the random floor"
    cont = make_run(tmp_path, "cont", None, 100, [("linear", 1, False, 74.0)], method="mae_distill", teacher=str(runs["base"]),
                    lam=0.)
    rand = make_run(tmp_path, "rand", None, 0, [("linear", 1, False, 45.0)], init="random")
    ctrl = make_run(tmp_path, "ctrl", "learnable", 0, [("linear", 1, True, 50.5)], init="random", u_from=str(runs["ours"]))
    loaded = load_runs([runs["base"], runs["ours"], runs["dist"], cont, rand, ctrl])
    assert [r["kind"] for r in loaded] == ["baseline", "biased", "distilled", "continued", "random", "control"]
    cols, rows = table1(loaded)
    assert to_markdown(cols, rows).splitlines()[2:] == [
        "| MAE (random init) | ViT-Ti/16 | 0 | 45.0 | - | - | - |",
        "| MAE (random init) + trained u | ViT-Ti/16 | 0 | 50.5 (+5.5) | - | - | - |",  # what masks + u add
        "| MAE | ViT-Ti/16 | 1600 | 73.3 | 64.8 | 78.5 | 88.1 |",
        "| MAE + our method | ViT-Ti/16 | 1600 | 77.1 (+3.8) | 65.0 (+0.2) | 79.0 (+0.5) | 88.6 (+0.5) |",
        "| MAE + our method (no masks) | ViT-Ti/16 | 1600 | 76.0 (+2.7) | - | - | - |",
        "| MAE (continued, no distillation) | ViT-Ti/16 | 1600 + 100 | 74.0 (+0.7) | - | - | - |",
        "| MAE + our method (distilled) | ViT-Ti/16 | 1600 + 100 | 77.2 (+3.2) | - | - | - |",  # vs continued
    ]
    t2 = to_markdown(*table2(loaded)).splitlines()[2:]
    assert t2[-2:] == ["| MAE (continued) | ViT-Ti/16 | 1600 + 100 | - | λ = 0 | 74.0 (+0.7) |",
                       "| MAE + our method (2nd phase) | ViT-Ti/16 | 1600 + 100 | - | ✓ | 77.2 (+3.2) |"]


def test_table2_only_with_ablation_rows(runs):
    cols, rows = table2(load_runs([runs["base"], runs["ours"], runs["dist"], runs["dino"]]))
    assert cols == ["SSL method", "Arch", "Epochs", "Mask-guided attention bias", "Post-processing", "Linear"]
    assert to_markdown(cols, rows).splitlines()[2:] == [
        "| MAE | ViT-Ti/16 | 1600 | - | - | 73.3 |",
        "| MAE + our method (1st phase) | ViT-Ti/16 | 1600 | ✓ | - | 77.1 (+3.8) |",
        "| MAE + our method (1st phase, no masks) | ViT-Ti/16 | 1600 | - | - | 76.0 (+2.7) |",
        "| MAE + our method (2nd phase) [compute not matched: against 1600 epochs] | ViT-Ti/16 | 1600 + 100 | - | ✓ | "
        "77.2 (+3.9) |",
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
    RunFolder(tmp_path).append_result(dict(protocol="knn", fraction=1.0, with_masks=False, metric="top1", value=12.5))
    RunFolder(tmp_path).append_result(dict(protocol="finetune", fraction=0.1, with_masks=True, metric="top1", value=50))
    rows = RunFolder(tmp_path).results()
    assert [(r["protocol"], r["fraction"], r["with_masks"], r["value"]) for r in rows] == [
        ("knn", 1.0, False, 12.5), ("finetune", 0.1, True, 50.0)]
    header = (tmp_path/"results.csv").read_text().splitlines()[0]
    assert header == ("protocol,fraction,with_masks,metric,value,epochs,arch,method,timestamp,encoder,predictions,recipe,"
                      "pool")
    assert [(r["encoder"], r["predictions"], r["recipe"], r["pool"]) for r in rows] == [("encoder", "", "", "")] * 2


def test_arch_label_uses_the_runs_patch_size():
    from mgab.report import arch_label, arch_name
    assert arch_label(arch_name(dict(name="vit_tiny_patch16_224", patch_size=8))) == "ViT-Ti/8"
    assert arch_label(arch_name(dict(name="vit_base_patch16_224"))) == "ViT-B/16"


# ---------------------------------------------------------------- results files written before `encoder`/`predictions`
OLD_HEADER = "protocol,fraction,with_masks,metric,value,epochs,arch,method,timestamp"


def test_old_results_file_reads_and_is_upgraded(tmp_path):
    (tmp_path/"results.csv").write_text(OLD_HEADER + "\r\nlinear,1.0,True,top1,61.5,100,vit_tiny_patch16_224,mae,t\r\n")
    old = RunFolder(tmp_path).results()
    assert [(r["value"], r["encoder"], r["predictions"], r["recipe"]) for r in old] == [(61.5, "encoder", "", "")]
    RunFolder(tmp_path).append_result(dict(protocol="knn", fraction=1.0, with_masks=False, metric="top1", value=40.,
                                 encoder="student", predictions="predictions/knn-nomasks-1-student.npz", recipe="dino"))
    lines = (tmp_path/"results.csv").read_text().splitlines()
    assert lines[0] == ",".join(RESULT_COLUMNS) and len(lines) == 3
    rows = RunFolder(tmp_path).results()
    assert [(r["protocol"], r["value"], r["encoder"]) for r in rows] == [("linear", 61.5, "encoder"),
                                                                        ("knn", 40., "student")]
    assert rows[1]["predictions"] == "predictions/knn-nomasks-1-student.npz"
    assert [r["recipe"] for r in rows] == ["", "dino"]  # the old row: recipe not recorded


# ---------------------------------------------------------------- per-image outcomes and pairing
def make_eval_run(root, name, enc):
    d = root/name
    d.mkdir()
    torch.save(enc.state_dict(), d/"encoder.pth")
    bias = "learnable" if enc.blocks[0].attn.bias is not None else None
    (d/"config.json").write_text(json.dumps(dict(method="mae", epochs=2, model=dict(name=ARCH, img_size=32,
                                                                                    depth=DEPTH, bias=bias))))
    return d


def test_evaluate_run_saves_paired_outcomes(tmp_path):
    dls = tiny_dls()
    biased, vanilla = make_eval_run(tmp_path, "ours", biased_encoder()), make_eval_run(tmp_path, "base",
                                                                                       biased_encoder(bias=None))
    rows = {}
    for run in (biased, vanilla):
        for proto, kw in (("knn", {}), ("linear", dict(precompute=True, epochs=2))):
            rows[run.name, proto] = evaluate_run(run, dls, proto, progress=False, **kw)
    r = rows["ours", "linear"]
    assert r["predictions"] == RunFolder.predictions_name("linear", True, 1., "encoder", "mae", "cls")
    assert r["predictions"] == "predictions/linear-mae-cls-masks-1-encoder.npz"
    assert rows["base", "knn"]["predictions"] == "predictions/knn-dino-cls-nomasks-1-encoder.npz"  # no bias: no masks
    p = load_predictions(biased/r["predictions"])
    assert p["pred"].shape == (12,) and p["pred"].dtype == np.int64
    np.testing.assert_array_equal(p["label"], dls.valid.dataset.y.numpy())
    assert 100 * p["correct"].mean() == pytest.approx(r["value"], abs=1e-3)
    assert (p["protocol"], p["fraction"], p["which"]) == ("linear", 1.0, "encoder") and p["with_masks"] is True
    assert RunFolder(biased).results()[-1]["predictions"] == r["predictions"]
    assert not list(biased.glob("predictions/.*tmp"))  # written through a temporary file, which is gone
    knn = [load_predictions(d/rows[d.name, "knn"]["predictions"]) for d in (biased, vanilla)]
    a, b = paired_outcomes(knn[:1], knn[1:])
    assert a.shape == b.shape == (1, 12)
    # evaluated on other validation images: the digests differ and pairing is refused
    other = make_eval_run(tmp_path, "other", biased_encoder(bias=None))
    row = evaluate_run(other, tiny_dls(n_valid=15), "knn", progress=False)
    with pytest.raises(ValueError, match="different validation images"):
        paired_outcomes(knn[:1], [load_predictions(other/row["predictions"])])
    # two poolings of one run keep two files: each row's outcomes are its own
    avg = evaluate_run(biased, dls, "knn", pool="avg", progress=False)
    assert avg["predictions"] == "predictions/knn-dino-avg-masks-1-encoder.npz"
    assert load_predictions(biased/avg["predictions"])["correct"].mean() * 100 == pytest.approx(avg["value"], abs=1e-3)
    assert load_predictions(biased/rows["ours", "knn"]["predictions"])["correct"].mean() * 100 == pytest.approx(
        rows["ours", "knn"]["value"], abs=1e-3)
    assert evaluate_run(other, dls, "knn", save=False, progress=False)["predictions"] == ""
    assert len(RunFolder(other).results()) == 1


def test_valid_predictions_match_top1():
    dls = tiny_dls()
    learn = linear_probe(biased_encoder(), dls, epochs=2, progress=False)
    pred, label = valid_predictions(learn)
    assert pred.shape == label.shape == (12,)
    assert 100 * (pred == label).float().mean().item() == pytest.approx(top1(learn))


def test_evaluate_run_which_student(tmp_path):
    dls = tiny_dls()
    run = make_eval_run(tmp_path, "dino", biased_encoder())
    with pytest.raises(FileNotFoundError, match="student.pth"):  # forwarded to RunFolder.load_encoder
        evaluate_run(run, dls, "knn", which="student", progress=False)
    torch.save(biased_encoder(u_pos=0., u_neg=0., seed=3).state_dict(), run/"student.pth")
    row = evaluate_run(run, dls, "knn", which="student", progress=False)
    assert row["encoder"] == "student" and row["predictions"] == "predictions/knn-dino-cls-masks-1-student.npz"
    evaluate_run(run, dls, "knn", progress=False)
    with pytest.raises(ValueError, match="`which` must be one of"):
        evaluate_run(run, dls, "knn", which="teacher", progress=False)
    assert [r["encoder"] for r in RunFolder(run).results()] == ["student", "encoder"]
    labels = [r["Method"] for r in table1(load_runs([run]))[1]]
    assert labels == ["MAE + our method", "MAE + our method (student)"]


def test_items_digest_names_files_relative_to_root(tmp_path):
    class Files:
        def __init__(self, root, names): self.root, self.files = root, [root/n for n in names]
        def __len__(self): return len(self.files)
    names = ["val/a/0.png", "val/b/1.png"]
    assert items_digest(Files(tmp_path/"x", names)) == items_digest(Files(tmp_path/"copy", names))
    assert items_digest(Files(tmp_path/"x", names)) != items_digest(Files(tmp_path/"x", names[::-1]))
    assert items_digest(Files(tmp_path/"x", names)) != items_digest(Files(tmp_path/"x", names[:1]))


# ---------------------------------------------------------------- seeds, random init, distillation gaps
def make_seed_run(root, name, seed, correct, bias=None, epochs=100, labels=None, **extra):
    "A run folder of one seed with a linear result and its per-image outcomes written by hand"
    d = root/name
    d.mkdir()
    labels = np.arange(len(correct)) % 4 if labels is None else labels
    torch.save(create_vit(ARCH, img_size=32, num_classes=0, depth=DEPTH, bias=bias).state_dict(), d/"encoder.pth")
    (d/"config.json").write_text(json.dumps(dict(method="mae", epochs=epochs, seed=seed, out=str(d), data="x",
                                                 model=dict(name=ARCH, img_size=32, depth=DEPTH, bias=bias), **extra)))
    name_ = RunFolder.predictions_name("linear", bias is not None, 1., "encoder")
    save_predictions(d/name_, np.where(correct, labels, (labels + 1) % 4), labels, "digest-of-val", protocol="linear")
    RunFolder(d).append_result(dict(protocol="linear", fraction=1., with_masks=bias is not None, metric="top1",
                          value=100 * np.mean(correct), predictions=name_))
    return d


def test_seeds_aggregate_into_one_row_paired_by_seed(tmp_path):
    rng = np.random.default_rng(0)
    N = 400
    base = np.stack([rng.random(N) < p for p in (0.60, 0.75)])  # seeds 0 and 1, far apart
    ours = base.copy()
    for s, k in enumerate((14, 10)):  # seed s of our variant: k more images right than seed s of the baseline
        ours[s, np.flatnonzero(~base[s])[:k]] = True
    outs = dict(base=base, ours=ours, lr=(rng.random((1, N)) < 0.5))
    dirs = [make_seed_run(tmp_path, f"base{s}", s, base[s]) for s in range(2)]
    # folders named against their seeds: the report pairs by seed value, not by folder order
    dirs += [make_seed_run(tmp_path, f"ours{s}", 1 - s, ours[1 - s], bias="learnable") for s in range(2)]
    dirs.append(make_seed_run(tmp_path, "ours_lr", 0, outs["lr"][0], bias="learnable", bias_lr_mult=10))
    cols, rows = table1(load_runs(dirs))
    assert [r["Method"] for r in rows] == ["MAE", "MAE + our method", "MAE + our method"]  # other config: own row
    acc = {k: 100 * v.mean(1) for k, v in outs.items()}
    b, o, lr = (r["Linear"] for r in rows)
    assert b == Cell(pytest.approx(acc["base"].mean()), std=pytest.approx(acc["base"].std(ddof=1)), n=2)
    assert o.n == 2 and o.value == pytest.approx(acc["ours"].mean()) and o.std == pytest.approx(acc["ours"].std(ddof=1))
    assert o.delta == pytest.approx(3., abs=1e-3)  # +3.5 and +2.5 points
    # paired by seed: a t over the 2 seeds' differences (1 df) and the images they share, recomputed here
    D = ours * 1. - base
    d, m = D.mean(1), D.mean(0)
    msr = ((D - d[:, None] - m + D.mean()) ** 2).sum() / (N - 1)
    t, z = t_dist.ppf(0.975, 1), norm.ppf(0.975)  # 12.71 and 1.96
    margin = 100 * np.sqrt(t ** 2 * d.var(ddof=1) / 2 + z ** 2 * max(m.var(ddof=1) / N - msr / (2 * N), 0.))
    assert o.margin == pytest.approx(margin) and (o.lo, o.hi) == pytest.approx((100 * d.mean() - margin,
                                                                                100 * d.mean() + margin))
    assert (o.paired, o.seed_noise_measured, o.n_images, o.n_base) == (True, True, N, 2)
    assert (o.lo, o.hi, o.mde) == pytest.approx(compare_outcomes(ours, base)[1:3] + (compare_outcomes(ours, base).mde,))
    wrong = compare_outcomes(ours, base[::-1])  # seed 0 against seed 1: the seeds' spread swamps the +3
    assert wrong.margin > 3 * o.margin
    # one seed (seed 0) against the baseline's two: not the same seeds, so unpaired, and its seed noise unmeasured
    assert lr.n == 1 and lr.std is None and (lr.paired, lr.seed_noise_measured, lr.n_base) == (False, False, 2)
    assert (lr.lo, lr.hi) == pytest.approx(compare_outcomes(outs["lr"], base, paired=False)[1:3])
    md = to_markdown(cols, rows).splitlines()
    assert md[3].startswith(f"| MAE + our method | ViT-Ti/16 | 100 | {o.value:.1f} ± {o.std:.1f} "
                            f"(+3.0 [{o.lo:+.1f}, {o.hi:+.1f}], within noise) |")  # two seeds say little
    assert md[4].endswith(f"({lr.delta:+.1f} [{lr.lo:+.1f}, {lr.hi:+.1f}], unpaired; one seed: seed noise not "
                          "measured) | - | - | - |") and lr.hi < 0  # clearly worse
    assert rows[1]["run"] == f"{dirs[2]}; {dirs[3]}"
    assert design_notes(cols, rows).splitlines()[2] == (
        f"- Linear: 1 vs 2 unpaired seeds x {N} validation images (seed noise not measured). MDE {o.mde:.1f}-"
        f"{lr.mde:.1f} points across its 2 rows (80% power, α = 0.05; each row's in the CSV); deltas beyond "
        f"±{lr.margin:.1f} are called outside noise in the row with the largest (MAE + our method).") and lr.mde > o.mde
    report(dirs, tmp_path/"rep")
    table = (tmp_path/"rep"/"table1.md").read_text()
    assert table.index(design_notes(cols, rows)) < table.index("Recipes:")  # the design, then the recipes
    with open(tmp_path/"rep"/"table1.csv", newline="") as fh: csv_rows = list(csv.DictReader(fh))
    r = csv_rows[1]
    assert (float(r["Linear"]), float(r["Linear std"]), int(r["Linear n"])) == pytest.approx(
        (o.value, o.std, 2), abs=1e-4)
    assert [float(r[f"Linear {k}"]) for k in ("diff", "lo", "hi", "mde", "margin")] == pytest.approx(
        [o.delta, o.lo, o.hi, o.mde, o.margin], abs=1e-4)
    assert (r["Linear paired"], r["Linear seed noise measured"], r["Linear images"]) == ("True", "True", str(N))
    assert csv_rows[2]["Linear paired"] == "False" and csv_rows[2]["Linear seed noise measured"] == "False"
    assert csv_rows[0]["Linear lo"] == "" and csv_rows[0]["Linear diff"] == "" and csv_rows[0]["Linear mde"] == ""


def test_unpaired_outcomes_give_no_interval(tmp_path):
    rng = np.random.default_rng(0)
    a, b = rng.random(100) < 0.5, rng.random(100) < 0.6
    base, ours = make_seed_run(tmp_path, "base", 0, a), make_seed_run(tmp_path, "ours", 0, b, bias="learnable")
    f = ours/RunFolder.predictions_name("linear", True)
    p = load_predictions(f)
    save_predictions(f, p["pred"], p["label"], "another-val-set")
    with pytest.warns(UserWarning, match="different validation images"):
        cell = table1(load_runs([base, ours]))[1][1]["Linear"]
    assert cell.delta == pytest.approx(100 * (b.mean() - a.mean()))  # the difference,
    assert (cell.lo, cell.hi) == (None, None)  # but no pretended interval


def test_random_init_row_first_and_not_in_fig4(runs, tmp_path):
    rand = make_run(tmp_path, "rand", "learnable", 0, [("linear", 1, True, 12.5)], init="random")
    cols, rows = table1(load_runs([runs["ours"], rand, runs["base"]]))
    md = to_markdown(cols, rows).splitlines()
    assert md[2] == "| MAE (random init) | ViT-Ti/16 | 0 | 12.5 | - | - | - |"  # first, no difference
    assert md[3].startswith("| MAE | ViT-Ti/16 | 1600 | 73.3 |")
    assert md[4].startswith("| MAE + our method | ViT-Ti/16 | 1600 | 77.1 (+3.8) |")  # still against vanilla
    written = report([rand, runs["base"], runs["ours"]], tmp_path/"rep")
    assert "fig4.png" in written
    written = report([rand, runs["base"]], tmp_path/"rep2")
    assert "fig4.png" not in written  # the random encoder is no trained bias


def test_fig4_gap_panel(runs):
    import matplotlib.pyplot as plt
    u = runs["u"].double().numpy()  # u_neg = -u / 2: the gap is 1.5 u
    stats = {"ours": bias_stats(create_vit(ARCH, img_size=32, num_classes=0, depth=DEPTH,
                                           checkpoint_path=runs["ours"]/"encoder.pth")),
             "flat": {k: np.zeros(DEPTH) for k in ("u_pos_mean", "u_pos_std", "u_neg_mean", "u_neg_std", "gap_mean",
                                                    "gap_std")}}
    np.testing.assert_allclose(stats["ours"]["gap_mean"], 1.5 * u.mean(1), rtol=1e-6)
    np.testing.assert_allclose(stats["ours"]["gap_std"], 1.5 * u.std(1), rtol=1e-6)
    fig = plot_bias_stats(stats)
    assert len(fig.axes) == 3
    ax = fig.axes[2]
    lines = {l.get_label(): l for l in ax.lines}
    np.testing.assert_allclose(lines["ours"].get_ydata(), 1.5 * u.mean(1), rtol=1e-6)
    np.testing.assert_array_equal(lines["ours"].get_xdata(), np.arange(1, DEPTH + 1))
    np.testing.assert_array_equal(lines["flat"].get_ydata(), np.zeros(DEPTH))
    assert lines["ours"].get_color() != lines["flat"].get_color()
    assert list(lines["_zero"].get_ydata()) == [0, 0]  # the zero line
    band = ax.collections[0].get_paths()[0].vertices[:, 1]  # the +-std band of the first variant
    assert band.max() == pytest.approx((1.5 * (u.mean(1) + u.std(1))).max())
    assert len(fig.axes[0].lines) == 2 * 2 + 1 and len(fig.axes[1].lines) == 2 * 2  # a) and b) as before
    plt.close(fig)


def test_distill_gaps(runs, tmp_path):
    dist = make_run(tmp_path, "dist", None, 10, [("linear", 1, False, 75.0)], method="mae_distill",
                    teacher=str(runs["ours"]))
    (dist/"distill.json").write_text(json.dumps(dict(attn_gap_before=0.8, attn_gap_after=0.2, loss="kd", lam=0.5,
                                                     student_init="teacher")))
    written = report([runs["base"], runs["ours"], dist], tmp_path/"rep")
    assert {"distill.md", "distill.csv"} <= set(written)
    md = written["distill.md"].read_text().splitlines()
    assert md[0] == "| Run | Loss | λ | Student init | Attn gap before | Attn gap after | After / before |"
    assert md[2] == "| dist | kd | 0.5 | teacher | 0.8 | 0.2 | 0.25 |" and len(md) == 3
    with open(written["distill.csv"], newline="") as fh: rows = list(csv.DictReader(fh))
    assert float(rows[0]["ratio"]) == pytest.approx(0.25) and rows[0]["run"] == str(dist)
    assert "distill.md" not in report([runs["base"], runs["ours"]], tmp_path/"rep2")


# ---------------------------------------------------------------- attention figure
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    "A tiny ImageFolder (2 classes, 2 images each per split) of colour blocks, with a superpixel mask store"
    from PIL import Image
    from mgab.masks import SuperpixelMasker
    from mgab.store import make_mask_store
    root, rng = tmp_path_factory.mktemp("folder"), np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            for i in range(2):
                blocks = rng.integers(0, 256, (2, 3, 3)).astype(np.uint8)  # 2x3 colour blocks of 20 px
                img = np.kron(blocks, np.ones((20, 20, 1), np.uint8))
                (root/split/c).mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(root/split/c/f"{i}.png")
    store = make_mask_store(root, tmp_path_factory.mktemp("store")/"masks", SuperpixelMasker("slic", c=5),
                            progress=False)
    return root, store


def attention_run(root, name, u_pos, u_neg):
    enc = create_vit(ARCH, img_size=32, patch_size=8, num_classes=0, depth=DEPTH)
    with torch.no_grad():
        for blk in enc.blocks: blk.attn.u_pos.fill_(u_pos); blk.attn.u_neg.fill_(u_neg)
    d = root/name
    d.mkdir()
    torch.save(enc.state_dict(), d/"encoder.pth")
    (d/"config.json").write_text(json.dumps(dict(method="mae", epochs=1, model=dict(
        name=ARCH, img_size=32, patch_size=8, depth=DEPTH, bias="learnable"))))
    return d


def _maps(fig):
    return {ax.get_label(): ax.images[-1].get_array() for ax in fig.axes if ax.get_label().startswith("attention")}


def test_plot_attention_on_off(folder, tmp_path):
    import matplotlib.pyplot as plt
    data, store = folder
    fig = plot_attention(attention_run(tmp_path, "biased", 3., -2.), data, store, n_images=3)
    labelled = [ax.get_label() for ax in fig.axes if ax.get_label().startswith(("image", "attention"))]
    assert len(labelled) == 3 * (1 + 2 * 2)  # per image: the image, then on/off in 2 layers
    assert len(fig.axes) == len(labelled) + 3 * 2  # one colour bar per on/off pair
    maps = _maps(fig)
    assert sorted({k.split()[3] for k in maps}) == ["1", "3"]  # layer index 1 and the last of 4
    for k in range(3):
        for l in (1, 3):
            on, off = maps[f"attention {k} layer {l} on"], maps[f"attention {k} layer {l} off"]
            assert on.shape == off.shape == (4, 4)  # 32 px / 8 px patches, CLS excluded
            assert np.all(on >= 0) and on.sum() <= 1 + 1e-5  # one row of a softmax, less the CLS share
            assert np.abs(on - off).max() > 1e-3  # u != 0: the bias changes the attention
    ims = [ax for ax in fig.axes if ax.get_label() == "attention 0 layer 1 on"][0].images[-1]
    twin = [ax for ax in fig.axes if ax.get_label() == "attention 0 layer 1 off"][0].images[-1]
    assert ims.get_clim() == twin.get_clim()  # one colour scale for the pair
    assert [ax for ax in fig.axes if ax.get_label() == "image 0"][0].collections  # the masks outlined
    plt.close(fig)
    fig = plot_attention(attention_run(tmp_path, "zero", 0., 0.), data, store, n_images=2, layers=[0], query=5)
    maps = _maps(fig)
    assert len(maps) == 2 * 2
    for k in range(2):
        np.testing.assert_allclose(maps[f"attention {k} layer 0 on"], maps[f"attention {k} layer 0 off"], atol=1e-6)
    plt.close(fig)
    written = report([attention_run(tmp_path, "ours", 1., -1.)], tmp_path/"rep", data=data, masks=store)
    assert written["attention.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_replicate_key_ignores_run_time_settings_and_finds_moved_teachers(tmp_path):
    "Seeds of one variant group even when one was run with progress bars or other workers; teachers found beside"
    import json
    from mgab.report import replicate_key
    a = dict(method="mae", seed=0, out="a", progress=True, num_workers=None, lr=1e-3,
             model=dict(name="vit_tiny_patch16_224"))
    b = dict(a, seed=1, out="b", progress=False, num_workers=2)
    assert replicate_key(a, tmp_path) == replicate_key(b, tmp_path)
    assert replicate_key(a, tmp_path) != replicate_key(dict(a, lr=2e-3), tmp_path)
    study = tmp_path / "study"
    for name, seed in (("t0", 0), ("t1", 1)):
        (study / name).mkdir(parents=True)
        (study / name / "config.json").write_text(json.dumps(dict(a, seed=seed, out=f"elsewhere/{name}")))
    # students that recorded their teachers relative to another working directory
    k0, k1 = (replicate_key(dict(method="mae", distill=True, seed=s, out=f"s{s}", teacher=f"elsewhere/t{s}"),
                            study / f"s{s}") for s in (0, 1))
    teacher = dict(method="mae", lr=1e-3, model=dict(name="vit_tiny_patch16_224"))  # a's key: no seed, out, ...
    assert k0 == k1 and json.loads(k0) == dict(method="mae", distill=True, teacher=teacher)


# ---------------------------------------------------------------- the references' recipes (MAE fine-tune, DINO linear)
def _timm_twin(enc, **kw):
    "timm's own VisionTransformer with `enc`'s weights (vanilla attention: `m=None` is the same model)"
    import timm
    t = timm.create_model(ARCH, img_size=32, depth=len(enc.blocks), **kw)
    sd = {k: v for k, v in enc.state_dict().items() if not k.endswith(("u_pos", "u_neg"))}
    if kw.get("fc_norm"): sd = {k: v for k, v in sd.items() if not k.startswith("norm.")}
    t.load_state_dict(sd, strict=False)
    return t.eval()


def test_fc_norm_pool_then_norm_parity_with_timm():
    "MAE's global_pool: mean of the patch tokens, then a fresh fc_norm, as timm's global_pool='avg', fc_norm=True"
    enc = biased_encoder(bias=None)
    twin = _timm_twin(enc, num_classes=3, global_pool="avg", fc_norm=True)
    clf = Classifier(enc, nn.Linear(192, 3), "avg", with_masks=False, fc_norm=True).eval()
    assert isinstance(enc.norm, nn.Identity) and torch.equal(clf.fc_norm.weight, torch.ones(192))  # fresh, as MAE's
    with torch.no_grad():
        clf.fc_norm.weight.normal_(); clf.fc_norm.bias.normal_()  # not the identity: the order of pool and norm shows
        twin.fc_norm.load_state_dict(clf.fc_norm.state_dict()); twin.head.load_state_dict(clf.head.state_dict())
        x = torch.randn(3, 3, 32, 32)
        torch.testing.assert_close(clf(x), twin(x), atol=1e-5, rtol=1e-5)
        norm_then_pool = clf.head(clf.fc_norm(enc.forward_features(x)[:, 1:]).mean(1))  # the old order
        assert (norm_then_pool - twin(x)).abs().max() > 1e-2
    groups = lrd_param_groups(clf)  # fc_norm trains at the head's rate, without weight decay
    top = next(g for g in groups if any(p is clf.fc_norm.weight for p in g["params"]))
    assert (top["lr_scale"], top["weight_decay"]) == (1., 0.)
    with pytest.raises(ValueError, match="pool='avg'"):
        Classifier(biased_encoder(), nn.Linear(192, 3), "cls", fc_norm=True)


def test_dino_last_blocks_features_shape_and_parity_with_timm():
    enc = biased_encoder()
    x, m = torch.randn(2, 3, 32, 32), torch.randint(0, 6, (2, 4))
    last4 = dino_pool(enc)
    assert last4 == LastBlocks(4, False)  # ViT-S and smaller: 4 blocks, no pooled patch tokens
    with torch.no_grad():
        f = encoder_features(enc, x, None, last4)
        assert f.shape == (2, 4 * 192)
        inter = _timm_twin(enc, num_classes=0).forward_intermediates(x, indices=4, norm=True, output_fmt="NLC",
                                                                     return_prefix_tokens=True, intermediates_only=True)
        torch.testing.assert_close(f, torch.cat([prefix[:, 0] for _, prefix in inter], -1), atol=1e-5, rtol=1e-5)
        assert (encoder_features(enc, x, m, last4) - f).abs().max() > 1e-2  # the masks reach every block
    wide = create_vit("vit_base_patch16_224", img_size=32, num_classes=0, depth=1)  # ViT-B: 1 block + avgpool
    assert dino_pool(wide) == LastBlocks(1, True)
    with torch.no_grad():
        fb, tok = dino_pool(wide)(wide, x), wide.forward_features(x)
    assert fb.shape == (2, 2 * 768)
    torch.testing.assert_close(fb[:, 0::2], tok[:, 0]); torch.testing.assert_close(fb[:, 1::2], tok[:, 1:].mean(1))


def test_linear_probe_dino_recipe():
    dls = tiny_dls()
    learn = linear_probe(biased_encoder(), dls, epochs=1, recipe="dino", precompute=True, progress=False)
    assert type(learn.model) is nn.Linear and learn.model.in_features == 4 * 192  # no BatchNorm
    assert learn.dls.train.dataset.tensors[0].shape == (24, 4 * 192)
    h = learn.opt.hypers[0]
    assert h["mom"] == 0.9 and h["wd"] == 0 and "trust_coeff" not in h  # SGD, not LARS
    assert learn.lr == pytest.approx(1e-3 * 8 / 256) and learn.recipe == "dino"
    with pytest.raises(ValueError, match="`recipe` must be one of"): linear_probe(biased_encoder(), dls, recipe="x")


class _Learn:
    "The part of a `Learner` a batch callback reads and writes"
    training = True

    def __init__(self, xb, yb): self.xb, self.yb = xb, yb


def _augment(cb, x, y, m=None):
    cb.learn = _Learn((x, torch.zeros(len(x), 4, dtype=torch.long) if m is None else m), (y,))
    cb.before_batch()
    return cb.learn.xb[0], cb.learn.yb[0]


def test_mixup_cutmix_change_targets_erasing_changes_pixels():
    cb = MixupErase(3)  # MAE's defaults
    fn = cb.mixup_fn
    assert (fn.mixup_alpha, fn.cutmix_alpha, fn.label_smoothing, fn.switch_prob, cb.reprob, cb.remode) == (
        MAE_FINETUNE["mixup"], MAE_FINETUNE["cutmix"], MAE_FINETUNE["smoothing"], 0.5, 0.25, "pixel")
    torch.manual_seed(0); np.random.seed(0)
    import random; random.seed(0)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 3
    for kw in (dict(mixup=0.8, cutmix=0.), dict(mixup=0., cutmix=1.0)):
        xm, ym = _augment(MixupErase(3, reprob=0., **kw), x.clone(), y)
        assert ym.shape == (8, 3) and torch.allclose(ym.sum(1), torch.ones(8))
        assert int((ym[0] > 0.04).sum()) == 2 and not torch.equal(xm, x)  # image 0's target: 2 classes; pixels mixed
        lam = ym[0, y[0]] - ym[0, y[-1]] if y[0] != y[-1] else None
        if kw["mixup"] and lam is not None:  # image 0 mixed with image 7: x0' = lam x0 + (1 - lam) x7
            w = (xm[0] - x[-1]).flatten() @ (x[0] - x[-1]).flatten() / (x[0] - x[-1]).pow(2).sum()
            assert 0 < w < 1
    xo, yo = _augment(MixupErase(3, reprob=0., **dict(mixup=0., cutmix=0.)), x.clone(), y)
    assert torch.equal(xo, x) and torch.equal(yo, y)  # all off: the batch as it came
    xe, ye = _augment(MixupErase(3, mixup=0., cutmix=0.), torch.randn(64, 3, 32, 32).clamp(-1, 1), y.repeat(8))
    erased = (xe.abs() > 1).flatten(1).any(1)  # the noise erasing paints exceeds the clamped range
    assert torch.equal(ye, y.repeat(8)) and 5 <= int(erased.sum()) <= 30  # ~0.25 of 64 images
    xs, ys = _augment(MixupErase(3, reprob=0.), torch.randn(7, 3, 32, 32), torch.arange(7) % 3)
    assert len(xs) == len(ys) == 6  # timm's Mixup needs an even batch: the odd image is left out


def test_mixed_target_loss_is_mae_criterion():
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    soft = F.one_hot(y, 3).float() * 0.7 + 0.1
    loss = MixedTargetLoss(0.1)
    torch.testing.assert_close(loss(x, soft), SoftTargetCrossEntropy()(x, soft))
    torch.testing.assert_close(loss(x, y), LabelSmoothingCrossEntropy(0.1)(x, y))
    torch.testing.assert_close(MixedTargetLoss(0.)(x, y), F.cross_entropy(x, y))


@pytest.fixture(scope="module")
def photo_dls(tmp_path_factory):
    "labelled_dls of a small ImageFolder of textured 48 px images (RandAugment needs image files)"
    from PIL import Image
    from mgab.data import labelled_dls
    root, g = tmp_path_factory.mktemp("photos"), np.random.default_rng(0)
    for split in ("train", "val"):
        for c in "ab":
            (root/split/c).mkdir(parents=True)
            for i in range(4):
                ramp = np.linspace(0, 255, 48)[None, :, None] * np.ones((48, 1, 3))
                img = np.clip(ramp + g.integers(-30, 30, (48, 48, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(root/split/c/f"{i}.png")
    return labelled_dls(root, img_size=32, patch_size=16, bs=4, num_workers=0, device="cpu")


def test_randaugment_changes_pixels_and_finetune_uses_mae_transform(photo_dls):
    import random
    from PIL import Image
    from timm.data.auto_augment import RandAugment
    from mgab.masks import load_image
    mae, plain = mae_train_dls(photo_dls), mae_train_dls(photo_dls, aa=None)
    assert any(isinstance(t, RandAugment) for t in mae.train.dataset.tfm.transforms)
    assert not any(isinstance(t, RandAugment) for t in plain.train.dataset.tfm.transforms)
    img = Image.fromarray(load_image(photo_dls.train.dataset.files[0]))
    changed = 0
    for s in range(6):  # the same crop and flip (same seeds), RandAugment on top
        outs = []
        for ds in (mae.train.dataset, plain.train.dataset):
            random.seed(s); np.random.seed(s); torch.manual_seed(s)
            outs.append(ds.tfm(img))
        changed += not torch.equal(*outs)
    assert changed >= 3  # each of RandAugment's 2 ops applies with probability 0.5
    x, m, y = mae.one_batch()
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and int(m.abs().sum()) == 0
    assert mae.valid is photo_dls.valid
    from mgab.data import loader_workers
    assert loader_workers(photo_dls.train) == loader_workers(mae.train) == 0  # --num-workers 0 holds (it gave 1)
    learn = fine_tune(biased_encoder(bias=None), photo_dls, epochs=1, progress=False)  # MAE's recipe, all defaults
    assert isinstance(learn.dls.train.dataset.tfm.transforms[2], RandAugment) and learn.augs["reprob"] == 0.25
    assert any(isinstance(cb, MixupErase) for cb in learn.cbs) and isinstance(learn.loss_func, MixedTargetLoss)


@pytest.mark.parametrize("flag,value", [("mixup", 0.8), ("cutmix", 1.0), ("aa", "rand-m9-mstd0.5-inc1"),
                                        ("reprob", 0.25), ("cutmix_minmax", (0.2, 0.8))])
def test_finetune_with_masks_refuses_unaligned_augmentations(flag, value):
    off = "none" if flag == "aa" else "unset" if flag == "cutmix_minmax" else 0
    with pytest.raises(ValueError, match=r"fine-tuning with masks keeps only the augmentations the loader aligns") as e:
        fine_tune(biased_encoder(), tiny_dls(), epochs=1, progress=False, **{flag: value})
    assert (f"--no-masks" in str(e.value) and
            ("no --cutmix-minmax" if flag == "cutmix_minmax" else f"Pass --{flag} {off}") in str(e.value))
    assert finetune_augs(False, **{flag: value})[flag] == value  # without masks: as asked


def test_recipe_columns_and_footnotes(tmp_path):
    base, ours = (make_run(tmp_path, n, bias, 100, [], "dino") for n, bias in (("base", None), ("ours", "learnable")))
    for d, bias, mae_v, dino_v in ((base, None, 60., 70.), (ours, "learnable", 62., 75.)):
        for rec, v in (("mae", mae_v), ("dino", dino_v)):
            RunFolder(d).append_result(dict(protocol="linear", fraction=1., with_masks=bias is not None, metric="top1",
                                  value=v, recipe=rec))
    runs = load_runs([base, ours])
    cols, rows = table1(runs)
    assert cols[3:5] == ["Linear (mae)", "Linear (dino)"]
    assert (rows[1]["Linear (mae)"].delta, rows[1]["Linear (dino)"].delta) == (2., 5.)  # each against its recipe
    notes = recipe_notes(runs)
    assert "- Linear (dino): `dino` recipe, DINO's linear evaluation (facebookresearch/dino eval_linear.py" in notes
    assert "- 1%, 10%, 100%: `mae` recipe, MAE's fine-tuning (facebookresearch/mae main_finetune.py" in notes
    written = report([base, ours], tmp_path/"rep")
    assert "Recipes:\n\n- Linear (mae): `mae` recipe, MAE's linear probe" in written["table1.md"].read_text()
    (base/"results.csv").write_text(OLD_HEADER + "\r\nlinear,1.0,False,top1,61.5,100,vit_tiny_patch16_224,dino,t\r\n")
    (ours/"results.csv").unlink()
    cols, _ = table1(load_runs([base, ours]))
    assert cols[3] == "Linear" and "Linear: `?` recipe, not recorded" in recipe_notes(load_runs([base, ours]))


def test_evaluate_run_is_seeded(tmp_path):
    "The same run scores the same whatever the process ran before; the seed is what changes the head and shuffling"
    import random
    torch.save(biased_encoder().state_dict(), tmp_path/"encoder.pth")
    (tmp_path/"config.json").write_text(json.dumps(dict(method="mae", epochs=1,
                                                        model=dict(name=ARCH, img_size=32, depth=DEPTH))))
    dls = tiny_dls()
    for precompute in (False, True):
        values = []
        for seed in (0, 0, 1, 2):
            torch.rand(7), random.random()  # other work in this process moves the global RNGs
            row = evaluate_run(tmp_path, dls, "linear", epochs=2, precompute=precompute, save=False, progress=False,
                               seed=seed)
            values.append(row["value"])
        assert values[0] == values[1], values
        assert len(set(values)) > 1, values  # measured: 8.3, 8.3, 50.0, 25.0

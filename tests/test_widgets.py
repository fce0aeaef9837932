"mgab.widgets, headless: drive the explorers through their controls and buttons; check state and figures."
import base64
import datetime
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mgab.masks import SuperpixelMasker, load_image
from mgab.sam import SamMasker, build_tiny_sam
from mgab.store import make_mask_store
from mgab.mre import labels2tokens, relation_matrix
from mgab.vit import create_vit
from mgab.runs import find_runs
from mgab.widgets.runs import RunViewer
from mgab.widgets.bias import BiasExplorer
from mgab.widgets.masks import MaskExplorer
from mgab.widgets.base import image_sources


# the tiny SAM of test_masks: no NMS, so that each prompt gives its own masks
TINY_SAM = dict(pred_iou_thresh=0., stability_score_thresh=0.)


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO(); Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _shapes(n=64, seed=0):
    "A flat background with a disc and a bar: two obvious masks"
    rng = np.random.default_rng(seed)
    img = np.full((n, n, 3), 30, np.uint8) + rng.integers(0, 6, (n, n, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:n, :n]
    img[(yy - n * .35) ** 2 + (xx - n * .35) ** 2 < (n * .25) ** 2] = (230, 50, 40)
    img[int(n * .75):int(n * .9), :] = (40, 80, 230)
    return img


@pytest.fixture
def photos(imagenette):
    "Three real photos, one per class"
    return [sorted(d.glob("*.JPEG"))[0] for d in sorted((imagenette / "val").iterdir())[:3]]


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "images"
    (d / "a").mkdir(parents=True)
    for i in range(3): Image.fromarray(_shapes(64, i)).save(d / "a" / f"{i}.png")
    return d


# ---------------------------------------------------------------- MaskExplorer

def test_finer_grid_more_masks_on_a_photo(photos):
    "Fig. 3: the finer setting finds more masks (superpixel stand-in: its segment scale follows the grid)"
    mx = MaskExplorer(photos)
    found = {}
    for g in (8, 32):
        mx.set(points_per_side=g)
        found[g] = mx.n_found
    assert found[32] > found[8] > 1
    stats = mx.compare_grids()
    assert stats.set_index("points_per_side")["found"].to_dict() == {8: found[8], 16: stats["found"][1], 32: found[32]}
    assert (stats["kept"] <= 5).all() and "grids" in mx.figs


def test_patch_size_does_not_rerun_the_masker(photos):
    mx = MaskExplorer(photos, patch_size=16, img_size=224)
    calls, png, lm = mx.n_masker_calls, mx.views["masks"].value, mx.label_map.copy()
    assert mx.token_labels.shape == (14, 14)
    mx.controls["patch_size"].value = 8
    assert mx.n_masker_calls == calls and mx.token_labels.shape == (28, 28)
    np.testing.assert_array_equal(mx.label_map, lm)
    assert mx.views["masks"].value != png
    np.testing.assert_array_equal(mx.token_labels, labels2tokens(lm, 28)[0].view(28, 28).numpy())
    mx.set(img_size=112, token_mode="majority", c=2)  # none of these needs new segments
    assert mx.n_masker_calls == calls and mx.token_labels.shape == (14, 14) and mx.label_map.max() == 2
    mx.set(points_per_side=8)
    assert mx.n_masker_calls == calls + 1


def test_mask_table_and_coverage(photos):
    mx = MaskExplorer(photos, c=4)
    t, lm = mx.mask_table, mx.label_map
    assert list(t["label"]) == list(range(1, int(lm.max()) + 1))
    assert list(t["pixels"]) == [int((lm == k).sum()) for k in t["label"]]
    assert (np.diff(t["score"]) <= 0).all()  # the stand-in keeps the largest segments, label 1 the largest
    assert mx.coverage["pixels"] == pytest.approx((lm > 0).mean())
    assert mx.coverage["tokens"] == pytest.approx((mx.token_labels > 0).mean())
    assert f"{mx.coverage['pixels']:.1%}" in mx.info.value


def test_image_navigation_and_display(photos):
    mx = MaskExplorer(photos)
    first = mx.image_name
    mx.controls["next"].click()
    assert mx.image_name != first and mx.image.shape == load_image(photos[1]).shape
    mx.controls["previous"].click(); mx.controls["previous"].click()
    assert mx.image_name == list(mx.sources)[-1]
    bundle, meta = mx._repr_mimebundle_()  # the widget, and for static pages its picture at its natural size
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert bundle["text/plain"] == f"MaskExplorer(3 images, generator 'felzenszwalb', image {mx.image_name!r})"
    assert base64.b64decode(bundle["image/png"]) == mx.views["masks"].value and meta["image/png"]["width"] == 640


def test_upload(folder):
    mx = MaskExplorer(folder, img_size=64, patch_size=8)
    n = len(mx.controls["image"].options)
    up = dict(name="mine.png", type="image/png", size=0, last_modified=datetime.datetime.now())
    mx.controls["upload"].value = (dict(up, content=memoryview(_png(_shapes(80, 5)))),)
    assert mx.image_name == "upload/mine.png" and mx.image.shape == (80, 80, 3)
    assert len(mx.controls["image"].options) == n + 1 and mx.error is None and mx.label_map.shape == (80, 80)
    mx.controls["upload"].value = (dict(up, name="bad.png", content=memoryview(b"not a png")),)
    assert isinstance(mx.error, ValueError) and "bad.png" in mx.message.value
    assert mx.image_name == "upload/mine.png"  # the last good image stays


def test_store_generator(folder, tmp_path):
    store = make_mask_store(folder, tmp_path / "store", SuperpixelMasker(points_per_side=8, c=3), progress=False)
    mx = MaskExplorer(folder, store=store, img_size=64, patch_size=8)
    assert mx.controls["generator"].value == "store" and mx.controls["c"].disabled
    for name, path in mx.sources.items():
        mx.controls["image"].value = name
        np.testing.assert_array_equal(mx.label_map, store[path])
    mx.controls["generator"].value = "felzenszwalb"
    assert not mx.controls["c"].disabled and mx.controls["pred_iou_thresh"].disabled  # SAM's thresholds only
    partial = {"a/0.png": store[folder / "a" / "0.png"]}
    mp = MaskExplorer(folder, store=partial, img_size=64)
    mp.controls["image"].value = "a/1.png"
    assert isinstance(mp.error, KeyError) and "a/1.png" in mp.message.value and "masks" not in mp.figs


def test_custom_masker():
    calls = []
    def halves(img):
        calls.append(1)
        lm = np.zeros(img.shape[:2], np.uint8); lm[:, img.shape[1] // 2:] = 1
        return lm
    mx = MaskExplorer({"x": _shapes()}, masker=halves, img_size=64, patch_size=16)
    assert mx.controls["generator"].value == "masker" and mx.coverage["pixels"] == .5
    assert mx.token_labels[:, :2].max() == 0 and mx.token_labels[:, 2:].min() == 1
    mx.set(patch_size=8); assert len(calls) == 1


def test_sam_generator(photos):
    "The 'sam' generator with a tiny random SAM: scores per mask, more prompts more masks, c reuses annotations"
    torch.manual_seed(0)
    masker = SamMasker(sam=build_tiny_sam(), points_per_side=4, box_nms_thresh=1.0, points_per_batch=64, **TINY_SAM)
    mx = MaskExplorer(photos[:1], masker=masker, c=3)
    assert mx.controls["generator"].value == "sam" and mx.controls["points_per_side"].value == 4
    np.testing.assert_array_equal(mx.label_map, masker(mx.image))
    t = mx.mask_table
    assert {"predicted_iou", "stability_score", "sam_area"} <= set(t.columns) and len(t) == mx.label_map.max()
    assert (np.diff(t["predicted_iou"]) <= 0).all()  # labels by decreasing confidence (label_map's order)
    found4, calls = mx.n_found, mx.n_masker_calls
    mx.set(c=1)
    assert mx.n_masker_calls == calls and mx.label_map.max() == 1
    mx.set(points_per_side=8)
    assert mx.n_masker_calls == calls + 1 and mx.n_found > found4


# ---------------------------------------------------------------- BiasExplorer

def _tiny_vit(**kw):
    torch.manual_seed(0)
    return create_vit("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3, **kw)


@pytest.fixture
def bias_data():
    lm = np.zeros((32, 32), np.uint8); lm[:16, :16] = 1; lm[24:, :] = 2; lm[:8, 24:] = 3
    lm2 = np.zeros((32, 32), np.uint8); lm2[:, :16] = 1
    return {"a": _shapes(32, 1), "b": _shapes(32, 2)}, {"a": lm, "b": lm2}


def test_bias_off_changes_only_rows_with_relations(bias_data):
    images, store = bias_data
    bx = BiasExplorer(_tiny_vit(u_pos_init=2., u_neg_init=-1.5), images, store)
    m = labels2tokens(store["a"], 4)[0]
    np.testing.assert_array_equal(bx.m, m.numpy())
    np.testing.assert_array_equal(bx.relations, relation_matrix(m[None])[0].numpy())
    on, off = bx.attn_on[0], bx.attn_off[0]  # layer 0: (H, T, T), the same input tokens
    P = bx.state["prefix"]
    labels = np.concatenate([np.zeros(P, int), bx.m])
    same = np.isclose(on, off, rtol=0, atol=1e-7).all(axis=(0, 2))  # per query row
    np.testing.assert_array_equal(same, labels == 0)
    # within a row, keys with the same relation keep their ratio (Eq. 5 adds one constant per relation)
    q = int(np.flatnonzero(bx.m)[0])
    r, rel = on[:, P + q, P:] / off[:, P + q, P:], bx.relations[q]
    for v in (-1, 0, 1):
        np.testing.assert_allclose(r[:, rel == v], r[:, rel == v][:, :1].repeat((rel == v).sum(), 1), rtol=1e-4)
    assert bx.n_forward == 2


def test_bias_explorer_controls(bias_data):
    images, store = bias_data
    bx = BiasExplorer(_tiny_vit(u_pos_init=2., u_neg_init=-1.5), images, store)
    pngs = {k: v.value for k, v in bx.views.items()}
    bx.controls["query_text"].value = 3  # the text box and the slider are linked
    assert bx.controls["query"].value == 3 and bx.query == 3 and bx.n_forward == 2
    assert bx.views["attention"].value != pngs["attention"] and bx.views["bias"].value == pngs["bias"]
    on, off = bx.query_maps()
    np.testing.assert_array_equal(on, bx.attn_on[:, :, 1 + 3, 1:].reshape(2, 3, 4, 4))
    bx.controls["layer"].value = -1
    assert len(bx.figs["attention"].axes) == 3 * 2 + 2  # on/off/difference x layers, two colour bars
    bx.controls["layer"].value = 1
    assert len(bx.figs["attention"].axes) == 3 * 4 + 2  # on/off/difference x (3 heads + mean), two colour bars
    bx.controls["image"].value = "b"
    assert bx.n_forward == 4 and bx.m.reshape(4, 4)[:, :2].min() == 1 and bx.m.reshape(4, 4)[:, 2:].max() == 0
    bx.controls["image"].value = "a"
    assert bx.n_forward == 4  # cached


def test_vanilla_model_attention_is_unchanged(bias_data):
    images, store = bias_data
    bx = BiasExplorer(_tiny_vit(bias=None), images, store)
    np.testing.assert_array_equal(bx.attn_on, bx.attn_off)
    assert np.abs(bx.u["u_pos"]).max() == 0


def test_bias_explorer_run_folder(tmp_path, folder):
    "A run folder: the encoder from encoder.pth, the epoch slider over bias_history.json, a MaskStore"
    model = _tiny_vit()
    with torch.no_grad():
        for l, b in enumerate(model.blocks): b.attn.u_pos.fill_(l + 1.); b.attn.u_neg.fill_(-.5)
    run = tmp_path / "run"; run.mkdir()
    torch.save(model.state_dict(), run / "encoder.pth")
    arch = dict(name="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)
    (run / "config.json").write_text(json.dumps(dict(method="mae", model=arch, epochs=2)))
    hist = [dict(epoch=0, u_pos=[[.1] * 3] * 2, u_neg=[[-.1] * 3] * 2)]
    hist.append(dict(epoch=1, **{k: v.tolist() for k, v in model.bias_values().items()}))
    (run / "bias_history.json").write_text(json.dumps(hist))
    store = make_mask_store(folder, tmp_path / "store", SuperpixelMasker(points_per_side=8), progress=False)
    bx = BiasExplorer(run, folder, tmp_path / "store")  # a store folder works as the store
    assert bx.controls["epoch"].options == (0, 1) and bx.controls["epoch"].value == 1
    np.testing.assert_array_equal(bx.u["u_pos"][:, 0], [1., 2.])
    png = bx.views["bias"].value
    bx.controls["epoch"].value = 0
    np.testing.assert_allclose(bx.u["u_pos"], .1)
    assert bx.views["bias"].value != png and bx.n_forward == 2
    np.testing.assert_allclose(bx.figs["bias"].axes[0].images[0].get_array(), .1)
    np.testing.assert_array_equal(bx.m, labels2tokens(store[folder / "a" / "0.png"], 4)[0].numpy())
    # Fig. 4's colour limits are the same at every epoch (the largest |u| of the run: 2), so colours compare
    assert bx.figs["bias"].axes[0].images[0].get_clim() == (-2., 2.)
    bx.controls["epoch"].value = 1
    assert bx.figs["bias"].axes[0].images[0].get_clim() == (-2., 2.)
    assert "epoch 1" in bx.figs["bias"]._suptitle.get_text()


def test_bias_explorer_errors(bias_data):
    images, store = bias_data
    with pytest.raises(TypeError, match="MaskBiasViT"): BiasExplorer(torch.nn.Linear(2, 2), images, store)
    with pytest.raises(ValueError, match="dynamic_img_size"): BiasExplorer(_tiny_vit(), images, store, img_size=64)
    with pytest.raises(FileNotFoundError, match="no-run"): BiasExplorer("/no-run", images, store)
    bx = BiasExplorer(_tiny_vit(), images, {"a": store["a"]})
    bx.controls["image"].value = "b"
    assert isinstance(bx.error, KeyError) and "attention" not in bx.figs


# ---------------------------------------------------------------- RunViewer

def _write_run(d: Path, losses, layers=2, heads=3, method="mae", results=None, **model):
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(dict(method=method, model=dict(name="vit_tiny_patch16_224", **model),
                                                   epochs=len(losses) + 1)))
    hist = [dict(epoch=e, u_pos=(np.arange(layers)[:, None] * .1 * e + np.zeros(heads)).tolist(),
                 u_neg=(-np.ones((layers, heads)) * .05 * e).tolist()) for e in range(len(losses))]
    pd.DataFrame(dict(epoch=range(len(losses)), train_loss=losses, lr=1e-3,
                      u_pos_mean=[np.mean(h["u_pos"]) for h in hist], u_neg_mean=[np.mean(h["u_neg"]) for h in hist])
                 ).to_csv(d / "metrics.csv", index=False)
    (d / "bias_history.json").write_text(json.dumps(hist))
    if results: pd.DataFrame(results).to_csv(d / "results.csv", index=False)
    return d


RESULT = dict(protocol="linear", fraction=1.0, with_masks=False, metric="top1", value=0.42, epochs=10,
              arch="vit_tiny_patch16_224", method="mae", timestamp="2025-01-01T00:00:00")


def test_run_viewer(tmp_path):
    _write_run(tmp_path / "runs" / "mae", [1., .8, .6], results=[RESULT, dict(RESULT, fraction=.1, value=.3)])
    _write_run(tmp_path / "runs" / "mae-nobias", [1.1, .9])
    rv = RunViewer(tmp_path / "runs")
    assert rv.selected == ["mae", "mae-nobias"]
    lines = rv.figs["loss"].axes[0].lines
    assert [l.get_label() for l in lines] == ["mae", "mae-nobias"]
    np.testing.assert_allclose(lines[0].get_ydata(), [1., .8, .6])
    assert list(rv.results["run"]) == ["mae", "mae"] and list(rv.results["value"]) == [.42, .3]
    assert "0.42" in rv.results_html.value and list(rv.summary["epochs"]) == ["3/4", "2/3"]
    u = rv.u_curves("mae")["u_pos"]
    np.testing.assert_allclose(u.loc[2].values, [0., .2])  # per layer, mean over heads
    rv.set(u_view="per layer")  # two runs: one line per layer; the legend keeps every run and every layer
    lines = rv.figs["u"].axes[0].lines[:-1]  # the last one is the zero line
    legend = [h.get_label() for h in rv.figs["u"].axes[1].get_legend().legend_handles]
    assert len(lines) == 2 * 2 and legend == ["mae (line style)", "layer 0", "layer 1", "mae-nobias (line style)"]
    assert lines[0].get_linestyle() != lines[2].get_linestyle()  # runs differ by line style
    rv.set(runs=("mae",))
    legend = [h.get_label() for h in rv.figs["u"].axes[1].get_legend().legend_handles]
    assert legend == ["mae (line style)", "layer 0", "layer 1"]
    rv.set(runs=("mae", "mae-nobias"))
    png = rv.views["loss"].value
    rv.controls["runs"].value = ("mae-nobias",)
    assert [l.get_label() for l in rv.figs["loss"].axes[0].lines] == ["mae-nobias"]
    assert rv.views["loss"].value != png and len(rv.results) == 0
    assert "no results in the selected runs" in rv.results_html.value
    rv.set(metric="lr", log_y=True)
    assert rv.figs["loss"].axes[0].get_yscale() == "log" and rv.figs["loss"].axes[0].get_ylabel() == "lr"


def test_run_viewer_vanilla_run_has_no_u_curve(tmp_path):
    _write_run(tmp_path / "biased", [1., .8])
    _write_run(tmp_path / "vanilla", [1., .9], bias=None)
    rv = RunViewer([tmp_path / "biased", tmp_path / "vanilla"])
    labels = [l.get_label() for l in rv.figs["u"].axes[0].lines]
    assert "biased" in labels and "vanilla" not in labels
    assert [l.get_label() for l in rv.figs["loss"].axes[0].lines] == ["biased", "vanilla"]
    assert list(rv.summary["bias"]) == ["learnable", "none"]


def test_run_viewer_reload(tmp_path):
    d = _write_run(tmp_path / "run", [1., .8])
    rv = RunViewer(d)
    assert rv.selected == ["run"] and len(rv.figs["loss"].axes[0].lines[0].get_xdata()) == 2
    m = pd.read_csv(d / "metrics.csv")
    pd.concat([m, m.iloc[-1:].assign(epoch=2, train_loss=.7, val_acc=.5)]).to_csv(d / "metrics.csv", index=False)
    rv.controls["reload"].click()
    assert len(rv.figs["loss"].axes[0].lines[0].get_xdata()) == 3 and "val_acc" in rv.controls["metric"].options


def test_run_viewer_fit_run_folder(tmp_path):
    "A run folder as mgab.train.fit_run writes it"
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from mgab.train import WarmupCosine, fit_run, model_loss, ssl_splitter

    class Toy(torch.nn.Module):  # an encoder plus a loss, like the SSL wrappers
        def __init__(self):
            super().__init__(); self.encoder = _tiny_vit(num_classes=0)
        def forward(self, x, m): return self.encoder(x, m).pow(2).mean()
    torch.manual_seed(0)
    x, m = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8, 16))
    ds = list(zip(x, m))
    dls = DataLoaders.from_dsets(ds, ds, bs=4, device="cpu")
    dls.n_inp = 2
    learn = Learner(dls, Toy(), loss_func=model_loss, splitter=ssl_splitter,
                    cbs=WarmupCosine(1e-2, 1e-6, wd=0.05, bias_lr_mult=10, whole_iters=True))
    model_cfg = dict(name="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3,
                     num_classes=0)
    with learn.no_bar(), learn.no_logging():
        fit_run(learn, 2, tmp_path / "toy", dict(method="toy", model=model_cfg))
    rv = RunViewer(tmp_path / "toy")
    assert list(rv.summary["epochs"]) == ["2/2"] and rv.u_curves("toy")["u_pos"].shape == (2, 2)
    u, curves = learn.model.encoder.bias_values(), rv.u_curves("toy")  # (layers, heads) of the trained encoder
    for k in ("u_pos", "u_neg"):  # the last epoch's curve is the trained bias, averaged over heads
        np.testing.assert_allclose(curves[k].values[-1], u[k].mean(1).numpy(), rtol=1e-6, atol=1e-8)
    moved = np.abs(curves["u_pos"].values)  # (epochs, layers), from a 0 init
    # the loss reads only the CLS token, whose attention the bias leaves alone: the first block's bias learns (through
    # the patch tokens the last block reads), the last block's gets no gradient and stays 0
    assert (moved[:, 0] > 1e-4).all() and (moved[:, -1] == 0).all(), moved
    bx = BiasExplorer(tmp_path / "toy", {"a": _shapes(32)}, {"a": np.ones((32, 32), np.uint8)})
    np.testing.assert_allclose(bx.u["u_pos"], np.asarray(json.loads((tmp_path / "toy" / "bias_history.json")
                                                                    .read_text())[-1]["u_pos"]), rtol=1e-6)


def test_find_runs_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"): find_runs(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no run folder"): find_runs(tmp_path / "empty")


def test_relative_paths_find_their_masks(folder, tmp_path, monkeypatch):
    "Images given by relative paths are looked up in a store by their absolute path"
    store = make_mask_store(folder, tmp_path / "store", SuperpixelMasker(points_per_side=8), progress=False)
    monkeypatch.chdir(tmp_path)
    mx = MaskExplorer(Path("images"), store=store, img_size=64)
    assert mx.error is None and mx.sources["a/0.png"] == folder / "a" / "0.png"
    np.testing.assert_array_equal(mx.label_map, store["a/0.png"])


def test_image_sources(folder, tmp_path):
    src = image_sources(folder)
    assert list(src) == ["a/0.png", "a/1.png", "a/2.png"] and src["a/0.png"] == folder / "a" / "0.png"
    src = image_sources([folder / "a" / "0.png", folder / "a" / "1.png"])
    assert list(src) == ["0.png", "1.png"]
    (tmp_path / "nothing").mkdir(); (tmp_path / "nothing" / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"): image_sources(tmp_path / "nothing")
    with pytest.raises(ValueError, match="uint8"): image_sources({"f": np.zeros((4, 4, 3), np.float32)})

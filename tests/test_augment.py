"""Issue #22, items 1-2: augmentations that cannot crash, and one error line when one does.

Every op timm's RandAugment, AutoAugment and AugMix can draw (`NAME_TO_OP`) is drawn at the extremes of the
magnitudes the recipes sample, on real photos; the loader's own colour ops (torchvision) at the ends of their
ranges; and an op that fails in a DataLoader worker is one line naming the op, the image and the fix."""
import contextlib
import io
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from timm.data import create_transform
from timm.data.auto_augment import NAME_TO_OP, AugmentOp, RandAugment

from conftest import IMAGENETTE
from mgab import finetune
from mgab.cli.evaluate import eval_main
from mgab.data import View, dino_views, photometric
from mgab.finetune import PIL_ARG_RANGES, AugmentError, safe_augment
from mgab.masks import list_images, load_image

# the magnitudes the recipes can draw: timm clips N(m, mstd) to [0, 10], or to [0, mmax] when a policy sets mmax
EXTREMES = [dict(magnitude=0.), dict(magnitude=10.), dict(magnitude=30., magnitude_max=30.),
            dict(magnitude=9., magnitude_std=0.5)]  # MAE's m9-mstd0.5: 10 draws each below (the ends are above)


@pytest.fixture(scope="module")
def photos():
    "Six real photos (one per class of the first six), as the loaders read them"
    if not IMAGENETTE.is_dir(): pytest.skip(f"real photos not found at {IMAGENETTE}")
    names = list_images(IMAGENETTE/"train")
    picks = [next(n for n in names if n.startswith(c)) for c in sorted({n.split("/")[0] for n in names})[:6]]
    return [Image.fromarray(load_image(IMAGENETTE/"train"/n)).resize((112, 112)) for n in picks]  # 1/4: faster


def draw_all(photos, safe: bool) -> dict[str, str]:
    "Apply every op at every extreme to every photo: {op name: first error} for the ops that fail"
    failed = {}
    random.seed(0)
    for name in NAME_TO_OP:
        for hp in EXTREMES:
            op = AugmentOp(name, prob=1., magnitude=hp["magnitude"], hparams=dict(translate_const=100, **{
                k: v for k, v in hp.items() if k != "magnitude"}))
            ra = RandAugment([op], num_layers=1)
            if safe: safe_augment(ra)
            for img in photos:
                for _ in range(10 if "magnitude_std" in hp else 1):
                    try: out = op(img)
                    except Exception as e:
                        failed.setdefault(name, f"{type(e).__name__}: {e}")
                        continue
                    assert out.mode == "RGB" and out.size == img.size, (name, hp)
    return failed


def test_every_op_at_the_extremes_on_real_photos(photos):
    "As installed, Pillow refuses posterize's 0 bits and nothing else; made safe, every op takes every draw"
    raw = draw_all(photos, safe=False)
    assert set(raw) == {"Posterize", "PosterizeIncreasing"}, raw  # a new failure: add its range to PIL_ARG_RANGES
    assert all("bits must be between or equal to 1 and 8" in e for e in raw.values()), raw
    assert draw_all(photos, safe=True) == {}
    assert PIL_ARG_RANGES == {"posterize": (1, 8)}


def test_clamped_posterize_keeps_the_recipes_meaning(photos):
    "Out of range, the clamped op is the nearest one Pillow allows: 1 bit below, unchanged at 8 and above"
    img = photos[0]
    cases = (("PosterizeIncreasing", 10., 1), ("Posterize", 0., 1), ("PosterizeIncreasing", 30., 1),
             ("PosterizeIncreasing", 0., 4), ("PosterizeOriginal", 10., 8))  # (op, magnitude, bits Pillow keeps)
    for name, magnitude, bits in cases:
        op = AugmentOp(name, prob=1., magnitude=magnitude, hparams=dict(magnitude_max=30.))
        safe_augment(RandAugment([op]))
        want = img if bits == 8 else ImageOps.posterize(img, bits)
        np.testing.assert_array_equal(np.asarray(op(img)), np.asarray(want), err_msg=f"{name} m={magnitude}")


@pytest.mark.parametrize("aa", ["rand-m9-mstd0.5-inc1", "rand-m15-mmax20-inc1", "rand-m9-mstd0.5", "v0",
                                "augmix-m10-mstd1", "original-mstd0.5", "3a"])
def test_whole_policies_never_raise(photos, aa):
    "MAE's policy and the others `--aa` takes, as `mae_train_dls` builds them, 200 images each"
    tfm = safe_augment(create_transform(64, is_training=True, color_jitter=None, auto_augment=aa,
                                        interpolation="bicubic", re_prob=0.))
    assert finetune.augment_ops(tfm), aa  # the ops were found and wrapped
    random.seed(1); np.random.seed(1); torch.manual_seed(1)
    for i in range(200): assert tfm(photos[i % len(photos)]).shape == (3, 64, 64)


class Ends:
    "A `random.Random` stand-in drawing the ends of every range: `lo` or `hi`, and every probability applied"
    def __init__(self, high: bool): self.high = high
    def random(self): return 0.
    def uniform(self, a, b): return b if self.high else a
    def shuffle(self, x): x.reverse()


def test_loader_colour_ops_at_their_ends(photos):
    "The loaders' own photometric ops (torchvision's adjust_*, blur, solarize, grey) at both ends of their ranges"
    for view in (View(64, jitter=0.8), *dino_views(64, 32, 1)[:2], View(64, jitter=1., gray=1., blur=1., solarize=1.)):
        for high in (False, True):
            for img in photos:
                out = photometric(img, view, Ends(high))
                assert out.mode == "RGB" and out.size == img.size


# ------------------------------------------------------------------------------------- through mgab-eval
def eval_lines(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try: rc = eval_main([str(a) for a in argv])
        except SystemExit as e: rc = e.code
    return rc, out.getvalue(), err.getvalue()


def test_an_op_failing_in_a_worker_is_one_line(tiny_eval_run, monkeypatch):
    "Without the clamp (the issue's failure: 0 bits), the worker's error is one line: op, image, fix; --debug: all"
    run, data = tiny_eval_run
    argv = ["--run", run, "--data", data, "--protocol", "finetune", "--epochs", "1", "--bs", "4", "--num-workers", "1",
            "--aa", "rand-m10-inc1-n60-p1.0", "--no-progress"]  # 60 ops an image: PosterizeIncreasing at 0 bits
    with monkeypatch.context() as m:
        m.setattr(finetune, "PIL_ARG_RANGES", {})  # as mgab was: the worker processes inherit it (fork)
        rc, _, err = eval_lines(argv)
        assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith("mgab-eval: error: timm's PosterizeIncreasing op (0) failed: ValueError: bits must be "
                              "between or equal to 1 and 8 (Pillow "), err
        assert "on image 'train/" in err and "(--aa rand-m10-inc1-n60-p1.0): pass --aa none" in err, err
        with pytest.raises(AugmentError, match="Original Traceback") as e:
            eval_main([str(a) for a in argv] + ["--debug"])
        assert "DataLoader worker process 0" in str(e.value)
    assert not (run/"results.csv").exists()
    rc, out, err = eval_lines(argv)  # as mgab is: clamped, the same run trains to the end
    assert (rc, err) == (0, ""), err
    assert json.loads((run/"evals"/"finetune-mae-nomasks-1-encoder"/"finished.json").read_text())["epochs"] == 1

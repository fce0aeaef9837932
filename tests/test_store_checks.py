"Mask stores checked where they are used, one settings lock, --repair, unreadable images, one image lister (#13)."
import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mgab.data import image_files, labelled_dls, pretrain_dls
from mgab.masks import SuperpixelMasker, list_images
from mgab.store import MaskStore, StaleMasksError, make_mask_store, read_entry, read_meta, verify_store, write_entry

ROOT = Path(__file__).resolve().parents[1]
SP = SuperpixelMasker(points_per_side=4)  # what `mgab-masks --points-per-side 4` builds


def entry(*argv):
    "Run an installed console script on this checkout's code"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=env, timeout=300)


def popen(*argv):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _pic(seed, size=32):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def image_folder(root, n=3, seed=0, ext="ppm"):
    "train/ and val/ with classes a and b, `n` noisy images each; .ppm keeps a file's size when its picture changes"
    for s, split in enumerate(("train", "val")):
        for c in "ab":
            (root/split/c).mkdir(parents=True, exist_ok=True)
            for i in range(n): Image.fromarray(_pic([seed, s, ord(c), i])).save(root/split/c/f"{i}.{ext}")
    return root


def counts(stdout):
    m = re.search(r"computed (\d+), skipped (\d+) already done, (\d+) unreadable", stdout)
    assert m, stdout
    return tuple(int(x) for x in m.groups())


def warnings_of(stderr):
    return [l for l in stderr.splitlines() if l.startswith("mgab: warning: skipped")]


def test_foreign_store_refused_copy_accepted(tmp_path):
    "A store of another folder with the same file names is refused; a copy of its folder (same bytes) is not"
    a, b = image_folder(tmp_path/"a"), image_folder(tmp_path/"b", seed=1)
    store = make_mask_store(a, tmp_path/"store", SP, progress=False)
    kw = dict(img_size=32, patch_size=8, bs=2, num_workers=0, device="cpu")
    for make in (pretrain_dls, labelled_dls):  # training and evaluation loaders
        with pytest.raises(StaleMasksError) as e: make(b, store, **kw)
        msg = str(e.value)
        assert f"was built from {a}, not from the images under {b}: 6 of 6 entries do not match" in msg, msg
        assert f"`mgab-masks {b} --out NEW_STORE`" in msg and "\n" not in msg
    copy = tmp_path/"copy"
    shutil.copytree(a, copy)  # copy2: same bytes and mtimes
    for f in image_files(copy/"val"): os.utime(f, ns=(1, 10**9))  # another mtime: hashed, still the same bytes
    dls = labelled_dls(copy, store, **kw)
    assert (len(dls.train_ds), len(dls.valid_ds)) == (6, 6) and dls.has_masks


def test_changed_images_refused_then_repaired(tmp_path):
    "Images changed after masking (one with size and mtime put back), a label above c and a damaged entry"
    a = image_folder(tmp_path/"a")
    out = tmp_path/"store"
    r = entry("mgab-masks", a, "--out", out, "--points-per-side", "4", "--no-progress")
    assert r.returncode == 0 and counts(r.stdout) == (12, 0, 0), r.stderr
    store = MaskStore(out)
    kw = dict(img_size=32, patch_size=8, bs=2, num_workers=0, device="cpu")
    assert len(pretrain_dls(a, store, **kw).train_ds) == 6
    # 1. a new picture with the same byte size and the old mtime: only a hash sees it
    f = a/"train/a/1.ppm"; st = f.stat()
    Image.fromarray(_pic(99)).save(f); os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size
    with pytest.raises(StaleMasksError, match=re.escape(f"1 of 6 entries of mask store {out} do not match their "
                                                        f"images under {a}")) as e:
        pretrain_dls(a, store, **kw)
    assert f"`mgab-masks {a} --out {out} --repair`" in str(e.value)
    # 2. a label above c (CRC and metadata intact) and 3. a damaged entry
    lm, meta = read_entry(store.entry_path("val/b/0.ppm")); lm = lm.copy(); lm[0, 0] = 9
    write_entry(store.entry_path("val/b/0.ppm"), lm, {k: v for k, v in meta.items() if k not in ("shape", "crc32")})
    store.entry_path("val/a/2.ppm").write_bytes(b"\x89PNG\r\n\x1a\n damaged")
    r = entry("mgab-masks", "--verify", out, "--no-progress")
    assert r.returncode == 1 and "9 ok, 0 missing, 1 stale, 2 corrupt" in r.stdout, r.stdout
    assert "--repair" in r.stdout
    r = entry("mgab-masks", a, "--out", out, "--points-per-side", "4", "--no-progress")  # a plain resume ...
    assert r.returncode == 0 and counts(r.stdout) == (2, 10, 0), r.stdout  # ... trusts size + mtime
    assert verify_store(out)["stale"] == ["train/a/1.ppm"] and MaskStore(out)["val/b/0.ppm"].max() <= 5
    r = entry("mgab-masks", a, "--out", out, "--points-per-side", "4", "--no-progress", "--repair")
    assert r.returncode == 0 and counts(r.stdout) == (1, 11, 0), r.stdout
    r = entry("mgab-masks", "--verify", out, "--no-progress")
    assert r.returncode == 0 and "12 ok, 0 missing, 0 stale, 0 corrupt" in r.stdout, r.stdout
    assert len(pretrain_dls(a, MaskStore(out), **kw).train_ds) == 6


def test_two_writers_first_settings_win(tmp_path):
    "Writers started at the same moment: those with the first writer's settings proceed, the others refuse"
    a = image_folder(tmp_path/"a", n=2)
    out = tmp_path/"store"
    methods = ("felzenszwalb", "slic", "felzenszwalb")
    procs = [popen("mgab-masks", a, "--out", out, "--points-per-side", "4", "--method", m, "--no-progress")
             for m in methods]
    res = [(p.returncode, *out) for p in procs for out in [p.communicate(timeout=300)]]
    winner = MaskStore(out).info["settings"]["method"]
    for m, (rc, stdout, stderr) in zip(methods, res):
        if m == winner: assert rc == 0, stderr
        else:
            assert rc == 1, stdout
            errs = [l for l in stderr.splitlines() if "error" in l]
            assert len(errs) == 1 and f"mask store {out} was built with superpixel" in errs[0], stderr
            assert "Use another --out" in errs[0] and "Traceback" not in stderr
    assert sum(rc == 0 for rc, *_ in res) == methods.count(winner) >= 1
    v = verify_store(out)  # every entry is the winner's: no stale entry of the loser's generator
    assert v["ok"] == 8 and not (v["missing"] or v["stale"] or v["corrupt"])
    assert {read_meta(MaskStore(out).entry_path(k))["settings_id"] for k in MaskStore(out)} == {
        read_meta(MaskStore(out).entry_path("train/a/0.ppm"))["settings_id"]}


def test_truncated_jpeg_skipped_by_masks_training_evaluation(tmp_path, capsys):
    "One truncated JPEG in train/: the mask stage, training and evaluation skip it and list it in one line each"
    from mgab.cli.evaluate import eval_cli
    from mgab.mae import pretrain_mae
    data = image_folder(tmp_path/"data", n=4, ext="png")
    buf = io.BytesIO(); Image.fromarray(_pic(7)).save(buf, format="JPEG")
    (data/"train/a/cut.jpg").write_bytes(buf.getvalue()[:400])
    r = entry("mgab-masks", data, "--out", tmp_path/"store", "--points-per-side", "4", "--no-progress")
    assert r.returncode == 0 and counts(r.stdout) == (16, 0, 1), r.stderr
    w = warnings_of(r.stderr)
    assert len(w) == 1 and w[0].startswith(f"mgab: warning: skipped 1 unreadable image under {data} (no masks): "
                                           "train/a/cut.jpg (cannot read image"), r.stderr
    model = dict(name="vit_tiny_patch16_224", patch_size=8, img_size=32, num_classes=0, depth=1)
    run = pretrain_mae(dict(method="mae", data=str(data), masks=str(tmp_path/"store"), out=str(tmp_path/"run"),
                            epochs=1, bs=4, model=model, progress=False, num_workers=0))
    w = warnings_of(capsys.readouterr().err)
    assert len(w) == 1 and "train/a/cut.jpg" in w[0] and w[0].startswith("mgab: warning: skipped 1 unreadable"), w
    assert (Path(run)/"encoder.pth").is_file()
    row = eval_cli(["--run", str(run), "--data", str(data), "--masks", str(tmp_path/"store"), "--protocol", "knn",
                    "--img-size", "32", "--bs", "8", "--k", "3", "--no-progress", "--num-workers", "0"])
    assert row["value"] == 62.5  # seeded pretraining and kNN, measured: 5 of the 8 validation images
    w = warnings_of(capsys.readouterr().err)
    assert len(w) == 1 and "train/a/cut.jpg" in w[0], w
    # without a store nothing knows it beforehand: it gives its place to the next image, listed once
    dls = labelled_dls(data, None, img_size=32, patch_size=8, bs=9, augment="none", num_workers=0, device="cpu")
    x, m, y = next(iter(dls.train))
    assert len(dls.train_ds) == 9 and list(dls.train_ds.unreadable.errors) == ["train/a/cut.jpg"]
    assert sorted(y.tolist()) == [0] * 4 + [1] * 5  # cut.jpg (class a) replaced by b/0.png
    assert len(warnings_of(capsys.readouterr().err)) == 1


def test_symlink_loop_and_netpbm(tmp_path):
    "Each real image once through a symlink loop and an alias; .ppm and .pgm get masks"
    d = tmp_path/"imgs"
    (d/"c").mkdir(parents=True)
    Image.fromarray(_pic(0)).save(d/"c"/"0.ppm"); Image.fromarray(_pic(1)[..., 0]).save(d/"c"/"1.pgm")
    Image.fromarray(_pic(2)).save(d/"2.png")
    (d/"c"/"up").symlink_to(d, target_is_directory=True)  # a loop: c/up/c/up/...
    (d/"c"/"again.png").symlink_to(d/"2.png")
    assert list_images(d) == ["2.png", "c/0.ppm", "c/1.pgm"]
    assert image_files(d) == [d/"2.png", d/"c"/"0.ppm", d/"c"/"1.pgm"]
    r = entry("mgab-masks", d, "--out", tmp_path/"store", "--points-per-side", "4", "--no-progress")
    assert r.returncode == 0 and counts(r.stdout) == (3, 0, 0), r.stderr
    store = MaskStore(tmp_path/"store")
    assert list(store) == ["2.png", "c/0.ppm", "c/1.pgm"] and store["c/1.pgm"].shape == (32, 32)

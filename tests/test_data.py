"Data pipeline: image/label-map alignment under every crop and flip, multi-crop grids, subsets, datasets, errors."
import json
import random
import re
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mgab.data as D
import mgab.datasets as DS
from mgab.data import (NormalizeCrops, MissingMasksError, MaskedImages, image_files, labelled_dls, mask_keys,
                       multicrop_dls, pretrain_dls, read_subset_file, token_labels)
from mgab.datasets import embedded_dataset, folder_digest, imagenet100, imagenet100_classes, imagenette, make_embedded
from mgab.masks import load_image

# Corners of the RGB cube: none is a blend of the others, so a pixel of exactly one of these colours can only come
# from pixels of that colour, however the image was resampled.
PALETTE = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255],
                    [255, 255, 255]], np.uint8)


def _write(path: Path, arr: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _colour_coded(rng, h=80, w=96, cell=16):
    "A label map of random blocks (labels 0..7) and the image painting each label with its palette colour"
    lm = np.kron(rng.integers(0, len(PALETTE), (h // cell, w // cell)), np.ones((cell, cell), np.int64))
    return PALETTE[lm], lm.astype(np.uint8)


def _colour_folder(root: Path, n_per_split=3, seed=0):
    "ImageFolder of colour-coded images (2 classes) and a dict store keyed by relative path"
    rng, store = np.random.default_rng(seed), {}
    for split in ("train", "val"):
        for c in ("a", "b"):
            for i in range(n_per_split):
                img, lm = _colour_coded(rng)
                rel = f"{split}/{c}/{i}.png"
                _write(root/rel, img)
                store[rel] = lm
    return store


def _decode_tokens(x: torch.Tensor, p: int):
    "Token labels read back from the colours of normalised crops: the 2x2 pixels at each patch's centre, -1 if mixed"
    img = NormalizeCrops().decodes((x,))[0].permute(0, 2, 3, 1).numpy().astype(np.int16)  # (B, S, S, 3)
    B, S = img.shape[:2]
    g, c = S // p, np.arange(S // p) * p + p // 2
    block = np.stack([img[:, c + dy][:, :, c + dx] for dy in (-1, 0) for dx in (-1, 0)], 1)  # (B, 4, g, g, 3)
    pure = (block == block[:, :1]).all((1, 4))  # (B, g, g) all four pixels equal
    match = (block[:, 0, :, :, None, :] == PALETTE.astype(np.int16)).all(-1)  # (B, g, g, K)
    lab = np.where(pure & match.any(-1), match.argmax(-1), -1)
    return lab.reshape(B, g * g)


def _check_alignment(xs, ms, p):
    "Compare decoded and delivered token labels; returns (#compared, #mismatches)"
    n = bad = 0
    for x, m in zip(xs, ms):
        lab = _decode_tokens(x, p)
        ok = lab >= 0
        n += ok.sum(); bad += (lab[ok] != m.numpy()[ok]).sum()
    return n, bad


def _alignment(dls, p, batches=6, multicrop=False):
    n = bad = total = 0
    for _ in range(batches):
        b = dls.train.one_batch()
        xs, ms = (b[0], b[1]) if multicrop else ([b[0]], [b[1]])
        k, e = _check_alignment(xs, ms, p)
        n, bad, total = n + k, bad + e, total + sum(m.numel() for m in ms)
    return n, bad, total


@pytest.fixture
def colour_data(tmp_path):
    root = tmp_path/"colour"
    return root, _colour_folder(root)


def test_alignment_pretrain(colour_data):
    root, store = colour_data
    random.seed(0)
    dls = pretrain_dls(root, store, img_size=64, patch_size=8, bs=6, num_workers=0, device="cpu")
    n, bad, total = _alignment(dls, 8)
    assert bad == 0 and n > 0.6 * total, (n, bad, total)  # every unambiguous token agrees, most are unambiguous


def test_alignment_fails_without_flipping_the_map(colour_data, monkeypatch):
    "The check above can fail: a loader that forgets to flip the label map is caught"
    root, store = colour_data
    orig = D.token_labels
    monkeypatch.setattr(D, "token_labels", lambda lm, box, hw, grid, flip=False: orig(lm, box, hw, grid, False))
    random.seed(0)
    dls = pretrain_dls(root, store, img_size=64, patch_size=8, bs=6, num_workers=0, device="cpu")
    n, bad, total = _alignment(dls, 8)
    assert bad > 0.05 * n, (n, bad, total)


def test_alignment_fails_with_a_shifted_box(colour_data, monkeypatch):
    "... and so is one that reads the map under a box off by a few pixels"
    root, store = colour_data
    orig = D.token_labels
    monkeypatch.setattr(D, "token_labels", lambda lm, box, hw, grid, flip=False:
                        orig(lm, (box[0], min(box[1] + 4, hw[1] - box[3]), box[2], box[3]), hw, grid, flip))
    random.seed(1)
    dls = pretrain_dls(root, store, img_size=64, patch_size=8, bs=6, num_workers=0, device="cpu")
    n, bad, total = _alignment(dls, 8)
    assert bad > 0, (n, bad, total)


def test_alignment_multicrop_and_labelled(colour_data, monkeypatch):
    root, store = colour_data
    monkeypatch.setattr(D, "photometric", lambda img, view, rng=None: img)  # colours must survive to be decoded
    random.seed(2)
    dls = multicrop_dls(root, store, global_size=64, local_size=32, n_local=3, patch_size=8, bs=6, num_workers=0,
                        device="cpu")
    n, bad, total = _alignment(dls, 8, batches=3, multicrop=True)
    assert bad == 0 and n > 0.6 * total, (n, bad, total)
    for augment in ("linear", "none"):
        dls = labelled_dls(root, store, img_size=48, patch_size=16, bs=6, augment=augment, num_workers=0, device="cpu")
        n, bad, total = _alignment(dls, 16, batches=3)
        assert bad == 0 and n > 0.2 * total, (augment, n, bad, total)  # centre crops: fewer clean patch centres


def test_photometric_touches_image_only(colour_data):
    "With DINO's colour changes the crops change colour but `m` is the one of the geometry alone"
    root, store = colour_data
    dls = multicrop_dls(root, store, global_size=64, local_size=32, n_local=2, patch_size=8, bs=6, num_workers=0,
                        device="cpu")
    ds, seen = dls.train_ds, []
    for seed in range(4):
        random.seed(seed); item = ds[0]
        random.seed(seed); boxes = []
        # replay the random draws: crop box and flip of each view, then the colour draws that follow
        img = load_image(ds.files[0]); H, W = img.shape[:2]
        for v, x, m in zip(ds.views, *item):
            box = D.crop_box(H, W, v); flip = random.random() < v.flip
            D.photometric(Image.fromarray(x.numpy()), v)  # consume the same colour draws
            np.testing.assert_array_equal(m.numpy(), token_labels(store[ds.keys[0]], box, (H, W), v.size // 8, flip))
            seen.append(x.numpy())
    # the colour changes did happen: some crop has colours outside the palette
    in_palette = lambda o: (o.reshape(-1, 1, 3) == PALETTE).all(-1).any(-1).all()
    assert not all(in_palette(o) for o in seen)


def test_multicrop_shapes(tmp_path):
    root = tmp_path/"d"
    store = _colour_folder(root, 2)
    dls = multicrop_dls(root, store, global_size=64, local_size=48, n_local=5, patch_size=16, bs=4, num_workers=0,
                        device="cpu")
    crops, ms = dls.one_batch()
    assert dls.n_inp == 2 and len(crops) == len(ms) == 7
    assert [tuple(c.shape) for c in crops] == [(4, 3, 64, 64)] * 2 + [(4, 3, 48, 48)] * 5
    assert [tuple(m.shape) for m in ms] == [(4, 16)] * 2 + [(4, 9)] * 5
    assert all(m.dtype == torch.int64 for m in ms) and all(c.dtype == torch.float32 for c in crops)
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        multicrop_dls(root, store, global_size=64, local_size=40, patch_size=16)


def test_pretrain_batch_contract(tmp_path):
    root = tmp_path/"d"
    store = _colour_folder(root, 2)
    dls = pretrain_dls(root, store, img_size=32, patch_size=16, bs=4, num_workers=0, device="cpu")
    x, m = dls.one_batch()
    assert (x.shape, m.shape, x.dtype, m.dtype, dls.n_inp) == ((4, 3, 32, 32), (4, 4), torch.float32, torch.int64, 2)
    assert x.is_contiguous() and dls.has_masks and int(m.max()) <= 7
    # ImageNet normalisation: the palette's 0 and 255 map to (0 - mean) / std and (1 - mean) / std
    lo = torch.tensor([(0 - a) / s for a, s in zip(D.IMAGENET_MEAN, D.IMAGENET_STD)])
    assert torch.allclose(x.amin((0, 2, 3)), lo, atol=1e-5)
    xv, mv = dls.valid.one_batch()
    assert xv.shape == (4, 3, 32, 32) and len(dls.valid_ds) == 4


def test_missing_masks_error_lists_files(tmp_path):
    root = tmp_path/"d"
    store = _colour_folder(root, 3)
    partial = {k: v for k, v in store.items() if not k.endswith("/0.png")}
    with pytest.raises(MissingMasksError) as e:
        pretrain_dls(root, partial, img_size=32, patch_size=16, bs=2, num_workers=0, device="cpu")
    msg = str(e.value)
    assert "2 of 6 images" in msg and "train/a/0.png" in msg and "train/b/0.png" in msg
    assert "--missing-masks empty" in msg and "missing_masks='empty'" in msg  # the command's and Python's spelling
    files = [root/f"train/a/{i}.png" for i in range(8)]
    with pytest.raises(MissingMasksError, match=r"8 of 8 images .*train/a/4.png and 3 more"):
        mask_keys(files, root, {})
    with pytest.raises(ValueError, match="'error' or 'empty'"):
        mask_keys(files, root, {}, "zeros")


def test_missing_masks_empty_gives_zeros(tmp_path):
    root = tmp_path/"d"
    store = _colour_folder(root, 3)
    store = {k: v + 1 for k, v in store.items()}  # no label 0 anywhere in the stored maps
    partial = {k: v for k, v in store.items() if not k.endswith("/0.png")}
    dls = labelled_dls(root, partial, img_size=32, patch_size=16, bs=6, augment="none", missing_masks="empty",
                       num_workers=0, device="cpu")
    assert (dls.train_ds.n_missing, dls.valid_ds.n_missing) == (2, 2)
    ds = dls.valid_ds
    for i, f in enumerate(ds.files):
        x, m, y = ds[i]
        assert (m == 0).all() if f.name == "0.png" else (m > 0).all(), f
    free = labelled_dls(root, None, img_size=32, patch_size=16, bs=6, num_workers=0, device="cpu")
    x, m, y = free.one_batch()
    assert not free.has_masks and (m == 0).all() and m.shape == (6, 4)


def test_mask_lookup_order(tmp_path):
    "Relative key first, then the absolute path (a store built on `train/` alone)"
    root = tmp_path/"d"
    store = _colour_folder(root, 1)
    f = root/"train/a/0.png"
    both = {"train/a/0.png": np.full((80, 96), 3, np.uint8), str(f.absolute()): np.full((80, 96), 5, np.uint8)}
    ds = MaskedImages([f], root, [D.eval_view(32)], both, 16)
    assert ds.keys == ["train/a/0.png"] and (ds[0][1] == 3).all()
    ds = MaskedImages([f], root, [D.eval_view(32)], {str(f.absolute()): both[str(f.absolute())]}, 16)
    assert ds.keys == [str(f.absolute())] and (ds[0][1] == 5).all()


def test_bad_inputs_are_named(tmp_path):
    root = tmp_path/"d"
    store = _colour_folder(root, 1)
    bad = root/"train/a/broken.png"; bad.write_bytes(b"not an image")
    store["train/a/broken.png"] = np.zeros((80, 96), np.uint8)
    ds = MaskedImages([bad], root, [D.eval_view(32)], store, 16)
    with pytest.raises(ValueError, match="broken.png"): ds[0]
    f = root/"train/a/0.png"
    for lm, match in ((np.zeros((96, 80), np.uint8), "aligned"), (np.zeros((80, 96), np.float32), "integer")):
        ds = MaskedImages([f], root, [D.eval_view(32)], {"train/a/0.png": lm}, 16)
        with pytest.raises(ValueError, match=match): ds[0]
    # a map stored at half the image's resolution (16-px blocks become 8-px blocks) gives the same labels
    lm = store["train/a/0.png"]
    for seed in range(5):
        random.seed(seed); full = MaskedImages([f], root, [D.View(32)], {"train/a/0.png": lm}, 8)[0][1]
        random.seed(seed); half = MaskedImages([f], root, [D.View(32)], {"train/a/0.png": lm[::2, ::2]}, 8)[0][1]
        assert torch.equal(full, half)


def _class_folder(root: Path, counts: dict, ext="JPEG", size=8):
    for c, n in counts.items():
        for i in range(n): _write(root/"train"/c/f"{c}_{i}.{ext}", np.full((size, size, 3), i % 255, np.uint8))
        _write(root/"val"/c/f"{c}_val.{ext}", np.zeros((size, size, 3), np.uint8))


def test_fraction_subsets(tmp_path):
    _class_folder(tmp_path, {"n01": 200, "n02": 50, "n03": 7})
    kw = dict(img_size=16, patch_size=16, bs=4, num_workers=0, device="cpu")
    for fraction, expected in ((0.01, [2, 1, 1]), (0.1, [20, 5, 1])):
        dls = labelled_dls(tmp_path, fraction=fraction, seed=3, **kw)
        assert np.bincount(dls.train_ds.labels).tolist() == expected
        assert dls.vocab == ["n01", "n02", "n03"] and len(dls.valid_ds) == 3
    a = labelled_dls(tmp_path, fraction=0.1, seed=3, **kw).train_ds.files
    assert a == labelled_dls(tmp_path, fraction=0.1, seed=3, **kw).train_ds.files
    assert a != labelled_dls(tmp_path, fraction=0.1, seed=4, **kw).train_ds.files
    with pytest.raises(ValueError, match="not both"):
        labelled_dls(tmp_path, fraction=0.1, subset_file=tmp_path/"x.txt", **kw)


def test_subset_file(tmp_path):
    _class_folder(tmp_path, {"n01440764": 5, "n02102040": 4})
    lst = tmp_path/"1percent.txt"
    lst.write_text("n01440764_1.JPEG\nn01440764_3.JPEG\n\nn02102040_0.JPEG\nn09999999_7.JPEG\n")  # last: other class
    dls = labelled_dls(tmp_path, subset_file=lst, img_size=16, patch_size=16, bs=2, num_workers=0, device="cpu")
    assert sorted(f.name for f in dls.train_ds.files) == ["n01440764_1.JPEG", "n01440764_3.JPEG", "n02102040_0.JPEG"]
    assert dls.train_ds.labels == [0, 0, 1]
    lst.write_text("n01440764_1.JPEG\nn01440764_99.JPEG\n")
    with pytest.raises(FileNotFoundError, match=r"1 files .*n01440764/n01440764_99.JPEG"):
        read_subset_file(lst, image_files(tmp_path/"train"))
    lst.write_text("n09999999_7.JPEG\n")
    with pytest.raises(ValueError, match="none of the 1 files"):
        read_subset_file(lst, image_files(tmp_path/"train"))


def test_imagenet100_selection(tmp_path):
    wnids = imagenet100_classes()
    assert len(wnids) == 100 and len(set(wnids)) == 100 and all(re.fullmatch(r"n\d{8}", w) for w in wnids)
    assert wnids == (Path(DS.__file__).parent/"assets"/"imagenet100_classes.txt").read_text().split()
    src = tmp_path/"imagenet"
    _class_folder(src, {wnids[0]: 2, wnids[1]: 3, wnids[2]: 1, "n00000001": 2})  # the last one is not in the list
    with pytest.raises(FileNotFoundError, match="194 of the 200 class folders"):
        imagenet100(src, tmp_path/"in100")
    dest = imagenet100(src, tmp_path/"in100", classes=wnids[:3])
    assert sorted(p.name for p in (dest/"train").iterdir()) == sorted(wnids[:3])
    assert all((dest/s/w).is_symlink() for s in ("train", "val") for w in wnids[:3])
    dls = labelled_dls(dest, {f"train/{wnids[1]}/{wnids[1]}_0.JPEG": np.zeros((8, 8), np.uint8)}, img_size=16,
                       patch_size=16, bs=2, missing_masks="empty", num_workers=0, device="cpu")
    assert dls.vocab == sorted(wnids[:3]) and len(dls.train_ds) == 6 and dls.train_ds.n_missing == 5
    assert imagenet100(src, tmp_path/"in100", classes=wnids[:3]) == dest  # again: nothing changes
    imagenet100(src, tmp_path/"in100", classes=wnids[1:3])  # another list: stale links go
    assert sorted(p.name for p in (dest/"val").iterdir()) == sorted(wnids[1:3])


def test_imagenette_local_and_offline(tmp_path, monkeypatch):
    _class_folder(tmp_path/"imagenette2-320", {"n01440764": 2})
    assert imagenette(tmp_path/"imagenette2-320") == tmp_path/"imagenette2-320"
    with pytest.raises(FileNotFoundError, match="ImageFolder"):
        imagenette(tmp_path)

    def offline(url, *a, **k): raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(DS, "untar_data", offline)
    with pytest.raises(RuntimeError) as e:
        imagenette()
    msg = str(e.value)
    assert "imagenette2-320.tgz" in msg and "imagenette(path=...)" in msg and "--data" in msg
    monkeypatch.setattr(DS, "untar_data", lambda url, *a, **k: tmp_path/"imagenette2-320")
    assert imagenette() == tmp_path/"imagenette2-320"  # online (or cached): untar_data's folder


def test_embedded_determinism(tmp_path):
    a = make_embedded(tmp_path/"a", n_train=2, n_val=1, progress=False)
    b = make_embedded(tmp_path/"b", n_train=2, n_val=1, progress=False)
    assert len(image_files(a)) == 30 and folder_digest(a) == folder_digest(b)
    c = make_embedded(tmp_path/"c", n_train=2, n_val=1, seed=1, progress=False)
    assert folder_digest(a) != folder_digest(c)
    img = np.asarray(Image.open(a/"train/red_circle/0000.png"))
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8 and len(np.unique(img.reshape(-1, 3), axis=0)) > 100


def test_embedded_dataset():
    root = embedded_dataset(progress=False)
    meta = json.loads((root/"embedded.json").read_text())
    files, labels, vocab = D.image_folder(root)
    n_train, n_val = DS.EMBEDDED_CONFIG["n_train"], DS.EMBEDDED_CONFIG["n_val"]  # v3: 200 and 100 per class
    assert (n_train, n_val) == (200, 100)
    assert len(vocab) == 10 and np.bincount(labels).tolist() == [n_train] * 10
    assert len(image_files(root/"val")) == 10 * n_val
    assert meta["sha256"] == folder_digest(root) and meta["config"] == DS.EMBEDDED_CONFIG
    stamp = (root/"embedded.json").stat().st_mtime_ns
    assert embedded_dataset(progress=False) == root and (root/"embedded.json").stat().st_mtime_ns == stamp


def test_embedded_dataset_redoes_half_written(monkeypatch):
    monkeypatch.setattr(DS, "EMBEDDED_CONFIG", dict(DS.EMBEDDED_CONFIG, n_train=2, n_val=1))
    root = embedded_dataset(progress=False)
    meta = json.loads((root/"embedded.json").read_text())
    assert len(image_files(root)) == 30
    calls, orig = [], DS.make_embedded
    monkeypatch.setattr(DS, "make_embedded", lambda *a, **k: calls.append(1) or orig(*a, **k))
    assert embedded_dataset(progress=False) == root and calls == []  # complete: nothing to do
    (root/"embedded.json").unlink(); image_files(root)[0].write_bytes(b"")  # interrupted: no marker, a broken file
    assert embedded_dataset(progress=False) == root and calls == [1]
    assert folder_digest(root) == meta["sha256"]  # generated again, the same bytes
    monkeypatch.setattr(DS, "EMBEDDED_CONFIG", dict(DS.EMBEDDED_CONFIG, n_train=3))  # another configuration
    assert embedded_dataset(progress=False) == root and calls == [1, 1] and len(image_files(root)) == 40


class PngStore:
    "A tiny mask store: label maps as PNG files, keyed by absolute image path (like a store built on `train/`)"
    def __init__(self, root): self.root = Path(root)
    def _f(self, key): return self.root/(str(key).strip("/").replace("/", "__") + ".png")
    def __contains__(self, key): return self._f(key).is_file()
    def __getitem__(self, key):
        if key not in self: raise KeyError(key)
        return np.asarray(Image.open(self._f(key)))
    def add(self, key, lm): Image.fromarray(lm).save(self._f(key))


def test_imagenette_mini(imagenette, tmp_path):
    "Real photos: each image's map is constant, label 1 + class % 5, so `m` must match `y` token by token"
    store = PngStore(tmp_path)
    files, labels, vocab = D.image_folder(imagenette)
    vfiles, vlabels, _ = D.image_folder(imagenette, "val", vocab)
    for f, y in zip(files + vfiles, labels + vlabels):
        w, h = Image.open(f).size
        store.add(str(f.absolute()), np.full((h, w), 1 + y % 5, np.uint8))
    dls = labelled_dls(imagenette, store, img_size=64, patch_size=16, bs=16, augment="finetune", fraction=0.1,
                       num_workers=0, device="cpu")
    assert dls.vocab == sorted(p.name for p in (imagenette/"train").iterdir()) and dls.c == 10
    assert len(dls.train_ds) == 30 and np.bincount(dls.train_ds.labels).tolist() == [3] * 10
    for dl in (dls.train, dls.valid):
        x, m, y = dl.one_batch()
        assert x.shape == (16, 3, 64, 64) and m.shape == (16, 16)
        assert torch.equal(m, (1 + y % 5)[:, None].expand(-1, 16))
    dls = pretrain_dls(imagenette, store, img_size=64, patch_size=16, bs=8, num_workers=0, device="cpu")
    x, m = dls.one_batch()
    assert x.shape == (8, 3, 64, 64) and m.shape == (8, 16) and (m > 0).all()


def test_bench_data_cli(tmp_path):
    _colour_folder(tmp_path, 4)
    out = subprocess.run([sys.executable, "-c", "from mgab.bench import main; main()", "data", "--data", str(tmp_path),
                          "--img-size", "32", "--bs", "4", "--batches", "2", "--rounds", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert re.fullmatch(r"data: ratio=\d+\.\d+", lines[-1]), lines[-1]
    rel = {l.split()[0]: re.search(r" (\d+\.\d+)x images\)", l).group(1) for l in lines if "x images)" in l}
    assert list(rel) == ["masks", "images", "in-memory"] and rel["images"] == "1.000", lines
    assert lines[-1] == f"data: ratio={rel['masks']}"  # the ratio is the masks loader's rate over the images-only one


def test_embedded_masker_is_an_ideal_segmenter(tmp_path):
    "The regions the generator drew come back as SAM-style masks: objects whole, ranked, c kept, stand-in recorded"
    from mgab.datasets import EmbeddedMasker, pixel_digest
    from mgab.masks import load_image
    from mgab.store import MaskStore, make_mask_store, store_stats
    root = make_embedded(tmp_path/"emb", n_train=6, n_val=2, progress=False)
    masker = EmbeddedMasker(root)
    z = np.load(root/"regions.npz")
    assert len(z["keys"]) == len(image_files(root)) == 80
    for key, owner in zip(z["keys"][::7], z["owner"][::7]):
        img = load_image(root/str(key))
        lm = masker(img)
        assert pixel_digest(img) in masker.index and lm.shape == owner.shape == (64, 64)
        # every kept mask is exactly one drawn region (an object or the background): never split, never merged
        for k in range(1, lm.max() + 1):
            regions = np.unique(owner[lm == k])
            assert len(regions) == 1 and (lm == k).sum() == (owner == regions[0]).sum()
        # more confident first: objects (visible fraction) before the background
        confs = {a["area"]: a["predicted_iou"] for a in masker.annotations(img)}
        ranked = [confs[int((lm == k).sum())] for k in range(1, lm.max() + 1)]
        assert ranked == sorted(ranked, reverse=True)
    assert EmbeddedMasker(root, c=2)(img).max() <= 2 and EmbeddedMasker(root, background=False)(img)[owner == 1].max() == 0
    # the background region (owner 1) is always kept: at most 4 objects + the background fit in c = 5
    for key, owner in zip(z["keys"], z["owner"]):
        lm = masker(load_image(root/str(key)))
        assert (lm[owner == 1] > 0).all() and (lm[owner == 0] == 0).all()
    store = make_mask_store(root, tmp_path/"store", masker, progress=False)
    s = store_stats(store)
    assert MaskStore(store.root).stand_in and s["n"] == 80
    assert 0.65 < s["mean_coverage"] < 0.85  # SAM's c=5 masks cover 70-73% of ImageNet photos (paper, Table 3)
    assert 0.45 < s["coverage"].min() and s["coverage"].max() < 0.97  # unimodal: no image all or barely covered
    with pytest.raises(ValueError, match="not in the embedded dataset"):
        masker(np.full((64, 64, 3), 7, np.uint8))
    old = tmp_path/"v2"; old.mkdir()  # regions of version 2 (no `version` key): owner 0 meant the whole background
    np.savez(old/"regions.npz", **{k: z[k] for k in z.files if k != "version"})
    with pytest.raises(ValueError, match="older drawing of the embedded dataset"): EmbeddedMasker(old)

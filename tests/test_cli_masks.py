"`mgab-masks` and `mgab-bench masks` as a user runs them: subprocesses on real photos and on odd generated images."
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mgab.masks import list_images, load_image
from mgab.mre import store_token_stats, token_line
from mgab.store import MaskStore, shard_of, verify_store

REPO = Path(__file__).resolve().parents[1]
MASKS = [sys.executable, "-c", "import sys; from mgab.cli.masks import main; sys.exit(main())"]


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.update(extra)
    return env


def run_masks(*args, env=None, timeout=300):
    return subprocess.run(MASKS + [str(a) for a in args], capture_output=True, text=True, env=env or _env(),
                          timeout=timeout)


def _subset(imagenette, dst, n):
    "Copy n photos, spread over classes, into dst (a temporary folder)"
    files = sorted(imagenette.glob("train/*/*.JPEG"))
    for f in files[:: max(1, len(files) // n)][:n]:
        (dst / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dst / f.parent.name / f.name)
    return dst


def _counts(stdout):
    m = re.search(r"computed (\d+), skipped (\d+) already done, (\d+) unreadable", stdout)
    assert m, stdout
    return tuple(int(x) for x in m.groups())


def test_cli_imagenette(imagenette, tmp_path):
    imgs = _subset(imagenette, tmp_path / "imgs", 20)
    out = run_masks(imgs, "--out", tmp_path / "store")
    assert out.returncode == 0, out.stderr
    assert "superpixel stand-in (felzenszwalb), NOT from SAM" in out.stderr  # the default, and it says so
    assert "\r" not in out.stderr and "img/s" not in out.stderr  # stderr is a pipe: no bar frames, as in a log
    assert _counts(out.stdout) == (20, 0, 0) and "STAND-IN" in out.stdout
    store = MaskStore(tmp_path / "store")
    assert len(store) == 20 and store.info["generator"] == "superpixel" and store.info["stand_in"]
    # the settings record the calibrated skimage arguments, so a store of other defaults is never resumed with these
    assert store.info["settings"] == dict(method="felzenszwalb", c=5, points_per_side=32,
                                          skimage=dict(scale=430, sigma=0.8, min_size="H*W/1024"))
    k = next(iter(store))
    assert store[k].shape == load_image(imgs / k).shape[:2] and 1 <= store[k].max() <= 5
    sizes = [store.entry_path(k).stat().st_size for k in store]
    assert max(sizes) < 10_000, sizes
    v = run_masks("--verify", tmp_path / "store", imgs)
    assert v.returncode == 0, v.stdout + v.stderr
    assert "20 ok, 0 missing, 0 stale, 0 corrupt" in v.stdout and "verify: OK" in v.stdout
    # the other generator, the c and grid options
    out = run_masks(imgs, "--out", tmp_path / "slic", "--generator", "superpixel", "--method", "slic", "--c", "3",
                    "--points-per-side", "16", "--no-progress")
    assert out.returncode == 0, out.stderr
    assert "NOT from SAM" not in out.stderr and out.stderr.strip() == ""  # asked for explicitly; no bar
    s2 = MaskStore(tmp_path / "slic")
    assert s2.info["settings"] == dict(method="slic", c=3, points_per_side=16,
                                       skimage=dict(n_segments=12, compactness=28, start_label=1))
    assert max(int(s2[k].max()) for k in s2) == 3


def test_summary_ends_with_the_token_line(tmp_path):
    "Any store's summary says how its masks reach the tokens (here 3 drawn images, no photos needed)"
    from PIL import Image
    imgs, rng = tmp_path / "imgs", np.random.default_rng(0)
    imgs.mkdir()
    for i in range(3):
        a = np.full((64, 64, 3), 40, np.uint8)
        a[:32] = (200, 30, 30); a[40:, :24] = (20, 200, 20)  # two regions on a background
        Image.fromarray(a + rng.integers(0, 10, a.shape, dtype=np.uint8)).save(imgs / f"{i}.png")
    r = subprocess.run(["mgab-masks", str(imgs), "--out", str(tmp_path / "s"), "--generator", "superpixel",
                        "--token-grid", "8", "--no-progress"], capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last == token_line(store_token_stats(MaskStore(tmp_path / "s"), 8)) and "8x8 token grid" in last, last


def test_cli_coverage_line_entry_point(imagenette, tmp_path):
    "The installed `mgab-masks` prints the store's mean coverage beside SAM's published 70.4-72.7% (Table 3)"
    exe = shutil.which("mgab-masks")
    if exe is None: pytest.skip("the mgab-masks entry point is not installed (pip install -e .)")
    imgs = _subset(imagenette, tmp_path / "imgs", 10)
    store_dir = tmp_path / "store"
    out = subprocess.run([exe, str(imgs), "--out", str(store_dir), "--no-progress"], capture_output=True, text=True,
                         env=_env(), timeout=300)
    assert out.returncode == 0, out.stderr
    store = MaskStore(store_dir)
    cov = np.mean([(store[k] > 0).mean() for k in store])
    masks = np.mean([store[k].max() for k in store])
    line, tokens = out.stdout.strip().splitlines()[-2:]
    assert line.startswith(f"mean coverage {cov:.1%} over 10 images (SAM ViT-H in the paper: 70.4-72.7%, Table 3; "
                           "72.7% at 32x32); " f"{masks:.1f} masks per image"), line
    assert line.endswith("generator: superpixel stand-in (felzenszwalb, 32x32 calibration), NOT SAM"), line
    assert 0.5 < cov < 0.95, cov  # calibrated to SAM's coverage (test_masks checks the band on 60 photos)
    # how the masks reach the tokens: at the paper's ViT-B/16 grid by default, or at --token-grid
    s = store_token_stats(store, 14)
    assert tokens == token_line(s) and tokens.startswith("at the 14x14 token grid: "), tokens
    for args in (["--verify", str(store_dir)], ["--summary", str(store_dir)]):
        again = subprocess.run([exe, *args, "--no-progress"], capture_output=True, text=True, env=_env(), timeout=300)
        assert again.returncode == 0, again.stdout + again.stderr
        assert again.stdout.strip().splitlines()[-2:] == [line, tokens], again.stdout
    again = subprocess.run([exe, "--summary", str(store_dir), "--token-grid", "4", "--mask-ratio", "0.5"],
                           capture_output=True, text=True, env=_env(), timeout=300)
    assert again.stdout.strip().splitlines()[-1] == token_line(store_token_stats(store, 4, 0.5)), again.stdout
    assert subprocess.run([exe, "--summary", str(tmp_path / "nostore")], capture_output=True, text=True,
                          env=_env(), timeout=300).returncode == 1


def test_cli_interrupt_and_resume(imagenette, tmp_path):
    imgs = _subset(imagenette, tmp_path / "imgs", 40)
    store_dir = tmp_path / "store"
    proc = subprocess.Popen(MASKS + [str(imgs), "--out", str(store_dir), "--no-progress"], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(list(store_dir.glob("masks/*/*.png"))) >= 3: break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, "mgab-masks finished before it could be killed: test is invalid"
    done = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in store_dir.glob("masks/*/*.png")}
    assert 3 <= len(done) < 40, len(done)
    out = run_masks(imgs, "--out", store_dir)
    assert out.returncode == 0, out.stderr
    assert _counts(out.stdout) == (40 - len(done), len(done), 0)  # nothing done is recomputed
    for p, stamp in done.items():
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == stamp, p  # ... nor rewritten
    assert len(MaskStore(store_dir)) == 40
    assert not [p for p in store_dir.rglob("*") if p.name.endswith(".tmp")]  # no half-written entry remains
    v = run_masks("--verify", store_dir, imgs)
    assert v.returncode == 0 and "40 ok, 0 missing, 0 stale, 0 corrupt" in v.stdout, v.stdout


def _odd_folder(d):
    d.mkdir(parents=True)
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:72, :96]
    rgb = np.stack([(xx * 2) % 256, (yy * 3) % 256, ((xx // 24 + yy // 24) % 2) * 200], -1).astype(np.uint8)
    rgb = np.clip(rgb.astype(int) + rng.integers(-10, 10, rgb.shape), 0, 255).astype(np.uint8)
    Image.fromarray(rgb).save(d / "photo.jpg", quality=92)
    Image.fromarray(rgb[..., 0]).save(d / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 200, np.uint8)])).save(d / "rgba.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(d / "deep16.png")
    (d / "corrupt.jpg").write_bytes((d / "photo.jpg").read_bytes()[:400])
    (d / "empty.jpg").write_bytes(b"")
    return d


def test_cli_odd_images(tmp_path):
    d = _odd_folder(tmp_path / "odd")
    out = run_masks(d, "--out", tmp_path / "store", "--points-per-side", "8", "--no-progress")
    assert out.returncode == 0, out.stderr  # unreadable images never abort the run
    assert _counts(out.stdout) == (4, 0, 2)
    assert re.search(r"unreadable: corrupt\.jpg: cannot read image .*corrupt\.jpg", out.stdout), out.stdout
    assert "unreadable: empty.jpg" in out.stdout
    store = MaskStore(tmp_path / "store")
    assert sorted(store) == ["deep16.png", "gray.png", "photo.jpg", "rgba.png"]
    for k in store: assert store[k].shape == (72, 96) and store[k].dtype == np.uint8 and store[k].max() >= 1
    # 16-bit gray image was scaled, so it segments like its 8-bit twin
    np.testing.assert_array_equal(store["deep16.png"], store["gray.png"])
    errors = json.loads((tmp_path / "store" / "errors" / "shard-0-of-1.json").read_text())
    assert sorted(errors) == ["corrupt.jpg", "empty.jpg"] and "corrupt.jpg" in errors["corrupt.jpg"]["error"]
    v = run_masks("--verify", tmp_path / "store", d, "--no-progress")
    assert v.returncode == 0, v.stdout
    assert "4 ok" in v.stdout and "2 unreadable" in v.stdout and "unreadable: corrupt.jpg" in v.stdout
    again = run_masks(d, "--out", tmp_path / "store", "--points-per-side", "8", "--no-progress")
    assert _counts(again.stdout) == (0, 4, 2)  # broken files are retried, finished ones skipped


def test_cli_verify_stale_corrupt_missing(tmp_path):
    d = _odd_folder(tmp_path / "odd")
    args = [d, "--out", tmp_path / "store", "--points-per-side", "8", "--no-progress"]
    assert run_masks(*args).returncode == 0
    store = MaskStore(tmp_path / "store")
    Image.open(d / "gray.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(d / "gray.png")  # changed later
    store.entry_path("rgba.png").write_bytes(store.entry_path("photo.jpg").read_bytes()[:-100])  # damaged
    store.entry_path("photo.jpg").unlink()
    v = run_masks("--verify", tmp_path / "store", d)
    assert v.returncode == 1
    for line in ("stale: gray.png", "corrupt: rgba.png", "missing: photo.jpg", "verify: FAILED",
                 "1 ok, 1 missing, 1 stale, 1 corrupt"):
        assert line in v.stdout, v.stdout
    out = run_masks(*args)
    assert _counts(out.stdout) == (3, 1, 2)  # exactly the three bad entries are redone
    v = run_masks("--verify", tmp_path / "store")  # IMAGE_DIR defaults to where the store was built from
    assert v.returncode == 0, v.stdout
    np.testing.assert_array_equal(store["gray.png"].shape, (72, 96))


def test_cli_parallel_shards(imagenette, tmp_path):
    imgs = _subset(imagenette, tmp_path / "imgs", 12)
    procs = [subprocess.Popen(MASKS + [str(imgs), "--out", str(tmp_path / "store"), "--shard", str(i),
                                       "--num-shards", "2", "--no-progress", "--method", "slic"],
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    computed = [_counts(o[0])[0] for o in outs]
    keys = list_images(imgs)  # the store's keys
    assert computed == [sum(shard_of(k, 2) == i for k in keys) for i in range(2)] and sum(computed) == 12  # disjoint
    res = verify_store(tmp_path / "store")
    assert res["ok"] == 12 and not (res["missing"] or res["stale"] or res["corrupt"])


def test_cli_generators_and_errors(tmp_path, capsys, monkeypatch):
    from mgab.cli.masks import main
    d = _odd_folder(tmp_path / "odd")

    def run(*args):
        capsys.readouterr()
        try: rc = main([str(a) for a in args])
        except SystemExit as e: rc = e.code
        return rc, capsys.readouterr()

    rc, out = run(d, "--out", tmp_path / "s1", "--generator", "sam")
    assert rc == 1 and "needs --checkpoint" in out.err and "model-checkpoints" in out.err
    rc, out = run(d, "--out", tmp_path / "s1", "--checkpoint", tmp_path / "sam_vit_b_01ec64.pth",
                  "--model-type", "vit_b")
    assert rc == 1 and "Traceback" not in out.err
    assert "sam_vit_b_01ec64.pth" in out.err and "'vit_b'" in out.err and "Model Checkpoints" in out.err
    rc, out = run(tmp_path / "nowhere", "--out", tmp_path / "s1")
    assert rc == 1 and "nowhere" in out.err
    rc, out = run(d)
    assert rc == 2 and "--out" in out.err
    rc, out = run("--verify", tmp_path / "nostore", d)
    assert rc == 1 and "not a mask store" in out.err
    # a user's own generator, MODULE:NAME
    (tmp_path / "plug").mkdir()
    (tmp_path / "plug" / "my_masker.py").write_text(
        "import numpy as np\n"
        "class Halves:\n"
        "    info = dict(generator='halves', stand_in=False, description='test', settings=dict(side='left'))\n"
        "    def __call__(self, img):\n"
        "        lm = np.zeros(img.shape[:2], np.uint8); lm[:, :img.shape[1] // 2] = 1; return lm\n"
        "def make(): return Halves()\n")
    monkeypatch.syspath_prepend(str(tmp_path / "plug"))
    rc, out = run(d, "--out", tmp_path / "s2", "--generator", "my_masker:make", "--no-progress")
    assert rc == 0, out.err
    store = MaskStore(tmp_path / "s2")
    assert store.info["generator"] == "halves" and store.info["settings"] == {"side": "left"}
    assert store["photo.jpg"][:, :48].min() == 1 and store["photo.jpg"][:, 48:].max() == 0
    rc, out = run(d, "--out", tmp_path / "s3", "--generator", "my_masker:nothing")
    assert rc == 1 and "my_masker:nothing" in out.err


@pytest.mark.slow
def test_cli_sam_checkpoint_vit_b(tmp_path, vit_b_checkpoint):
    "The SAM path of the command with a real registry model (vit_b, random weights saved to a file)"
    ckpt = vit_b_checkpoint
    d = tmp_path / "imgs"; d.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(d / "a.png")
    out = run_masks(d, "--out", tmp_path / "store", "--checkpoint", ckpt, "--model-type", "vit_b",
                    "--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0",
                    "--device", "cpu", timeout=900)
    assert out.returncode == 0, out.stderr
    store = MaskStore(tmp_path / "store")
    assert store.info["generator"] == "sam" and store.info["settings"]["model_type"] == "vit_b"
    assert store.info["settings"]["checkpoint"] == ckpt.name and store["a.png"].shape == (64, 80)


def test_bench_masks_cli():
    code = "import sys; from mgab.bench import main; sys.exit(main())"
    out = subprocess.run([sys.executable, "-c", code, "masks", "--n", "3", "--seconds", "1", "--sam", "tiny",
                          "--points-per-side", "4"], capture_output=True, text=True, timeout=300, env=_env())
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"masks: ratio=(\d+\.\d+) felzenszwalb=(\d+\.\d+) slic=(\d+\.\d+) sam_tiny=(\d+\.\d+) img/s "
                     r"bytes_per_entry=(\d+)", last)
    assert m, last
    fz = re.search(r"felzenszwalb +(\d+\.\d+) img/s masker +\| store +(\d+\.\d+) img/s, +(\d+) B/entry", out.stdout)
    rates = {k: re.search(rf"{k} +(\d+\.\d+) img/s masker", out.stdout).group(1) for k in ("slic", "sam_tiny")}
    assert (m[2], m[3], m[4], m[5]) == (fz[1], rates["slic"], rates["sam_tiny"], fz[3]), out.stdout  # as per line
    assert float(m[1]) == pytest.approx(float(fz[2]) / float(fz[1]), rel=0.02)  # store rate over masker rate
    assert "(stand-in)" in out.stdout and "random weights" in out.stdout

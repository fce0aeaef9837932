"One mask store filled by several `mgab-masks` processes (issue 12, item 3): disjoint shards, a killed shard resumed alone."
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mgab.store import MaskStore, shard_of, verify_store

ROOT = Path(__file__).resolve().parents[1]
GEN = ["--generator", "shard_helpers:hanging_masker", "--no-progress"]


def _env(**extra):
    path = os.pathsep.join([str(ROOT), str(ROOT/"tests")] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", **extra)


def _images(d: Path, n: int) -> list[str]:
    rng = np.random.default_rng(0)
    for i in range(n):
        img = np.full((48, 48, 3), 30, np.uint8)
        y, x = rng.integers(8, 40, 2)
        img[max(0, y - 8):y + 8, max(0, x - 8):x + 8] = rng.integers(60, 255, 3)
        (d/f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d/f"c{i % 2}"/f"{i:02d}.png")
    return sorted(f"c{i % 2}/{i:02d}.png" for i in range(n))


def _counts(out: str) -> tuple[int, int]:
    m = re.search(r"computed (\d+), skipped (\d+) already done", out)
    assert m, out
    return int(m[1]), int(m[2])


def test_two_shards_one_store_and_a_killed_shard_resumes_alone(tmp_path):
    keys = _images(tmp_path/"imgs", 16)
    mine = {i: [k for k in keys if shard_of(k, 2) == i] for i in (0, 1)}
    assert len(mine[1]) >= 4, mine  # the fixed hash gives shard 1 enough images to be killed mid-way
    store, marker = tmp_path/"store", tmp_path/"hung"
    base = ["mgab-masks", str(tmp_path/"imgs"), "--out", str(store), "--num-shards", "2", *GEN]
    p0 = subprocess.Popen(base + ["--shard", "0"], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
    p1 = subprocess.Popen(base + ["--shard", "1"], env=_env(HANG_AFTER="2", HANG_MARKER=str(marker)),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out0, err0 = p0.communicate(timeout=300)
    assert p0.returncode == 0, err0
    deadline = time.time() + 300
    while not marker.exists() and p1.poll() is None and time.time() < deadline: time.sleep(0.05)
    p1.send_signal(signal.SIGKILL); p1.wait(30)
    assert p1.returncode == -signal.SIGKILL and marker.read_text() == "2", (p1.returncode, p1.stderr.read())
    assert _counts(out0) == (len(mine[0]), 0)  # shard 0 did its own images, and only those
    got = set(MaskStore(store))
    assert got >= set(mine[0]) and len(got) == len(mine[0]) + 2, got  # shard 1 had written 2 entries when killed
    res = verify_store(store)
    assert (res["ok"], len(res["missing"]), res["corrupt"]) == (len(mine[0]) + 2, len(mine[1]) - 2, []), res
    # shard 1 again, alone, told its shard by a launcher's environment (as under `accelerate launch`)
    r = subprocess.run(["mgab-masks", str(tmp_path/"imgs"), "--out", str(store), *GEN], env=_env(RANK="1",
                       WORLD_SIZE="2"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
    assert _counts(r.stdout) == (len(mine[1]) - 2, 2)  # only what the kill left undone
    v = subprocess.run(["mgab-masks", "--verify", str(store), "--no-progress"], env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert v.returncode == 0 and f"{len(keys)} ok, 0 missing, 0 stale, 0 corrupt" in v.stdout, v.stdout
    assert not [p for p in store.rglob("*") if p.name.endswith(".tmp")]  # the killed writer left no temporary file
    bad = subprocess.run(["mgab-masks", str(tmp_path/"imgs"), "--out", str(store), "--shard", "2", "--num-shards",
                          "2", *GEN], env=_env(), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "mgab-masks: error: --shard must be in 0..1 for --num-shards 2, got 2"], bad.stderr

import os
from pathlib import Path
import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
IMAGENETTE = SHARED / "data" / "imagenette-mini"


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    runslow = config.getoption("--runslow") or os.environ.get("MGAB_SLOW") == "1"
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow or MGAB_SLOW=1")
    skip_gpu = pytest.mark.skip(reason="gpu: no CUDA device on this machine")
    for item in items:
        if "slow" in item.keywords and not runslow: item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available(): item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _data_dir(tmp_path, monkeypatch):
    "Keep generated data of each test in its own folder"
    monkeypatch.setenv("MGAB_DATA", str(tmp_path / "mgab-data"))


@pytest.fixture
def imagenette():
    if not IMAGENETTE.is_dir(): pytest.skip(f"real photos not found at {IMAGENETTE}")
    return IMAGENETTE


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    "The one place tests set torch's threads: one intra-op thread, before any fixture of any scope builds a model"
    # tiny models run as fast on one thread; tests/run_all.sh runs two pytest workers on two cores (no
    # oversubscription); and seeded results (the pinned accuracies) do not depend on how many cores a machine has
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------- data shared by the test files (made once per worker)
@pytest.fixture(scope="session")
def embedded_store(tmp_path_factory):
    "The embedded dataset (in the data folder `embedded_store[0].parent`) and its SLIC mask store"
    from mgab.datasets import embedded_dataset
    from mgab.masks import SuperpixelMasker
    from mgab.store import make_mask_store
    root = tmp_path_factory.mktemp("embedded")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MGAB_DATA", str(root))
        path = embedded_dataset(progress=False)
    return path, make_mask_store(path, root/"store", SuperpixelMasker("slic"), progress=False).root


@pytest.fixture(scope="session")
def tiny_embedded(tmp_path_factory):
    "20 training images (10 classes x 2) and 10 validation images of 64 px, and their SLIC mask store"
    from mgab.datasets import make_embedded
    from mgab.masks import SuperpixelMasker
    from mgab.store import make_mask_store
    root = tmp_path_factory.mktemp("tiny-embedded")
    data = make_embedded(root/"data", n_train=2, n_val=1, size=64, progress=False)
    return data, make_mask_store(data, root/"store", SuperpixelMasker("slic"), progress=False).root


@pytest.fixture
def vit_b_checkpoint(tmp_path):
    "segment-anything's registry vit_b with random weights (seed 0), saved as a checkpoint file"
    from segment_anything import sam_model_registry
    torch.manual_seed(0)
    f = tmp_path/"vit_b_random.pth"
    torch.save(sam_model_registry["vit_b"]().state_dict(), f)
    return f


@pytest.fixture
def tiny_eval_run(tmp_path):
    "A mask-free tiny encoder's run folder (1 block, 32 px, 8 px patches) and 2 classes x 4 random 32 px images"
    import numpy as np
    from PIL import Image
    from mgab.train import write_init_run
    from mgab.vit import create_vit
    model = dict(name="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=0, bias=None)
    torch.manual_seed(0)
    run = write_init_run(create_vit(**model), tmp_path / "run", dict(method="mae", model=model))
    g = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in "ab":
            (tmp_path / "data" / split / c).mkdir(parents=True)
            for i in range(4):
                px = g.integers(0, 255, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(px).save(tmp_path / "data" / split / c / f"{i}.png")
    return run, tmp_path / "data"

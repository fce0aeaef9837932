"A masker for tests/test_shards.py, loaded by `mgab-masks --generator shard_helpers:hanging_masker`."
import os
import time
from pathlib import Path

from mgab.masks import SuperpixelMasker


class _Hanging(SuperpixelMasker):
    "The superpixel stand-in (same settings, so the same store), hanging after $HANG_AFTER images, as if stuck"
    def __call__(self, img):
        self.calls = getattr(self, "calls", 0) + 1
        n = int(os.environ.get("HANG_AFTER", 0))
        if n and self.calls > n:
            Path(os.environ["HANG_MARKER"]).write_text(str(self.calls - 1))  # the test kills the process now
            time.sleep(600)
        return super().__call__(img)


def hanging_masker(): return _Hanging("slic", points_per_side=8)

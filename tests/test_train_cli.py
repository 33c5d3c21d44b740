"""tools/train.py fails fast and clearly: missing data, and pretrained weights that cannot be downloaded."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FLICKR8K = REPO.parent / "shared" / "data" / "flickr8k"


def train(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("CAPKIT_DATA", None)
    return subprocess.run(
        [sys.executable, "tools/train.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_missing_flickr8k_says_where_it_is_expected_and_where_to_get_it(tmp_path):
    done = train("configs/show_attend_tell_flickr8k.yaml", f"data.dataset.root={tmp_path}", f"train.output_dir={tmp_path}")
    assert done.returncode == 2
    assert f"expected {tmp_path}/Flickr8k_text/Flickr8k.token.txt" in done.stderr
    assert "Flickr8k_Dataset.zip" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.skipif(not FLICKR8K.is_dir(), reason=f"needs the Flickr8k copy in {FLICKR8K}")
def test_offline_inception_weights_point_to_the_offline_config(tmp_path):
    done = train(
        "configs/show_attend_tell_flickr8k.yaml", f"data.dataset.root={FLICKR8K}", "data.skip_missing_images=true",
        f"train.output_dir={tmp_path}",
    )
    assert done.returncode == 2
    assert "could not download the pretrained weights of 'inception_v3'" in done.stderr
    assert "show_attend_tell_flickr8k_offline.yaml" in done.stderr and "Traceback" not in done.stderr

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"
DEMO = ROOT / "assets" / "demo"


@pytest.fixture(scope="session")
def model():
    """The untrained model with the real pretrained backbone, shared by the tests."""
    import torch

    from retrieval.model import RetrievalModel

    torch.manual_seed(0)
    return RetrievalModel().eval()


@pytest.fixture(scope="session")
def tracking_dev():
    path = SHARED_DATA / "tracking_dev"
    if not (path / "manifest.json").is_file():
        pytest.skip(f"tracking_dev data absent at {path}")
    return path

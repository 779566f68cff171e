# ---- BEGIN fake Hub bootstrap (keep at the very top of this file) ------------------------------
# huggingface_hub, transformers and datasets read HF_ENDPOINT / HF_HOME / HF_TOKEN / HF_HUB_DISABLE_XET
# into module-level constants *when they are first imported* (e.g. HUGGINGFACE_CO_URL_TEMPLATE).
# So the loopback FakeHub must be started and the environment configured here, before any test
# module (or anything below) imports an HF library; otherwise traffic would go to huggingface.co.
import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

# torch.compile's inductor caches generated C++ without the ATen CPU capability in its key: code
# generated for AVX-512 and then compiled under ATEN_CPU_CAPABILITY=default fails ("'at::vec' has not
# been declared"). One cache folder per capability keeps runs under different capabilities apart.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"torchinductor_fdbpl_{os.environ.get('ATEN_CPU_CAPABILITY') or 'native'}"))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hub_server import FakeHub, configure_env  # noqa: E402

_HF_HOME = tempfile.mkdtemp(prefix="fdbpl_hf_home_")
FAKE_HUB = FakeHub().start()
configure_env(FAKE_HUB.url, _HF_HOME)
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)
atexit.register(FAKE_HUB.stop)


# huggingface_hub < 2.2 validates cards against huggingface.co whatever HF_ENDPOINT says (tests/hub_site):
# routed to the loopback Hub here and, through hub_site/sitecustomize.py on PYTHONPATH, in child processes
# (tests that set PYTHONPATH for a child add HUB_SITE).
HUB_SITE = str(Path(__file__).resolve().parent / "hub_site")
sys.path.insert(0, HUB_SITE)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [HUB_SITE, os.environ.get("PYTHONPATH")]))
import card_validation  # noqa: E402

if card_validation.needed():
    card_validation.route_card_validation_to_endpoint()

import pytest  # noqa: E402


@pytest.fixture
def fake_hub():
    """The session's FakeHub, emptied (no repos, empty request log) before each test."""
    FAKE_HUB.reset()
    yield FAKE_HUB
# ---- END fake Hub bootstrap ----------------------------------------------------------------------


# ---- shared model / data fixtures -----------------------------------------------------------------
import torch  # noqa: E402

from fdbpl_hf.testing.worlds import clip_config, clip_tokenizer, load_digits  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    """OpenAI CLIP's real 49,408-token tokenizer, rebuilt offline."""
    return clip_tokenizer()


def make_clip(size: str = "tiny", seed: int = 0, **kwargs):
    from transformers import CLIPModel

    torch.manual_seed(seed)
    return CLIPModel(clip_config(size, **kwargs)).eval()


@pytest.fixture
def tiny_clip():
    return make_clip("tiny")


def run_ok(cmd: list, **kwargs):
    """`subprocess.run` that fails the test with the child's stderr (torchrun children are noisy)."""
    import subprocess

    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{cmd} exited with {proc.returncode}\n--- stderr ---\n{proc.stderr[-4000:]}"
    return proc


def torchrun_command(*script_and_args: str, processes: int = 2) -> list:
    """`python -m torch.distributed.run` over `processes` local processes, on a free port."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_addr", "127.0.0.1", "--master_port", port, *script_and_args]


@pytest.fixture(scope="session")
def digits_small():
    """30 real MNIST digits (3 per class), `image` + `ClassLabel` columns."""
    return load_digits(num_per_class=3)


@pytest.fixture(scope="module")
def teacher_clip():
    """The tiny teacher CLIP (seed 1), one per test module (a module may cast or edit it)."""
    return make_clip("tiny", seed=1)


@pytest.fixture(scope="module")
def table(digits_small, teacher_clip, tokenizer, tmp_path_factory):
    """`teacher_clip`'s RIL table of `digits_small`: 5 regions, top-4 (modules with other needs define their own)."""
    from fdbpl_hf import build_ril_table

    return build_ril_table(digits_small, teacher_clip, teacher_tokenizer=tokenizer, num_regions=5, top_k=4,
                           output_dir=str(tmp_path_factory.mktemp("tables") / "t"))


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, tokenizer):
    """A tiny teacher and student CLIP saved like Hub checkpoints (model, tokenizer, processor)."""
    from fdbpl_hf.testing.worlds import image_processor_for

    root = tmp_path_factory.mktemp("checkpoints")
    paths = {}
    for name, seed in (("teacher", 1), ("student", 2)):
        clip = make_clip("tiny", seed=seed)
        path = str(root / name)
        clip.save_pretrained(path)
        tokenizer.save_pretrained(path)
        image_processor_for(clip.config).save_pretrained(path)
        paths[name] = path
    return paths


def odd_images(sixteen_bit: bool = False) -> list:
    """Images a table build must convert: grey, RGBA, smaller than a region, 1 px (and 16-bit)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 255, (40, 30), dtype=np.uint8), mode="L"),
        Image.fromarray(rng.integers(0, 255, (20, 50, 4), dtype=np.uint8), mode="RGBA"),
        Image.fromarray(rng.integers(0, 255, (3, 2, 3), dtype=np.uint8), mode="RGB"),  # smaller than a region
        Image.fromarray(rng.integers(0, 255, (1, 1), dtype=np.uint8), mode="L"),
    ]
    if sixteen_bit:
        images.append(Image.fromarray(rng.integers(0, 65535, (33, 47), dtype=np.uint16).astype(np.int32), mode="I"))
    return images

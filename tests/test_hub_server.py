"""End-to-end checks that real huggingface_hub / datasets flows work against the loopback FakeHub."""

import dataclasses
import hashlib
import json
import os

import pytest
import torch
from torch import nn

import datasets
import huggingface_hub
from huggingface_hub import DatasetCard, HfApi, PyTorchModelHubMixin
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError


def test_env_points_at_fake_hub(fake_hub):
    assert huggingface_hub.constants.ENDPOINT == fake_hub.url
    assert fake_hub.url.startswith("http://127.0.0.1:")
    assert HfApi().repo_exists("nobody/missing") is False
    assert ("GET", "/api/models/nobody/missing") in fake_hub.requests


def test_upload_and_download_files(fake_hub, tmp_path):
    api = HfApi()
    repo_id = "tester/files"
    api.create_repo(repo_id)
    api.create_repo(repo_id, exist_ok=True)  # 409 is accepted with exist_ok
    assert api.repo_exists(repo_id)

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text(json.dumps({"a": 1}))
    big = os.urandom(11 * 1024 * 1024)  # > 10 MB: goes through LFS batch + PUT
    (src / "sub" / "weights.bin").write_bytes(big)
    first_sha = api.model_info(repo_id).sha
    info = api.upload_folder(repo_id=repo_id, folder_path=src, commit_message="add files")
    assert info.oid != first_sha and api.model_info(repo_id).sha == info.oid
    assert any(r[1].endswith(".git/info/lfs/objects/batch") for r in fake_hub.requests)
    assert any(r[0] == "PUT" for r in fake_hub.requests)

    assert set(api.list_repo_files(repo_id)) == {".gitattributes", "config.json", "sub/weights.bin"}
    assert fake_hub.list_files(repo_id) == [".gitattributes", "config.json", "sub/weights.bin"]
    assert fake_hub.read_file(repo_id, "sub/weights.bin") == big
    assert api.file_exists(repo_id, "config.json")
    assert not api.file_exists(repo_id, "nope.json")
    infos = {i.path: i for i in api.get_paths_info(repo_id, ["config.json", "sub", "missing.txt"])}
    assert set(infos) == {"config.json", "sub"}
    assert infos["config.json"].size == len(json.dumps({"a": 1})) and infos["config.json"].lfs is None
    tree = {i.path: i for i in api.list_repo_tree(repo_id, recursive=True)}
    assert set(tree) == {".gitattributes", "config.json", "sub", "sub/weights.bin"}
    assert tree["sub/weights.bin"].lfs.sha256 == hashlib.sha256(big).hexdigest()
    assert sorted(i.path for i in api.list_repo_tree(repo_id)) == [".gitattributes", "config.json", "sub"]
    # The old sha is still a valid revision and does not contain the new files.
    assert api.list_repo_files(repo_id, revision=first_sha) == [".gitattributes"]

    cache = tmp_path / "cache"
    path = huggingface_hub.hf_hub_download(repo_id, "config.json", cache_dir=cache)
    assert json.loads(open(path).read()) == {"a": 1}
    path = huggingface_hub.hf_hub_download(repo_id, "sub/weights.bin", cache_dir=cache)
    assert open(path, "rb").read() == big
    snap = huggingface_hub.snapshot_download(repo_id, cache_dir=tmp_path / "cache2")
    assert (open(os.path.join(snap, "sub", "weights.bin"), "rb").read()) == big
    assert json.load(open(os.path.join(snap, "config.json"))) == {"a": 1}


def test_errors(fake_hub, tmp_path):
    api = HfApi()
    api.create_repo("tester/err")
    with pytest.raises(EntryNotFoundError):
        huggingface_hub.hf_hub_download("tester/err", "missing.txt", cache_dir=tmp_path)
    with pytest.raises(RepositoryNotFoundError):
        huggingface_hub.hf_hub_download("tester/absent", "config.json", cache_dir=tmp_path)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("tester/absent")
    with pytest.raises(huggingface_hub.errors.RevisionNotFoundError):
        api.list_repo_files("tester/err", revision="no-such-branch")
    with pytest.raises(huggingface_hub.errors.RevisionNotFoundError):  # sent URL-encoded as one segment
        api.list_repo_files("tester/err", revision="refs/convert/parquet")
    assert ("GET", "/api/models/tester/err/tree/refs/convert/parquet") in fake_hub.requests
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree("tester/err", path_in_repo="no-such-dir"))


@dataclasses.dataclass
class TinyConfig:
    hidden: int = 4
    out: int = 2


class TinyNet(nn.Module, PyTorchModelHubMixin):
    def __init__(self, config: TinyConfig):
        super().__init__()
        self.config = config
        self.lin = nn.Linear(config.hidden, config.out)


def test_pytorch_mixin_roundtrip(fake_hub):
    torch.manual_seed(0)
    model = TinyNet(TinyConfig(hidden=5, out=3))
    model.push_to_hub("tester/tiny-net")
    assert "model.safetensors" in fake_hub.list_files("tester/tiny-net")
    loaded = TinyNet.from_pretrained("tester/tiny-net")
    assert loaded.config == TinyConfig(hidden=5, out=3)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])


def test_datasets_push_configs_and_load(fake_hub, tmp_path):
    repo = "tester/ds"
    feats_a = datasets.Features({
        "text": datasets.Value("string"),
        "label": datasets.ClassLabel(names=["neg", "pos"]),
        "ints": datasets.List(datasets.Value("int16"), length=3),
    })
    ds_a = datasets.Dataset.from_dict(
        {"text": ["x", "y", "z"], "label": [0, 1, 1], "ints": [[1, 2, 3], [4, 5, 6], [-7, 8, 9]]}, features=feats_a)
    feats_b = datasets.Features({
        "halves": datasets.List(datasets.Value("float16"), length=3),
        "name": datasets.Value("string"),
    })
    ds_b = datasets.Dataset.from_dict(
        {"halves": [[0.5, 1.0, -2.0], [3.0, 0.25, 8.0]], "name": ["p", "q"]}, features=feats_b)

    datasets.DatasetDict({"train": ds_a}).push_to_hub(repo, config_name="a")
    datasets.DatasetDict({"train": ds_b}).push_to_hub(repo, config_name="b")
    assert sorted(datasets.get_dataset_config_names(repo)) == ["a", "b"]

    loaded_a = datasets.load_dataset(repo, "a", split="train", cache_dir=str(tmp_path / "c1"))
    assert loaded_a.features == feats_a
    assert loaded_a.to_dict() == ds_a.to_dict()
    loaded_b = datasets.load_dataset(repo, "b", split="train", cache_dir=str(tmp_path / "c2"))
    assert loaded_b.features == feats_b
    assert loaded_b.to_dict() == ds_b.to_dict()

    streamed = datasets.load_dataset(repo, "a", split="train", streaming=True, cache_dir=str(tmp_path / "c3"))
    assert list(streamed) == list(ds_a)


def test_dataset_card_roundtrip(fake_hub):
    repo = "tester/card"
    HfApi().create_repo(repo, repo_type="dataset")
    card = DatasetCard("---\nlicense: mit\n---\n# Hello\n")
    card.push_to_hub(repo, repo_type="dataset")
    loaded = DatasetCard.load(repo, repo_type="dataset")
    assert loaded.data.license == "mit"
    assert "# Hello" in loaded.text
    assert fake_hub.list_files(repo, repo_type="dataset") == [".gitattributes", "README.md"]

"""refbitnet.hub.resolve on a Hugging Face cache the test writes (huggingface_hub's layout), network off."""

import sys

import pytest

from refbitnet import hub
from refbitnet.errors import CheckpointError

SHA = "0123456789abcdef0123456789abcdef01234567"
OLD = "fedcba9876543210fedcba9876543210fedcba98"


def write_cache(root, repo, files, sha=SHA, ref="main"):
    """models--org--name/{refs/<ref>, blobs/<hash>, snapshots/<sha>/<file> -> ../../blobs/<hash>}, as
    huggingface_hub writes it (files are symlinks into blobs/)."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / ref).write_text(sha)
    (repo_dir / "blobs").mkdir(exist_ok=True)
    snapshot = repo_dir / "snapshots" / sha
    for i, (name, text) in enumerate(files.items()):
        blob = repo_dir / "blobs" / f"{sha[:8]}{i:032d}"
        blob.write_text(text)
        target = snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(blob)
    return snapshot


@pytest.fixture
def cache(tmp_path, monkeypatch):
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")                 # these tests never touch the network
    return tmp_path / "hub"


def test_local_paths_win(cache, tmp_path, monkeypatch):
    write_cache(cache, "org/model", {"config.json": "{}"})
    local = tmp_path / "org" / "model"
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert hub.resolve("org/model") == hub.Path("org/model")     # the directory of that name, not the cache
    assert hub.resolve(local) == local


def test_model_id_resolves_to_the_snapshot(cache):
    snapshot = write_cache(cache, "microsoft/bitnet-b1.58-2B-4T",
                           {"config.json": "{}", "model.safetensors": "x", "tokenizer.json": "{}"})
    assert hub.resolve("microsoft/bitnet-b1.58-2B-4T") == snapshot
    assert (hub.resolve("microsoft/bitnet-b1.58-2B-4T") / "config.json").read_text() == "{}"


def test_revisions_refs_and_commit_hashes(cache):
    write_cache(cache, "org/m", {"config.json": "new"})
    old = write_cache(cache, "org/m", {"config.json": "old"}, sha=OLD, ref="v1")
    assert (hub.resolve("org/m") / "config.json").read_text() == "new"
    assert hub.resolve("org/m", revision="v1") == old
    assert hub.resolve("org/m", revision=OLD) == old


def test_gguf_files_by_path_in_repo(cache):
    snapshot = write_cache(cache, "microsoft/bitnet-b1.58-2B-4T-gguf",
                           {"ggml-model-i2_s.gguf": "GGUF", "README.md": "hi"})
    assert hub.resolve("microsoft/bitnet-b1.58-2B-4T-gguf/ggml-model-i2_s.gguf") == \
        snapshot / "ggml-model-i2_s.gguf"
    # the repository alone: its one GGUF file
    assert hub.resolve("microsoft/bitnet-b1.58-2B-4T-gguf") == snapshot / "ggml-model-i2_s.gguf"
    nested = write_cache(cache, "org/multi", {"a/x.gguf": "1", "b.gguf": "2", "c.gguf": "3"})
    assert hub.resolve("org/multi/a/x.gguf") == nested / "a" / "x.gguf"
    with pytest.raises(CheckpointError, match="several GGUF files.*b.gguf, c.gguf.*name one"):
        hub.resolve("org/multi")


@pytest.mark.parametrize("variable, sub", [("HF_HOME", "hub"), ("XDG_CACHE_HOME", "huggingface/hub")])
def test_cache_location_from_the_environment(tmp_path, monkeypatch, variable, sub):
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv(variable, str(tmp_path / "base"))
    snapshot = write_cache(tmp_path / "base" / sub, "org/m", {"config.json": "{}"})
    assert hub.hub_cache_dir() == tmp_path / "base" / sub
    assert hub.resolve("org/m") == snapshot


def test_the_cache_huggingface_hub_itself_finds(cache):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    snapshot = write_cache(cache, "org/m", {"config.json": "{}"})
    theirs = huggingface_hub.snapshot_download("org/m", local_files_only=True, cache_dir=str(cache))
    assert hub.resolve("org/m") == snapshot == hub.Path(theirs)


def test_offline_and_not_cached_says_what_to_run(cache):
    with pytest.raises(CheckpointError, match=r"HF_HUB_OFFLINE is set.*huggingface-cli download org/missing"):
        hub.resolve("org/missing")
    with pytest.raises(CheckpointError, match=r"huggingface-cli download org/r sub/f.gguf"):
        hub.resolve("org/r/sub/f.gguf")


def test_without_huggingface_hub_says_to_install_it(cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)      # import fails as if not installed
    with pytest.raises(CheckpointError, match=r"pip install 'refbitnet\[hub\]'.*huggingface-cli download org/m"):
        hub.resolve("org/m")


def test_a_failed_download_says_what_to_run(cache, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.delenv("HF_HUB_OFFLINE")

    def no_network(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'huggingface.co'")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    with pytest.raises(CheckpointError, match=r"downloading it failed \(ConnectionError: Failed to resolve.*"
                                              r"huggingface-cli download org/m"):
        hub.resolve("org/m")
    with pytest.raises(CheckpointError, match=r"huggingface-cli download org/m f.gguf"):
        hub.resolve("org/m/f.gguf")


def test_a_download_lands_in_the_cache_and_is_found(cache, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    calls = []

    def fake_snapshot_download(repo, revision, cache_dir, allow_patterns):
        calls.append((repo, revision, allow_patterns))
        return str(write_cache(hub.Path(cache_dir), repo, {"config.json": "{}"}))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    path = hub.resolve("org/fresh")
    assert calls == [("org/fresh", "main", list(hub.MODEL_FILE_PATTERNS))] and (path / "config.json").exists()
    assert hub.resolve("org/fresh") == path and len(calls) == 1              # second time: from the cache


@pytest.mark.parametrize("text", ["/abs/missing", "../x/y", "a/../b", "justaname", "a//b", "org/na me", "~/m/x"])
def test_not_a_path_nor_an_id(cache, text):
    assert hub.parse_hub_id(text) is None
    with pytest.raises(CheckpointError, match="expected a model directory, a .gguf file or a Hugging Face id"):
        hub.resolve(text)


def test_a_corrupt_ref_names_the_file(cache):
    write_cache(cache, "org/m", {"config.json": "{}"}, sha="not-a-hash")
    with pytest.raises(CheckpointError, match=r"refs/main: expected a 40-hex-digit commit hash"):
        hub.resolve("org/m")


def test_wrong_type(cache):
    with pytest.raises(CheckpointError, match="found int"):
        hub.resolve(3)

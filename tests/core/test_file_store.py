"""STORAGE_URL=file://DIR: the data directory itself by default (nothing copied), or another
directory (a shared mount), where objects are copied whole, under a temporary name first."""

from app.core.config import Settings
from app.core.objects import FileStore, evict, make_store


def test_the_default_store_is_the_data_directory(tmp_path):
    store = make_store(Settings(data_dir=tmp_path / "var"))
    assert isinstance(store, FileStore) and store.is_local
    assert store.local("models/m1") == tmp_path / "var" / "models" / "m1"


def test_another_directory_gets_whole_copies(tmp_path):
    store = make_store(Settings(data_dir=tmp_path / "var", storage_url=(tmp_path / "shared store").as_uri()))
    assert isinstance(store, FileStore) and not store.is_local
    local = store.local("models/m1")
    local.mkdir(parents=True)
    (local / "model.safetensors").write_bytes(b"w" * 1000)
    (local / "config.json").write_text("{}")
    store.put_tree("models/m1")
    assert store.keys("models/m1") == ["models/m1/config.json", "models/m1/model.safetensors"]
    assert (tmp_path / "shared store" / "models" / "m1" / "model.safetensors").read_bytes() == b"w" * 1000
    assert not any(p.name.startswith(".") for p in (tmp_path / "shared store").rglob("*"))  # no temporary left
    assert store.get_tree("models/m1", tmp_path / "elsewhere")
    assert (tmp_path / "elsewhere" / "config.json").read_text() == "{}"
    store.delete("models/m1")
    assert store.keys("models/m1") == [] and not store.get_tree("models/m1", tmp_path / "none")


def test_a_cache_keeps_the_most_recently_used_within_its_budget(tmp_path):
    import os
    import time

    for age, name in enumerate(("new", "middle", "old")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_bytes(b"x" * 100)
        past = time.time() - 100 * age
        os.utime(tmp_path / name, (past, past))
    assert evict(tmp_path, budget=150, keep=tmp_path / "old") == ["middle", "new"]  # `keep` is about to be used
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_a_dataset_directory_is_one_object_and_unpacks_whole(tmp_path):
    store = make_store(Settings(data_dir=tmp_path / "var", storage_url=(tmp_path / "shared store").as_uri()))
    local = store.local("datasets/abc")
    (local / "train" / "ants").mkdir(parents=True)
    (local / "train" / "ants" / "1.jpg").write_bytes(b"j" * 5000)
    (local / "val.txt").write_text("v")
    store.put_packed("datasets/abc")
    assert (tmp_path / "shared store" / "datasets" / "abc").is_file()  # one object, not a file per image
    assert store.get_packed("datasets/abc", tmp_path / "unpacked")
    assert (tmp_path / "unpacked" / "train" / "ants" / "1.jpg").read_bytes() == b"j" * 5000
    assert (tmp_path / "unpacked" / "val.txt").read_text() == "v"
    store.delete("datasets/abc")
    assert not store.get_packed("datasets/abc", tmp_path / "none")

"""The prediction hot path's lookups (app/core/lookups.py): who the key is and which model a
reference names, answered from an API process's memory for `lookup_cache_seconds`."""

import asyncio
import threading
from contextlib import contextmanager

import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine

from app.core.errors import Unauthorized
from app.core.lookups import CachedLookup
from app.jobs.runner import run_job
from tests.archives import zip_tree
from tests.conftest import HYMENOPTERA
from tests.tenants.test_tenancy import new_tenant
from tests.uploads import upload_ready


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_answers_are_kept_for_their_ttl_and_errors_never():
    calls, clock = [], Clock()

    def lookup(key):
        calls.append(key)
        if key == "revoked":
            raise Unauthorized("no")
        return f"principal of {key}"

    cached = CachedLookup(lookup, ttl=1.0, timer=clock)

    async def scenario():
        assert await cached("a") == await cached("a") == "principal of a"
        for _ in range(2):
            with pytest.raises(Unauthorized):
                await cached("revoked")
        clock.now = 1.5  # past the TTL: asked again
        await cached("a")
        cached.clear()  # a change made in this process: asked again at once
        await cached("a")

    asyncio.run(scenario())
    assert calls == ["a", "revoked", "revoked", "a", "a"]


def test_ttl_zero_asks_every_time():
    calls = []
    cached = CachedLookup(lambda key: calls.append(key) or key, ttl=0)

    async def scenario():
        for _ in range(3):
            await cached("a")

    asyncio.run(scenario())
    assert calls == ["a", "a", "a"]


def test_an_answer_read_before_a_clear_is_not_kept_after_it():
    """A request reads the old alias target while a change in this process commits and clears: the
    old answer must not come back into the cache after the clear."""
    reading, cleared = threading.Event(), threading.Event()
    answers = iter(["old", "new"])

    def lookup(_):
        answer = next(answers)
        if answer == "old":
            reading.set()
            cleared.wait(timeout=30)
        return answer

    cached = CachedLookup(lookup, ttl=60)

    async def scenario():
        first = asyncio.ensure_future(cached("alias"))
        await asyncio.to_thread(reading.wait, 30)
        cached.clear()
        cleared.set()
        return await first, await cached("alias")

    assert asyncio.run(scenario()) == ("old", "new")


@contextmanager
def statements():
    """The SQL statements every engine runs meanwhile."""
    seen = []

    def record(_conn, _cursor, statement, *_args):
        seen.append(statement)

    event.listen(Engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(Engine, "before_cursor_execute", record)


@pytest.fixture
def kept_a_minute(monkeypatch):
    """Lookups kept longer than this test runs: a slow model load must not let one expire."""
    monkeypatch.setenv("VISIONTUNE_LOOKUP_CACHE_SECONDS", "60")


def test_predictions_ask_the_database_nothing_once_their_key_and_model_are_known(kept_a_minute, client, tmp_path):
    archive = zip_tree(HYMENOPTERA, tmp_path / "small.zip", per_class={"train": 8, "val": 4})
    dataset = upload_ready(client, archive.read_bytes(), "small.zip")
    ids = []
    for seed in range(2):
        job = client.post("/v1/jobs", json={"dataset_id": dataset["id"], "backbone": "mobilenetv2_100", "seed": seed,
                                            "strategy": "linear_probe", "model_name": "ants-bees",
                                            "hyperparameters": {"epochs": 1}}).json()  # fmt: skip
        assert run_job(job["id"]).status == "succeeded"
        ids.append(client.get(f"/v1/jobs/{job['id']}").json()["model_id"])
    assert client.put("/v1/models/ants-bees/aliases/production", json={"version": 1}).status_code == 200
    image = sorted((HYMENOPTERA / "val" / "ants").iterdir())[0].read_bytes()

    def predict(ref: str, headers: dict | None = None):
        headers = {"Content-Type": "image/jpeg", **(headers or {})}
        return client.post(f"/v1/models/{ref}/predict", content=image, headers=headers)

    assert predict("ants-bees@production").json()["model_id"] == ids[0]  # key and model now known
    with statements() as seen:
        for _ in range(5):
            assert predict("ants-bees@production").status_code == 200
    # Only the poll for a newly finished export, once per model every few seconds (Serving._export_appeared).
    assert [statement for statement in seen if "FROM exports" not in statement] == []
    assert len(seen) <= 1

    # Another tenant's key never gets the kept answer: the model is looked up for that tenant, and is not there.
    _, stranger_key = new_tenant(client, "stranger", scopes=("predict",))
    for ref in ("ants-bees@production", ids[0]):
        assert predict(ref, stranger_key).status_code == 404

    # Changes made through this API process take effect at once: an alias moved, a model deleted,
    # a key revoked.
    assert client.put("/v1/models/ants-bees/aliases/production", json={"version": 2}).status_code == 200
    assert predict("ants-bees@production").json()["model_id"] == ids[1]
    assert predict(ids[0]).status_code == 200
    assert client.delete(f"/v1/models/{ids[0]}").status_code == 204
    assert predict(ids[0]).status_code == 404
    created = client.post("/v1/keys", json={"name": "app", "scopes": ["predict"]}).json()
    other = {"Authorization": f"Bearer {created['key']}"}
    assert predict(ids[1], other).status_code == 200
    assert client.delete(f"/v1/keys/{created['id']}").status_code == 200
    assert predict(ids[1], other).status_code == 401

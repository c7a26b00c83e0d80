"""The probe that `auto` serves while it searches, when the worker that registered it dies before
the search ends: the worker that takes the job over finds it registered and keeps it."""

from datetime import timedelta

import pytest
from sqlalchemy import update

from app.core.db import session_scope
from app.db.tables import Job, utcnow
from app.jobs import runner
from app.jobs.runner import run_job
from tests.archives import zip_tree
from tests.conftest import HYMENOPTERA
from tests.uploads import upload_ready


def test_a_worker_dying_after_serving_the_probe_leaves_one_probe_model(client, settings_env, tmp_path, monkeypatch):
    archive = zip_tree(HYMENOPTERA, tmp_path / "small.zip", per_class={"train": 8, "val": 4})
    dataset = upload_ready(client, archive.read_bytes(), "small.zip")
    job = client.post("/v1/jobs", json={"dataset_id": dataset["id"], "backbone": "mobilenetv2_100",
                                        "auto": {"budget_seconds": 5, "other_backbones": False},
                                        "hyperparameters": {"epochs": 2}}).json()  # fmt: skip
    search = runner.auto.search

    def dies_once_served(*args):
        serve_probe = args[11]

        def then_die(features):
            serve_probe(features)
            raise KeyboardInterrupt("the worker process dies right after registering the probe")

        return search(*args[:11], then_die)

    with monkeypatch.context() as dying:
        dying.setattr(runner.auto, "search", dies_once_served)
        with pytest.raises(KeyboardInterrupt):
            run_job(job["id"])
    served = client.get(f"/v1/jobs/{job['id']}").json()
    assert served["status"] == "running" and served["strategy"] == "auto" and served["model_id"], served

    with session_scope() as session:  # its holder is gone: another host, silent for an hour
        session.execute(update(Job).where(Job.id == job["id"]).values(
            claimed_by="elsewhere:1", heartbeat_at=utcnow() - timedelta(hours=1)))  # fmt: skip
    assert run_job(job["id"]).status == "succeeded"
    final = client.get(f"/v1/jobs/{job['id']}").json()
    # 8 training images a class: too few for auto to measure fine-tuning, and no other backbone,
    # so the probe wins: kept, not trained again.
    assert final["attempts"] == 2 and final["model_id"] == served["model_id"]
    models = [m["id"] for m in client.get("/v1/models").json()["data"] if m["job_id"] == job["id"]]
    assert models == [served["model_id"]]

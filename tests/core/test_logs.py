"""LOG_FORMAT=json: one JSON object per line, with the request id (the client's X-Request-ID, or
one made here, echoed in the response) and the id of the work a worker is on."""

import json
import logging

from app.core import logs


def test_a_request_id_is_echoed_and_carried_by_its_log_lines(client, caplog):
    from fastapi.testclient import TestClient

    given = client.get("/v1/datasets", headers={"X-Request-ID": "trace-42"})
    made = client.get("/v1/datasets")
    refused = client.get("/v1/datasets", headers={"X-Request-ID": "not\x7fprintable"})
    assert given.headers["x-request-id"] == "trace-42"
    assert len(made.headers["x-request-id"]) == 16 and made.headers["x-request-id"] != given.headers["x-request-id"]
    assert refused.headers["x-request-id"] != "not\x7fprintable"  # replaced, never echoed as sent

    def boom():  # a bug in a route: the server's last-resort handler logs it, with the request's id
        raise RuntimeError("a bug")

    client.app.add_api_route("/boom", boom)
    caplog.handler.addFilter(logs.ContextIds())
    with caplog.at_level(logging.ERROR, logger="app"), TestClient(client.app, raise_server_exceptions=False) as raw:
        failed = raw.get("/boom", headers={"X-Request-ID": "trace-500"})
    assert failed.status_code == 500
    assert [r.request_id for r in caplog.records if r.name == "app.main"] == ["trace-500"]


def test_json_lines_carry_the_ids():
    record = logging.LogRecord("app.jobs.runner", logging.INFO, __file__, 1, "epoch %d done", (3,), None)
    token = logs.request_id.set("r-1")
    try:
        with logs.working_on("job_abc"):
            logs.ContextIds().filter(record)
    finally:
        logs.request_id.reset(token)
    line = json.loads(logs.JsonLines().format(record))
    assert line["message"] == "epoch 3 done" and line["logger"] == "app.jobs.runner" and line["level"] == "INFO"
    assert line["request_id"] == "r-1" and line["work_id"] == "job_abc"
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        failed = logging.LogRecord("app", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert "ValueError: boom" in json.loads(logs.JsonLines().format(failed))["exception"]

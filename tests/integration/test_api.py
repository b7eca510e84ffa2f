"""The HTTP API over real HTTP: every bad input gets its status and a clear message."""

from __future__ import annotations

import base64
import uuid

import httpx
import pytest


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_no_token_is_401_and_wrong_scope_is_403(api: str, tokens: dict[str, str]) -> None:
    # given no token, a bogus token, and a read-only token
    body = {"type": "platform.ping"}
    # when each tries to enqueue / read
    none = httpx.post(f"{api}/v1/jobs", json=body)
    bogus = httpx.post(f"{api}/v1/jobs", json=body, headers=_auth("wdn_nope"))
    read_only = httpx.post(f"{api}/v1/jobs", json=body, headers=_auth(tokens["read"]))
    listing = httpx.get(f"{api}/v1/jobs", headers=_auth(tokens["read"]))
    # then: 401 with a Bearer challenge, 401, 403 naming the scope, and reading works
    assert none.status_code == 401
    assert none.headers["www-authenticate"] == "Bearer"
    assert bogus.status_code == 401
    assert read_only.status_code == 403
    assert "enqueue" in read_only.json()["detail"]
    assert listing.status_code == 200


def test_retry_and_cancel_need_admin(client: httpx.Client) -> None:
    # given an enqueue+read token; when it tries an operator action; then 403
    job_id = client.post("/v1/jobs", json={"type": "platform.ping", "countdown": 600}).json()["id"]
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 403
    assert client.post(f"/v1/jobs/{job_id}/retry").status_code == 403


def test_unknown_type_is_422_naming_known_types(client: httpx.Client) -> None:
    r = client.post("/v1/jobs", json={"type": "nope.nothing"})
    assert r.status_code == 422
    err = r.json()["detail"][0]
    assert err["loc"] == ["body", "type"]
    assert "platform.ping" in err["msg"]
    assert "platform.ping" in err["known_types"]


def test_bad_params_is_422_with_field_path(client: httpx.Client) -> None:
    # given params of the wrong type and an unknown field
    r = client.post("/v1/jobs", json={"type": "platform.ping", "params": {"echo": ["x"]}})
    extra = client.post("/v1/jobs", json={"type": "platform.ping", "params": {"bogus": 1}})
    # then 422 and the path points into params
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "params", "echo"]
    assert extra.status_code == 422
    assert extra.json()["detail"][0]["loc"] == ["body", "params", "bogus"]


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"params": {}}, ["body", "type"]),
        ({"type": "platform.ping", "countdown": -1}, ["body", "countdown"]),
        ({"type": "platform.ping", "countdown": 999999}, ["body", "countdown"]),
        ({"type": "platform.ping", "idempotency_key": "has space"}, ["body", "idempotency_key"]),
        ({"type": "platform.ping", "params": "not-an-object"}, ["body", "params"]),
        ({"type": "platform.ping", "surprise": True}, ["body", "surprise"]),
    ],
)
def test_malformed_body_is_422(client: httpx.Client, body: dict[str, object],
                               loc: list[str]) -> None:
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == loc


def test_values_postgres_cannot_store_are_422(client: httpx.Client) -> None:
    nul = client.post("/v1/jobs", json={"type": "platform.ping", "params": {"echo": "a\u0000b"}})
    nan = client.post("/v1/jobs", content=b'{"type": "testing.sleep_effect", '
                      b'"params": {"seconds": NaN}}', headers={"Content-Type": "application/json"})
    for r in (nul, nan):
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"] == ["body", "params"]


def test_not_json_is_422_never_500(client: httpx.Client) -> None:
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe", b""):
        r = client.post("/v1/jobs", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, (raw, r.status_code, r.text)


def test_body_over_64_kib_is_413(client: httpx.Client) -> None:
    big = {"type": "platform.ping", "params": {"echo": "x" * (65 * 1024)}}
    r = client.post("/v1/jobs", json=big)
    assert r.status_code == 413
    assert "64 KiB" in r.json()["detail"]

    # a chunked body with no Content-Length is counted too
    def chunks():  # type: ignore[no-untyped-def]
        for _ in range(70):
            yield b"x" * 1024

    r = client.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413


def test_same_key_returns_first_job_and_other_request_conflicts(client: httpx.Client) -> None:
    key = f"k-{uuid.uuid4()}"
    body = {"type": "platform.ping", "params": {"echo": "a"}, "countdown": 600}
    first = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
    again = client.post("/v1/jobs", json={**body, "idempotency_key": key})
    other = client.post("/v1/jobs", json={**body, "params": {"echo": "b"}},
                        headers={"Idempotency-Key": key})
    # both sent and different: the header wins, as the document says (no 422 for a
    # request the schema admits)
    both = client.post("/v1/jobs", json={**body, "idempotency_key": f"body-{key}"},
                       headers={"Idempotency-Key": key})
    assert first.status_code == 202
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert first.json()["idempotency_key"] == key
    assert other.status_code == 409
    assert both.status_code == 200 and both.json()["id"] == first.json()["id"]


def test_get_unknown_or_malformed_job(client: httpx.Client) -> None:
    assert client.get(f"/v1/jobs/{uuid.uuid4()}").status_code == 404
    r = client.get("/v1/jobs/not-a-uuid")
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["path", "job_id"]


def test_list_filters_and_paginates(client: httpx.Client) -> None:
    # given three delayed jobs with a distinctive echo
    tag = uuid.uuid4().hex
    ids = [client.post("/v1/jobs", json={"type": "platform.ping", "countdown": 600,
                                         "params": {"echo": f"{tag}-{i}"}}).json()["id"]
           for i in range(3)]
    # when listing two at a time, newest first
    page1 = client.get("/v1/jobs", params={"type": "platform.ping", "limit": 2}).json()
    page2 = client.get("/v1/jobs", params={"type": "platform.ping", "limit": 2,
                                           "cursor": page1["next_cursor"]}).json()
    # then the pages follow each other without overlap
    got = [j["id"] for j in page1["items"]] + [j["id"] for j in page2["items"]]
    assert got[:3] == list(reversed(ids))
    assert len(set(got)) == len(got)
    # and bad filters are 422
    assert client.get("/v1/jobs", params={"status": "weird"}).status_code == 422
    assert client.get("/v1/jobs", params={"limit": 0}).status_code == 422
    assert client.get("/v1/jobs", params={"cursor": "@@@"}).status_code == 422
    odd = base64.urlsafe_b64encode(b'["2020-01-01T00:00:00", 5]').decode()
    assert client.get("/v1/jobs", params={"cursor": odd}).status_code == 422


def test_retry_only_failed_or_dead_and_cancel_only_unstarted(
    client: httpx.Client, tokens: dict[str, str]
) -> None:
    admin = _auth(tokens["admin"])
    # given a job delayed by 10 minutes (queued)
    job_id = client.post("/v1/jobs", json={"type": "platform.ping", "countdown": 600}).json()["id"]
    # when retried while queued: 409
    why = {"reason": "test"}
    r = client.post(f"/v1/jobs/{job_id}/retry", json=why, headers=admin)
    assert r.status_code == 409
    assert "queued" in r.json()["detail"]
    # when cancelled: it is cancelled, and a second cancel is 409
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=admin).status_code == 422
    c = client.post(f"/v1/jobs/{job_id}/cancel", json=why, headers=admin)
    assert c.status_code == 200
    assert c.json()["status"] == "cancelled"
    assert client.post(f"/v1/jobs/{job_id}/cancel", json=why, headers=admin).status_code == 409
    assert client.post(f"/v1/jobs/{uuid.uuid4()}/retry", json=why,
                       headers=admin).status_code == 404


def test_job_types_publish_params_schema(client: httpx.Client) -> None:
    types = {t["name"]: t for t in client.get("/v1/job-types").json()}
    ping = types["platform.ping"]
    assert ping["params_schema"]["properties"]["echo"]["type"] == "string"
    assert ping["max_attempts"] >= 1


def test_health_ready_metrics_openapi(api: str, client: httpx.Client) -> None:
    assert httpx.get(f"{api}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{api}/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"]["database"]["ok"] is True
    assert ready.json()["checks"]["redis"]["ok"] is True
    client.post("/v1/jobs", json={"type": "platform.ping", "countdown": 600})
    text = httpx.get(f"{api}/metrics").text
    assert 'warden_jobs_submitted_total{outcome="created",type="platform.ping"}' in text
    assert "warden_outbox_pending" in text
    assert 'warden_jobs{status="queued",type="platform.ping"}' in text
    paths = httpx.get(f"{api}/openapi.json").json()["paths"]
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/job-types"} <= set(paths)


def test_metrics_can_require_a_read_token(services: object, tokens: dict[str, str],
                                          monkeypatch: object) -> None:
    # given an API whose /metrics needs a token (WARDEN_METRICS_REQUIRE_TOKEN, review N18)
    from fastapi.testclient import TestClient

    from api_stub.app import create_app
    from workers.settings import get_settings

    monkeypatch.setenv("WARDEN_METRICS_REQUIRE_TOKEN", "true")  # type: ignore[attr-defined]
    get_settings.cache_clear()
    try:
        with TestClient(create_app(run_relay=False)) as api:
            # then an anonymous scrape is refused and a read token's is answered
            assert api.get("/metrics").status_code == 401
            scraped = api.get("/metrics",
                              headers={"Authorization": f"Bearer {tokens['read']}"})
            assert scraped.status_code == 200
            assert "warden_jobs" in scraped.text
    finally:
        monkeypatch.undo()  # type: ignore[attr-defined]
        get_settings.cache_clear()

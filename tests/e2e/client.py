"""A small HTTP client for the end-to-end tests (plain requests against the live stack)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import requests

from tests.openapi import validate_response


class Api:
    """Calls the live API and validates every response against the OpenAPI spec."""

    def __init__(self, base_url: str) -> None:
        self.base = base_url.rstrip("/")
        self.http = requests.Session()

    def request(self, method: str, path: str, **kw: Any) -> requests.Response:
        kw.setdefault("timeout", 30)
        resp = self.http.request(method, self.base + path, allow_redirects=False, **kw)
        body = None
        if resp.headers.get("Content-Type", "").split(";")[0].endswith("json"):
            body = resp.json()
        validate_response(method, path, resp.status_code, resp.headers.get("Content-Type", ""), body)
        return resp

    def upload_model(self, path: Path, filename: str | None = None) -> dict[str, Any]:
        with open(path, "rb") as fh:
            resp = self.request(
                "POST", f"/v1/models?filename={filename or path.name}", data=fh,
                headers={"Content-Type": "application/octet-stream"},
            )
        assert resp.status_code in (200, 201), resp.text
        return dict(resp.json())

    def upload_dataset(self, path: Path) -> dict[str, Any]:
        with open(path, "rb") as fh:
            resp = self.request("POST", "/v1/datasets", data=fh,
                                headers={"Content-Type": "application/octet-stream"})
        assert resp.status_code in (200, 201), resp.text
        return dict(resp.json())

    def submit(self, **body: Any) -> dict[str, Any]:
        resp = self.request("POST", "/v1/jobs", json=body)
        assert resp.status_code == 202, resp.text
        return dict(resp.json())

    def wait(self, job_id: str, timeout: float = 300, states: tuple[str, ...] = ("succeeded", "failed", "cancelled")) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen: list[tuple[str, str]] = []
        while time.monotonic() < deadline:
            resp = self.request("GET", f"/v1/jobs/{job_id}")
            if resp.status_code in (429, 503):  # a busy stack (big uploads): ask again
                time.sleep(0.5)
                continue
            job = resp.json()
            if not seen or seen[-1] != (job["state"], job["stage"]):
                seen.append((job["state"], job["stage"]))
            if job["state"] in states:
                job["_seen"] = seen
                return dict(job)
            time.sleep(0.3)
        raise AssertionError(f"job {job_id} did not finish in {timeout} s; saw {seen}")

    def download(self, job_id: str, name: str, target: Path) -> Path:
        resp = self.request("GET", f"/v1/jobs/{job_id}/artifacts/{name}")
        assert resp.status_code == 302
        url = resp.headers["Location"]
        data = requests.get(url, timeout=60)
        assert data.status_code == 200
        target.write_bytes(data.content)
        return target

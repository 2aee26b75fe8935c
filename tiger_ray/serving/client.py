"""A small Python client for the recommendation API.

    from tiger_ray.serving.client import TigerClient

    client = TigerClient("http://127.0.0.1:8000")
    client.wait_until_ready()
    result = client.recommend(["B00004TUBL", 812, 4021], k=5, model="tiger")
    for item in result["items"]:
        print(item["rank"], item["asin"], item["title"], item["score"])

Errors come back as ``ServingError`` carrying the HTTP status and the server's JSON error body
(``error``, ``message``, ``fields``).
"""

from __future__ import annotations

import time
from typing import Sequence
from urllib.parse import quote, urlparse

import requests

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


class ServingError(RuntimeError):
    def __init__(self, status: int, body: dict | str):
        self.status = status
        self.body = body
        message = body.get("message", body) if isinstance(body, dict) else body
        super().__init__(f"HTTP {status}: {message}")

    @property
    def fields(self) -> list[dict]:
        return self.body.get("fields", []) if isinstance(self.body, dict) else []


class TigerClient:
    def __init__(self, url: str = "http://127.0.0.1:8000", timeout: float = 30.0,
                 session: requests.Session | None = None):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = session or requests.Session()
        if session is None and urlparse(self.url).hostname in LOOPBACK_HOSTS:
            # Never send loopback traffic through an HTTP(S)_PROXY from the environment.
            self.session.trust_env = False

    def recommend(self, history: Sequence[int | str], k: int = 10, model: str = "tiger",
                  user_id: int | None = None, temperature: float | None = None) -> dict:
        """Top-k for a history of item ids (int) and/or ASINs (str), oldest first."""
        body: dict = {"history": list(history), "k": k, "model": model}
        if user_id is not None:
            body["user_id"] = user_id
        if temperature is not None:
            body["temperature"] = temperature
        return self._request("POST", "/recommend", json=body)

    def item(self, item_id: int) -> dict:
        return self._request("GET", f"/items/{int(item_id)}")

    def item_by_asin(self, asin: str) -> dict:
        return self._request("GET", f"/items/asin/{quote(asin, safe='')}")

    def info(self) -> dict:
        return self._request("GET", "/info")

    def health(self) -> dict:
        return self._request("GET", "/healthz")

    def wait_until_ready(self, timeout: float = 120.0, interval: float = 0.5) -> dict:
        """Poll /healthz until every model answers; TimeoutError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                return self.health()
            except (requests.ConnectionError, requests.Timeout, ServingError) as err:
                last = err
                time.sleep(interval)
        raise TimeoutError(f"{self.url} not ready after {timeout:.0f}s (last error: {last})")

    def _request(self, method: str, path: str, **kwargs) -> dict:
        response = self.session.request(method, self.url + path, timeout=self.timeout, **kwargs)
        try:
            body = response.json()
        except ValueError:
            body = response.text
        if response.status_code >= 400:
            raise ServingError(response.status_code, body)
        return body

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> "TigerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

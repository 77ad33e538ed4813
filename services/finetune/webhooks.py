"""Webhook calls when a job or sweep ends: POST the record as proto3 JSON, signed, retried with backoff.

A webhook that keeps failing only costs a warning event; it never changes the job's outcome.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time

import httpx

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Genloom-Signature"
EVENT_HEADER = "X-Genloom-Event"


def signature(secret: str, body: bytes) -> str:
    """The X-Genloom-Signature value: sha256=<hex HMAC-SHA256 of the body with the secret>."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def deliver(
    url: str,
    secret: str,
    event: str,
    body: bytes,
    *,
    attempts: int = 5,
    backoff: float = 1.0,
    timeout: float = 10.0,
) -> str | None:
    """POST `body` to `url`; None on a 2xx answer, else why the last attempt failed (after `attempts` tries with
    delays backoff, 2*backoff, ...)."""
    headers = {"Content-Type": "application/json", EVENT_HEADER: event, "User-Agent": "genloom-webhook/1"}
    if secret:
        headers[SIGNATURE_HEADER] = signature(secret, body)
    problem = "not called"
    with httpx.Client(timeout=timeout, follow_redirects=False) as client:
        for attempt in range(attempts):
            if attempt:
                time.sleep(backoff * 2 ** (attempt - 1))
            try:
                answer = client.post(url, content=body, headers=headers)
            except httpx.HTTPError as err:
                problem = f"{type(err).__name__}: {err}"
                continue
            if 200 <= answer.status_code < 300:
                return None
            problem = f"HTTP {answer.status_code}"
    logger.warning("webhook %s (%s) failed after %d attempts: %s", url, event, attempts, problem)
    return f"{problem} after {attempts} attempts"

"""Job and sweep ids: a prefix and a ULID (48-bit millisecond time, 80 random bits) in lowercase Crockford base32,
so ids sort by creation time and never contain ':' (they end fine-tuned model names)."""

from __future__ import annotations

import os
import re
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
JOB_ID = re.compile(r"^ftjob-[0-9a-hjkmnp-tv-z]{26}$")
SWEEP_ID = re.compile(r"^ftsweep-[0-9a-hjkmnp-tv-z]{26}$")


def ulid() -> str:
    value = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    return "".join(_ALPHABET[(value >> shift) & 31] for shift in range(125, -1, -5))


def new_job_id() -> str:
    return "ftjob-" + ulid()


def new_sweep_id() -> str:
    return "ftsweep-" + ulid()

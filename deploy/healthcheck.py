#!/usr/bin/env python3
"""Container health check: exit 0 if GET /health answers 200, else 1.

Reads MAGNUS_PORT (default 8000); when MAGNUS_AUTH_HEALTH_METRICS is true, sends the first of
MAGNUS_API_KEYS (comma-separated or a JSON list) as a bearer token. Standard library only.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request


def first_key(raw: str) -> str | None:
    raw = raw.strip()
    keys = json.loads(raw) if raw.startswith("[") else raw.split(",")
    keys = [str(k).strip() for k in keys if str(k).strip()]
    return keys[0] if keys else None


def main() -> int:
    port = os.environ.get("MAGNUS_PORT", "8000")
    req = urllib.request.Request(f"http://127.0.0.1:{port}/health")
    if os.environ.get("MAGNUS_AUTH_HEALTH_METRICS", "").strip().lower() in ("1", "true", "yes", "on"):
        key = first_key(os.environ.get("MAGNUS_API_KEYS", ""))
        if key:
            req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=4) as resp:
            return 0 if resp.status == 200 else 1
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

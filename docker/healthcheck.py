#!/opt/venv/bin/python
"""Container healthcheck: exit 0 only when the service answers GET /ready with 200."""

import sys
import urllib.request

from service.settings import get_settings

TIMEOUT_S = 4


def main() -> int:
    url = f"http://127.0.0.1:{get_settings().port}/ready"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return 0 if response.status == 200 else 1
    except OSError as err:  # connection refused, timeout, or an HTTP error status
        print(f"{url}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

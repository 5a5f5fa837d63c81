#!/opt/venv/bin/python
"""Container healthcheck: exit 0 only when the service answers GET /ready with 200.

It reads D2LORA_PORT itself (the one setting it needs, default as in service/settings.py) rather than
importing the settings module, which imports torch: seconds of the HEALTHCHECK's 5 s timeout.
"""

import os
import sys
import urllib.request

TIMEOUT_S = 4
DEFAULT_PORT = 8000


def main() -> int:
    url = f"http://127.0.0.1:{int(os.environ.get('D2LORA_PORT', DEFAULT_PORT))}/ready"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return 0 if response.status == 200 else 1
    except OSError as err:  # connection refused, timeout, or an HTTP error status
        print(f"{url}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

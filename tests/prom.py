"""promtool and prometheus for the tests, unpacked from Debian's package into a cache folder.

No system install: `apt-get download prometheus` fetches the .deb and `dpkg-deb -x`
unpacks it under `<cache_dir>/tools/prometheus`.  `make install` runs this file
once (`python tests/prom.py`, after `apt-get update`); tests call `require_tool`,
which finds a tool on PATH or in the cache, unpacks it when apt-get can, and
otherwise skips with the command that would fetch it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DEBIAN_PACKAGE = "prometheus"
TOOLS = ("prometheus", "promtool")
FETCH_HINT = "apt-get update && python tests/prom.py  (make install does this)"


class ToolUnavailable(RuntimeError):
    """The Prometheus tools are neither installed nor fetchable here."""


def cache_folder() -> Path:
    from service.settings import get_settings

    return get_settings().cache_dir / "tools" / DEBIAN_PACKAGE


def find_tool(name: str) -> Path | None:
    """The tool on PATH, else the unpacked copy in the cache folder, else None."""
    on_path = shutil.which(name)
    if on_path:
        return Path(on_path)
    unpacked = cache_folder() / "usr" / "bin" / name
    return unpacked if unpacked.is_file() else None


def _run(command: list[str], cwd: Path) -> None:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        reason = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ToolUnavailable(f"`{' '.join(command)}` failed: {reason[0]}")


def download_deb(into: Path) -> Path:
    """Fetch Debian's package file into `into` (needs apt-get and fresh apt lists)."""
    if shutil.which("apt-get") is None:
        raise ToolUnavailable("apt-get is not available on this machine")
    _run(["apt-get", "download", DEBIAN_PACKAGE], cwd=into)
    return next(into.glob(f"{DEBIAN_PACKAGE}_*.deb"))


def unpack(deb: Path, dest: Path) -> None:
    """Extract the package's files into `dest`, atomically: a half-unpacked folder never appears."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        _run(["dpkg-deb", "-x", str(deb), str(staging)], cwd=dest.parent)
        staging.rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def install() -> Path:
    """Make sure both tools exist in the cache folder; return that folder."""
    dest = cache_folder()
    if all((dest / "usr" / "bin" / tool).is_file() for tool in TOOLS):
        return dest
    with tempfile.TemporaryDirectory() as download_dir:
        deb = download_deb(Path(download_dir))
        shutil.rmtree(dest, ignore_errors=True)
        unpack(deb, dest)
    return dest


def require_tool(name: str) -> Path:
    """For tests: the tool's path, fetching it if this machine can; pytest.skip otherwise."""
    import pytest

    found = find_tool(name)
    if found is not None:
        return found
    try:
        return install() / "usr" / "bin" / name
    except ToolUnavailable as err:
        pytest.skip(f"{name} not found ({err}); fetch it with: {FETCH_HINT}")


def main() -> int:
    try:
        folder = install()
    except ToolUnavailable as err:
        print(f"tests/prom.py: error: {err}; try: {FETCH_HINT}", file=sys.stderr)
        return 1
    print(folder / "usr" / "bin")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `service` when run as a script
    sys.exit(main())

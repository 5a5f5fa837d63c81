"""Programs the tests need (Prometheus, promtool, HAProxy), unpacked from Debian's packages into a cache folder.

No system install: `apt-get download` fetches a tool's package, plus the packages of the shared
libraries it needs that a minimal Debian lacks, and `dpkg-deb -x` unpacks them all under
`<cache_dir>/tools/<package>`.  A tool with such libraries gets a wrapper script beside it,
`<folder>/bin/<tool>`, that points the loader at them and `exec`s the binary (so its pid is the
tool's).  `make install` runs this file once (`python tests/support/tools.py`, after `apt-get update`);
tests call `require_tool`, which finds a tool on PATH or in the cache, unpacks it when apt-get can,
and otherwise skips with the command that would fetch it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

FETCH_HINT = "apt-get update && python tests/support/tools.py  (make install does this)"


class ToolUnavailable(RuntimeError):
    """The tool is neither installed nor fetchable here."""


@dataclass(frozen=True)
class DebianPackage:
    name: str
    binaries: tuple[str, ...]  # paths inside the package, e.g. "usr/bin/promtool"
    libraries: tuple[str, ...] = ()  # packages of the shared libraries the binaries need beyond a minimal Debian

    def folder(self) -> Path:
        from service.settings import get_settings

        return get_settings().cache_dir / "tools" / self.name

    def entry(self, binary: str, folder: Path | None = None) -> Path:
        """What to run: the binary itself, or its wrapper when it needs the unpacked libraries."""
        folder = folder or self.folder()
        return folder / "bin" / Path(binary).name if self.libraries else folder / binary

    def unpacked(self) -> bool:
        return all(self.entry(binary).is_file() for binary in self.binaries)


PACKAGES = (
    DebianPackage("prometheus", ("usr/bin/prometheus", "usr/bin/promtool")),
    DebianPackage("haproxy", ("usr/sbin/haproxy",), ("liblua5.3-0", "libopentracing-c-wrapper0", "libopentracing1")),
)
TOOLS = {Path(binary).name: (package, binary) for package in PACKAGES for binary in package.binaries}


def find_tool(name: str) -> Path | None:
    """The tool on PATH, else the unpacked copy in the cache folder, else None."""
    on_path = shutil.which(name)
    if on_path:
        return Path(on_path)
    package, binary = TOOLS[name]
    entry = package.entry(binary)
    return entry if entry.is_file() else None


def _run(command: list[str], cwd: Path) -> None:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        reason = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ToolUnavailable(f"`{' '.join(command)}` failed: {reason[0]}")


def download_debs(names: list[str], into: Path) -> list[Path]:
    """Fetch Debian's package files into `into` (needs apt-get and fresh apt lists)."""
    if shutil.which("apt-get") is None:
        raise ToolUnavailable("apt-get is not available on this machine")
    _run(["apt-get", "download", *names], cwd=into)
    return sorted(into.glob("*.deb"))


def write_wrapper(package: DebianPackage, binary: str, staging: Path, dest: Path) -> None:
    """`bin/<tool>` in staging: the loader pointed at the unpacked libraries (as they will lie under dest)."""
    library_dirs = sorted({path.parent.relative_to(staging) for path in staging.glob("usr/lib/**/*.so*")})
    path = ":".join(str(dest / folder) for folder in library_dirs)
    wrapper = package.entry(binary, staging)
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    wrapper.write_text(
        f'#!/bin/sh\nLD_LIBRARY_PATH="{path}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}" exec "{dest / binary}" "$@"\n'
    )
    wrapper.chmod(0o755)


def unpack(package: DebianPackage, debs: list[Path], dest: Path) -> None:
    """Extract every package file into `dest`, atomically: a half-unpacked folder never appears."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        for deb in debs:
            _run(["dpkg-deb", "-x", str(deb), str(staging)], cwd=dest.parent)
        if package.libraries:
            for binary in package.binaries:
                write_wrapper(package, binary, staging, dest)
        staging.chmod(0o755)  # mkdtemp makes it 0700
        staging.rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def install(package: DebianPackage) -> Path:
    """Make sure the package's tools exist in its cache folder; return that folder."""
    dest = package.folder()
    if package.unpacked():
        return dest
    with tempfile.TemporaryDirectory() as download_dir:
        debs = download_debs([package.name, *package.libraries], Path(download_dir))
        shutil.rmtree(dest, ignore_errors=True)
        unpack(package, debs, dest)
    return dest


def require_tool(name: str) -> Path:
    """For tests: the tool's path, fetching it if this machine can; pytest.skip otherwise."""
    import pytest

    found = find_tool(name)
    if found is not None:
        return found
    package, binary = TOOLS[name]
    try:
        install(package)
    except ToolUnavailable as err:
        pytest.skip(f"{name} not found ({err}); fetch it with: {FETCH_HINT}")
    return package.entry(binary)


def main() -> int:
    for package in PACKAGES:
        try:
            folder = install(package)
        except ToolUnavailable as err:
            print(f"tests/support/tools.py: error: {package.name}: {err}; try: {FETCH_HINT}", file=sys.stderr)
            return 1
        print(folder)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, when run as a script
    sys.exit(main())

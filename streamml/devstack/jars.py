"""Fetch the Kafka broker jars from Maven Central once, and find a Java runtime for them."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

from streamml.errors import ArtifactFetchError, JavaNotFoundError

MIN_JAVA = 17
_COMPLETE = ".complete"
_NETWORK_SIGNS = re.compile(
    r"Could not transfer|UnknownHost|Unknown host|Connection refused|Network is unreachable|"
    r"Connect timed out|No route to host|Temporary failure in name resolution|"
    # -q hides the transfer errors; a plugin that cannot be found was not downloadable.
    r"No plugin found for prefix",
    re.IGNORECASE,
)

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    return None


def resource_text(name: str) -> str:
    """Text of a file shipped in ``streamml/devstack/resources``."""
    return (resources.files("streamml.devstack") / "resources" / name).read_text("utf-8")


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_kafka_jars(
    version: str,
    cache_dir: Path,
    libs_dir: Path | None = None,
    progress: Progress = _quiet,
) -> Path:
    """Return a folder holding the broker's jars, fetching them with Maven the first time.

    A configured ``libs_dir`` is used as it is. Fetched jars are kept in
    ``<cache_dir>/kafka/<version>/libs`` and reused by every later clone.
    """
    if libs_dir is not None:
        if not any(libs_dir.glob("kafka_2.13-*.jar")):
            raise ArtifactFetchError(
                f"STREAMML_KAFKA_LIBS_DIR={libs_dir} holds no kafka_2.13-*.jar",
                hint="point it at the libs/ folder of an Apache Kafka distribution",
            )
        return libs_dir
    home = cache_dir / "kafka" / version
    libs = home / "libs"
    if (libs / _COMPLETE).exists():
        return libs
    with _file_lock(home / ".lock"):
        if (libs / _COMPLETE).exists():  # another process fetched them meanwhile
            return libs
        progress(f"fetching Apache Kafka {version} broker jars from Maven Central (once) ...")
        _maven_copy(version, home, progress)
    return libs


def _maven_copy(version: str, home: Path, progress: Progress) -> None:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise ArtifactFetchError(
            "Maven (mvn) is not installed, so the Kafka broker jars cannot be fetched",
            hint="install it (apt-get install maven) or set STREAMML_KAFKA_LIBS_DIR "
            "to the libs/ folder of a Kafka distribution",
        )
    home.mkdir(parents=True, exist_ok=True)
    pom = home / "pom.xml"
    pom.write_text(resource_text("pom.xml").replace("@KAFKA_VERSION@", version), "utf-8")
    partial = home / "libs.partial"
    shutil.rmtree(partial, ignore_errors=True)
    cmd = [
        mvn,
        "-B",
        "-q",
        "-Dstyle.color=never",
        "-f",
        str(pom),
        "dependency:copy-dependencies",
        f"-DoutputDirectory={partial}",
        "-DincludeScope=runtime",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=900)
    if proc.returncode != 0 or not any(partial.glob("kafka_2.13-*.jar")):
        out = (proc.stdout + proc.stderr).strip().splitlines()
        tail = "\n".join(out[-15:])
        if _NETWORK_SIGNS.search(proc.stdout + proc.stderr):
            raise ArtifactFetchError(
                f"Maven Central is unreachable; could not fetch Kafka {version}:\n{tail}",
                hint="check the network or proxy (~/.m2/settings.xml), or set "
                "STREAMML_KAFKA_LIBS_DIR to an existing Kafka libs/ folder",
            )
        raise ArtifactFetchError(
            f"fetching Kafka {version} with Maven failed (exit {proc.returncode}):\n{tail}",
            hint="check STREAMML_KAFKA_VERSION names a released Kafka version",
        )
    libs = home / "libs"
    shutil.rmtree(libs, ignore_errors=True)
    os.replace(partial, libs)
    jars = sorted(p.name for p in libs.glob("*.jar"))
    (libs / _COMPLETE).write_text("\n".join(jars) + "\n", "utf-8")
    progress(f"fetched {len(jars)} jars into {libs}")


def find_java(java_home: Path | None = None) -> tuple[Path, int]:
    """Return the java executable and its major version, or say how to get one."""
    candidates: list[Path] = []
    home = java_home or (Path(os.environ["JAVA_HOME"]) if os.environ.get("JAVA_HOME") else None)
    if home is not None:
        candidates.append(home / "bin" / "java")
    on_path = shutil.which("java")
    if on_path:
        candidates.append(Path(on_path))
    if not candidates or not candidates[0].exists():
        where = f" at {candidates[0]}" if candidates else ""
        raise JavaNotFoundError(
            f"no Java runtime found{where}; the local Kafka broker needs Java {MIN_JAVA}+",
            hint="install one (apt-get install openjdk-17-jre-headless) or set STREAMML_JAVA_HOME",
        )
    java = candidates[0]
    major = java_major_version(java)
    if major < MIN_JAVA:
        raise JavaNotFoundError(
            f"{java} is Java {major}; the local Kafka broker needs Java {MIN_JAVA} or newer",
            hint="set STREAMML_JAVA_HOME to a newer JDK (see `ls /usr/lib/jvm`)",
        )
    return java, major


def java_major_version(java: Path) -> int:
    """Major version printed by ``java -version`` (``1.8.0`` -> 8, ``17.0.15`` -> 17)."""
    proc = subprocess.run(
        [str(java), "-version"], capture_output=True, text=True, check=False, timeout=60
    )
    return parse_java_version(proc.stderr + proc.stdout)


def parse_java_version(text: str) -> int:
    """Parse the banner of ``java -version``.

    >>> parse_java_version('openjdk version "17.0.15" 2025-04-15')
    17
    >>> parse_java_version('java version "1.8.0_402"')
    8
    """
    match = re.search(r'version "(\d+)(?:\.(\d+))?', text)
    if not match:
        raise JavaNotFoundError(f"cannot read the Java version from: {text.strip()[:200]!r}")
    major = int(match.group(1))
    if major == 1 and match.group(2):
        major = int(match.group(2))
    return major

"""The wheel holds every module of the four source folders under the one `curate` namespace, and
nothing else at top level. This is the check strict editable installs were meant to give us (a
subpackage missing from pyproject's list), done on the artifact users actually install."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FOLDERS = {
    "curate": "curate",
    "filters": "curate/filters",
    "reports": "curate/reports",
    "pipelines": "curate/pipelines",
}


def test_wheel_maps_the_folders_into_one_namespace(tmp_path):
    # build from a clean copy: setuptools reuses ./build/lib, whose stale files would hide a miss
    src = tmp_path / "src"
    shutil.copytree(
        REPO,
        src,
        ignore=shutil.ignore_patterns(
            ".venv",
            ".git",
            "build",
            "*.egg-info",
            "__pycache__",
            "demo-output",
            "test-artifacts",
            "runs",
            ".pytest_cache",
        ),
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-v",
            "-w",
            str(tmp_path),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # package data declared as packages (setuptools warns "Package 'curate.assets' is absent ..." otherwise)
    assert "absent from the `packages` configuration" not in proc.stdout + proc.stderr
    wheel = next(tmp_path.glob("curate-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"curate"}, tops
    missing = []
    for folder, package in FOLDERS.items():
        for src in (REPO / folder).rglob("*"):
            if src.suffix in (".py", ".toml") and "__pycache__" not in src.parts:
                target = f"{package}/{src.relative_to(REPO / folder).as_posix()}"
                if target not in names:
                    missing.append(target)
    assert not missing, f"not in the wheel (add the package to pyproject's list): {missing}"
    assert {"curate/assets/curate-tiny.safetensors", "curate/assets/curate-tiny.json"} <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), (
        "the Apache-2.0 LICENSE file is not in the wheel"
    )

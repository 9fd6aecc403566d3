"""Named pipeline specs shipped in pipelines/ (installed as the package curate.pipelines)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def preset_names() -> list[str]:
    root = resources.files("curate.pipelines")
    return sorted(p.name[: -len(".toml")] for p in root.iterdir() if p.name.endswith(".toml"))


def preset_path(name: str) -> Path:
    """A preset by name ("demo", "laion400m", ...), or the path itself if it is a file."""
    p = Path(name)
    if p.suffix == ".toml" or p.exists():
        return p  # a file path (load_spec names it if it does not exist)
    candidate = resources.files("curate.pipelines") / f"{name}.toml"
    if not candidate.is_file():
        raise FileNotFoundError(f"{name}: neither a spec file nor a preset (presets: {', '.join(preset_names())})")
    return Path(str(candidate))

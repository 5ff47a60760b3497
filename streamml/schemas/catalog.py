"""Find pipeline specs by name in the pipelines folder."""

from __future__ import annotations

from pathlib import Path

from streamml.errors import SpecError
from streamml.schemas.spec import PipelineSpec, load_spec


def spec_path(pipelines_dir: Path, name_or_path: str) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix in {".yaml", ".yml"}:
        return candidate
    for suffix in (".yaml", ".yml"):
        path = pipelines_dir / f"{name_or_path}{suffix}"
        if path.exists():
            return path
    known = sorted(p.stem for p in pipelines_dir.glob("*.y*ml")) if pipelines_dir.is_dir() else []
    raise SpecError(
        f"no pipeline spec named {name_or_path!r} in {pipelines_dir}",
        hint=f"known: {', '.join(known) or '(none)'}; or set STREAMML_PIPELINES_DIR",
    )


def load_pipelines(pipelines_dir: Path, names: list[str]) -> list[PipelineSpec]:
    """The named specs, or every spec in the folder when no name is given."""
    if not names:
        if not pipelines_dir.is_dir():
            return []
        paths = sorted(p for p in pipelines_dir.iterdir() if p.suffix in {".yaml", ".yml"})
    else:
        paths = [spec_path(pipelines_dir, n) for n in names]
    specs = [load_spec(p) for p in paths]
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise SpecError(f"two specs are named {spec.name!r}")
        seen.add(spec.name)
    return specs

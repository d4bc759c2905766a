"""Repository-relative paths: every default path is resolved against the repository root, not the cwd."""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve(path) -> Path:
    """Absolute paths stay as they are; relative ones are taken relative to the repository root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p

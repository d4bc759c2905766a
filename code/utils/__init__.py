"""Helpers of the training and test scripts. Default paths are taken from the repository root, not the cwd."""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve(path) -> Path:
    """An absolute path as it is; a relative one against the repository root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p

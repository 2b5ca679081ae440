"""Where the shipped digits-world models live."""

from __future__ import annotations

from pathlib import Path

from fastgen.errors import ModelLoadError

SD_TEACHER = "sd-digits"
FLUX_TEACHER = "flux-digits"
CLASSIFIER = "classifier"


def artifacts_dir() -> Path:
    return Path(__file__).resolve().parent / "artifacts"


def artifact(name: str, root: str | Path | None = None) -> Path:
    """Path of a shipped artefact folder, with a clear error when it has not been built."""
    path = (Path(root) if root else artifacts_dir()) / name
    if not path.is_dir():
        raise ModelLoadError(
            f"digits-world artefact '{name}' not found at {path}; build it with `fastgen zoo build` "
            f"(or `fastgen zoo build --quick` for a fast, low-quality build)"
        )
    return path


def sd_teacher(root=None) -> Path:
    return artifact(SD_TEACHER, root)


def flux_teacher(root=None) -> Path:
    return artifact(FLUX_TEACHER, root)


def classifier(root=None) -> Path:
    return artifact(CLASSIFIER, root)


def load_classifier(root=None):
    from fastgen.zoo.classifier import DigitsClassifier

    return DigitsClassifier.from_pretrained(classifier(root)).eval()

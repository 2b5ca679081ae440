"""Where the shipped digits-world models live, and the facts of that world other modules rely on."""

from __future__ import annotations

from pathlib import Path

from fastgen.errors import ModelLoadError

SD_TEACHER = "sd-digits"
FLUX_TEACHER = "flux-digits"
CLASSIFIER = "classifier"

#: Image size (pixels, square) of the UNet (Stable Diffusion layout) teacher's world.
UNET_RESOLUTION = 32
#: Image size (pixels, square) of the DiT (Flux layout) teacher's world: 32 px through the factor-2 VAE
#: is a 16x16 latent, packed by FluxPipeline into an 8x8 grid of 64 image tokens.
DIT_RESOLUTION = 32
#: Padded T5 lengths the DiT teacher was trained on (a random one per step).
DIT_TRAIN_TEXT_LENGTHS = (16, 32, 64)
#: T5 text length the digits protocol samples the DiT teacher with (FluxPipeline's ``max_sequence_length``).
DIT_MAX_SEQUENCE_LENGTH = 32
#: Classifier-free guidance scale the UNet teacher is sampled with.
UNET_GUIDANCE = 3.0
#: Classifier-free guidance scale the DiT teacher is sampled with (``true_cfg_scale``).
DIT_GUIDANCE = 1.5


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


#: Short names accepted wherever a teacher folder is expected.
ALIASES = {"digits-sd": SD_TEACHER, "digits-unet": SD_TEACHER, "digits-flux": FLUX_TEACHER, "digits-dit": FLUX_TEACHER}


def resolve_model(name_or_path: str | Path) -> Path:
    """A teacher given as a shipped alias (``digits-sd``, ``digits-flux``) or a local folder path."""
    key = str(name_or_path)
    if key in ALIASES:
        return artifact(ALIASES[key])
    return Path(name_or_path)

"""fastgen: distil diffusion teachers into few-step students.

Train a student (LCD, RG-LCD, SCott, BOOT, DisBack, CLEAR), export it as a diffusers
pipeline folder, and benchmark it against its teacher with one protocol.
"""

__version__ = "0.1.0"

from fastgen.errors import FastgenError  # noqa: F401


# Loaded on first access so that `import fastgen` stays light. diffusers resolves a pipeline
# component listed as ["fastgen", "ClearFluxTransformer2DModel"] in model_index.json with
# getattr(fastgen, ...) (after the caller imported fastgen), and looks up the loadable base class
# (ModelMixin) on the same module, hence both names.
_LAZY_ATTRIBUTES = {
    "ClearFluxTransformer2DModel": "fastgen.attention.flux",
    "ModelMixin": "fastgen.attention.flux",
}


def __getattr__(name):
    module = _LAZY_ATTRIBUTES.get(name)
    if module is None:
        raise AttributeError(f"module 'fastgen' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value

"""fastgen: distil diffusion teachers into few-step students.

Train a student (LCD, RG-LCD, SCott, BOOT, DisBack, CLEAR), export it as a diffusers
pipeline folder, and benchmark it against its teacher with one protocol.
"""

__version__ = "0.1.0"

from fastgen.errors import FastgenError  # noqa: F401

"""anystep: AnyFlow any-step video diffusion distillation with flow maps, on diffusers.

Importing the package is cheap (the command line starts in a fraction of a second); diffusers
and torch load when something needs them. To load a toy model folder with diffusers' own
``from_pretrained``, import its codec first: ``import anystep.models.codec`` (diffusers resolves the
folder's ``vae`` component by that module path and only looks at modules already imported).
"""

__version__ = "0.1.0"


def __getattr__(name):  # PEP 562: the codec class on demand, without importing diffusers up front
    if name == "SpaceToDepthCodec":
        from anystep.models.codec import SpaceToDepthCodec

        return SpaceToDepthCodec
    raise AttributeError(f"module 'anystep' has no attribute {name!r}")

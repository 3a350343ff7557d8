"""antismooth: very deep AttnScale/FeatScale Vision Transformers trained at scale.

Importing the package registers every model family with timm, so that
`timm.create_model('attnscale_small_24', ...)` works after `import antismooth`.
"""
from antismooth import models  # noqa: F401  (registers the model zoo with timm)

__version__ = "0.1.0"

"""negstudy: when and how negative prompts act in text-to-image diffusion models.

Kept import-light: ``import negstudy`` loads neither torch nor diffusers.
"""

__version__ = "0.1.0"

"""Pretrained diffusers transformers (SD3, Flux) as rfkit velocity models, optionally with LoRA.

Needs the ``pretrained`` extra (diffusers, transformers, peft): ``pip install 'rfkit[pretrained]'``.
diffusers is imported when a model is built, so importing this package costs nothing.
"""

from rfkit.models.pretrained.flux import FluxTransformer
from rfkit.models.pretrained.lora import LoRA
from rfkit.models.pretrained.sd3 import SD3Transformer

__all__ = ["FluxTransformer", "LoRA", "SD3Transformer"]

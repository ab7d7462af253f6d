"""vistralv-ray: Ray-distributed training of Vistral-V, a Vietnamese LLaVA-style vision-language model."""

__version__ = "0.1.0"

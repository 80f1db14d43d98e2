"""bigsft: supervised fine-tuning of Hugging Face models under DeepSpeed on too-small hardware."""

__version__ = "0.1.0"

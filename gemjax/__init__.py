"""gemjax: early-fusion multimodal transformers in JAX, sharded for TPU pods."""

__version__ = '0.1.0'

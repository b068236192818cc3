"""The PyTorch twin of the JAX Llama: same config, HF parameter names, HammerLLM's CUDA kernels."""
from hammer_torch.cache import KVCache
from hammer_torch.checkpoint import from_pretrained, save_pretrained
from hammer_torch.loss import causal_lm_loss, chunked_cross_entropy
from hammer_torch.model import Llama

__all__ = ["KVCache", "Llama", "causal_lm_loss", "chunked_cross_entropy", "from_pretrained",
           "save_pretrained"]

"""Model adapters: Hugging Face models behind the core's ``ModelAdapter`` contract."""
from .base import HFAdapter, extend_prompt
from .causal_lm import CausalLMAdapter
from .llava import LlavaAdapter
from .loading import check_same_vocab, load_adapter
from .qwen2_vl import Qwen2VLAdapter

__all__ = ["CausalLMAdapter", "HFAdapter", "LlavaAdapter", "Qwen2VLAdapter", "check_same_vocab",
           "extend_prompt", "load_adapter"]

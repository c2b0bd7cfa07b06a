"""Model adapters: Hugging Face models behind the core's ``ModelAdapter`` contract."""
from .base import HFAdapter, extend_prompt
from .causal_lm import CausalLMAdapter
from .llava import LlavaAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .loading import check_same_vocab, load_adapter
from .qwen2_5_vl import Qwen2_5_VLAdapter
from .qwen2_vl import Qwen2VLAdapter
from .qwen3_vl import Qwen3VLAdapter

__all__ = ["CausalLMAdapter", "HFAdapter", "LlavaAdapter", "LlavaOnevisionAdapter",
           "Qwen2VLAdapter", "Qwen2_5_VLAdapter", "Qwen3VLAdapter", "check_same_vocab",
           "extend_prompt", "load_adapter"]

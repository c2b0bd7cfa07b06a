"""Test support: a tiny offline LLaVA / Qwen2-VL model suite (``tiny.py``)."""

"""lmms_sd: speculative decoding for vision-language models, measured inside lmms-eval."""
__version__ = "0.1.0"

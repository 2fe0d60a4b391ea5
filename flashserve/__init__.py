"""flashserve: the DeepSeek-V4-Flash chat API on an embedded PyTorch engine or remote backends."""

__version__ = "0.1.0"

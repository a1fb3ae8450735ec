"""allattn: All-attention networks with persistent memory (arXiv 1907.01470)."""
__version__ = "0.1.0"

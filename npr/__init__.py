"""NPR: Native Parallel Reasoner — parse, lay out, decode and train parallel reasoning."""

__version__ = "0.1.0"

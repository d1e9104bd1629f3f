"""The NPR engine: parallel decoding of Map-Process-Reduce trajectories over a shared KV pool."""

from npr.engine.engine import LLM, load
from npr.engine.params import FINISH_REASONS, SamplingParams
from npr.engine.request import Completion

__all__ = ["LLM", "SamplingParams", "Completion", "FINISH_REASONS", "load"]

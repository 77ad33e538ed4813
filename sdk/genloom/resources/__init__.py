"""One module per service; each has a sync and an async resource class."""

from genloom.resources.inference import AsyncInference, Inference
from genloom.resources.tasks import AsyncTasks, Tasks
from genloom.resources.tokenizer import AsyncTokenizer, Tokenizer

__all__ = ["AsyncInference", "AsyncTasks", "AsyncTokenizer", "Inference", "Tasks", "Tokenizer"]

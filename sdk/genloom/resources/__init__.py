"""One module per service; each has a sync and an async resource class."""

from genloom.resources.finetune import (
    AsyncFineTuning,
    AsyncJobEventStream,
    AsyncPage,
    AsyncPager,
    AsyncSweeps,
    FineTuning,
    JobEventStream,
    Page,
    Sweeps,
)
from genloom.resources.inference import AsyncInference, Inference
from genloom.resources.tasks import AsyncTasks, Tasks
from genloom.resources.tokenizer import AsyncTokenizer, Tokenizer

__all__ = [
    "AsyncFineTuning",
    "AsyncInference",
    "AsyncJobEventStream",
    "AsyncPage",
    "AsyncPager",
    "AsyncSweeps",
    "AsyncTasks",
    "AsyncTokenizer",
    "FineTuning",
    "Inference",
    "JobEventStream",
    "Page",
    "Sweeps",
    "Tasks",
    "Tokenizer",
]

"""Pure-Python scheduling: sequences, the paged-block manager, continuous batching, routing policy.

Imports neither torch nor ray, so it can be reasoned about and tested on its own.
"""

from scheduler.block_manager import BlockManager
from scheduler.scheduler import (
    QueueFullError,
    RequestTooLongError,
    ScheduledBatch,
    Scheduler,
    SchedulerConfig,
)
from scheduler.sequence import Sequence, SequenceStatus

__all__ = [
    "BlockManager",
    "QueueFullError",
    "RequestTooLongError",
    "ScheduledBatch",
    "Scheduler",
    "SchedulerConfig",
    "Sequence",
    "SequenceStatus",
]

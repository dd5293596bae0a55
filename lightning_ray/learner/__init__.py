"""DeepSpeed learners as Ray actors: `LearnerGroup` drives `learner.num_workers` `LearnerWorker` ranks."""

from lightning_ray.learner.group import LearnerGroup
from lightning_ray.learner.worker import LearnerWorker

__all__ = ["LearnerGroup", "LearnerWorker"]

"""DeepSpeed learners as Ray actors: `LearnerGroup` drives `learner.num_workers` `LearnerWorker` ranks."""

from lightning_ray.learner.group import LearnerFailed, LearnerGroup, NonFiniteSteps
from lightning_ray.learner.worker import LearnerWorker

__all__ = ["LearnerFailed", "LearnerGroup", "LearnerWorker", "NonFiniteSteps"]

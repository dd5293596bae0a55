"""Failure classification, per-batch summaries, the failure-rate stop, and Ray dashboard metrics."""

from lightning_ray.monitor.errors import (
    Failure,
    FailureKind,
    classify_exception,
    classify_outcome,
    exception_chain,
    is_tool_exception,
    message_template,
)
from lightning_ray.monitor.summary import (
    BatchSummary,
    FailurePattern,
    FailureRateExceeded,
    check_failure_rate,
    summarize_batch,
)

__all__ = [
    "BatchSummary",
    "Failure",
    "FailureKind",
    "FailurePattern",
    "FailureRateExceeded",
    "check_failure_rate",
    "classify_exception",
    "classify_outcome",
    "exception_chain",
    "is_tool_exception",
    "message_template",
    "record_batch_metrics",
    "summarize_batch",
]


def __getattr__(name: str):
    # metrics imports Ray; only when asked.
    if name == "record_batch_metrics":
        from lightning_ray.monitor.metrics import record_batch_metrics

        return record_batch_metrics
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Tool schemas shared by the gateway's tool-call tests."""

from lightning_ray.preflight import SAMPLE_TOOL as CALC_TOOL  # the calculator `lightning-ray check` renders

__all__ = ["CALC_TOOL"]

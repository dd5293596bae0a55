"""The learner's non-finite guards without DeepSpeed: `ClippedAdamW` (plain fp32 without ZeRO), the loss that
poisons every gradient, the skip counts, and the named errors of the learner group."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_ray.learner.engine import ClippedAdamW
from lightning_ray.learner.group import LearnerFailed, NonFiniteSteps
from lightning_ray.learner.step import _skip_counts, skip_nonfinite


def adamw_after_backward(grad: float, max_grad_norm: float = 1.0) -> tuple[ClippedAdamW, torch.nn.Linear]:
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    opt = ClippedAdamW(list(layer.parameters()), max_grad_norm=max_grad_norm, lr=0.1, weight_decay=0.1)
    for p in layer.parameters():
        p.grad = torch.full_like(p, grad)
    return opt, layer


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_clipped_adamw_skips_a_nonfinite_gradient_and_leaves_everything_as_it_was(bad):
    opt, layer = adamw_after_backward(1.0)
    opt.step()  # one real step, so there is Adam state to keep
    weights = [p.detach().clone() for p in layer.parameters()]
    state = {k: {n: t.clone() for n, t in v.items()} for k, v in opt.state.items()}
    next(layer.parameters()).grad[0, 0] = bad
    opt.step()
    assert opt.overflow and not math.isfinite(opt._global_grad_norm)
    for p, w in zip(layer.parameters(), weights, strict=True):
        assert torch.equal(p, w)  # not even weight decay
    for k, v in opt.state.items():
        for n, t in v.items():
            assert torch.equal(t, state[k][n]), n


def test_clipped_adamw_clips_with_a_float64_norm():
    """Gradients of 1e20 are finite; their float32 sum of squares is not, their float64 norm is."""
    opt, layer = adamw_after_backward(1e20)
    assert not math.isfinite(float(torch.nn.utils.get_total_norm([p.grad for p in layer.parameters()])))
    opt.step()
    assert not opt.overflow and opt._global_grad_norm == pytest.approx(1e20 * math.sqrt(15))
    clipped = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in layer.parameters()))
    assert clipped == pytest.approx(1.0, rel=1e-5) and opt.state  # clipped to max_grad_norm, then stepped


def test_a_nonfinite_loss_makes_every_gradient_nan():
    w = torch.ones(3, requires_grad=True)
    # inf * 0 in the forward: the loss is NaN, yet its gradient alone would be finite (zero) for w[2]
    loss = (w * torch.tensor([1.0, math.inf, 0.0])).sum() * 0.0
    skip_nonfinite(loss).backward()
    assert torch.isnan(w.grad).all()
    finite = (w * 2.0).sum()
    assert skip_nonfinite(finite) is finite


def test_skip_counts_name_the_reason():
    # three optimizer steps: applied, skipped with a non-finite loss on some rank, skipped on gradients alone
    assert _skip_counts([True, False, False], [0.0, 2.0, 0.0]) == {
        "skipped_steps": 2,
        "skipped_nonfinite_loss": 1,
        "skipped_nonfinite_grad": 1,
    }


def test_error_messages_name_what_failed():
    e = LearnerFailed([1], "train_step", 7, "died during train_step (learner step 7)")
    assert (e.ranks, e.method, e.step) == ([1], "train_step", 7)
    assert str(e).startswith("learner rank 1 died during train_step (learner step 7)")
    assert "learner ranks [0, 1]" in str(LearnerFailed([0, 1], "setup", 0, "did not finish setup"))
    bad = NonFiniteSteps(
        {4: ["nonfinite_loss"], 5: ["nonfinite_grad"], 6: ["nonfinite_loss", "nonfinite_grad"]}
    )
    assert "3 learner steps in a row" in str(bad)
    assert "step 5 (nonfinite_grad)" in str(bad) and "step 6 (nonfinite_loss+nonfinite_grad)" in str(bad)
    assert "trainer.max_bad_steps" in str(bad)

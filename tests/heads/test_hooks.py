"""Early-stopping forward passes (:mod:`maps_utils.heads.hooks`) on a tiny random Llama: a hook that raises
:class:`StopForward` ends the pass before any later layer runs, the hooks passed in are removed however the pass ends
(stopped, failed or finished), and any other exception reaches the caller."""

from __future__ import annotations

import contextlib

import pytest
import torch

from maps_utils.heads.hooks import StopForward, run_until_stop

from ..conftest import make_tiny

IDS = torch.tensor([[1, 2, 3, 4]])


@pytest.fixture
def model():
    return make_tiny("llama-gqa")  # 2 layers, d_model 64


def hidden(out) -> torch.Tensor:
    """A decoder layer's residual-stream output (a tensor, or the first item of a tuple in older transformers)."""
    return out[0] if isinstance(out, tuple) else out


def counter(module, calls: list):
    """A forward hook on ``module`` that appends its output's shape to ``calls``; returns its handle."""
    return module.register_forward_hook(lambda mod, args, out: calls.append(tuple(hidden(out).shape)))


def raiser(module, error: BaseException, seen: list | None = None):
    """A forward hook on ``module`` that records its output in ``seen``, then raises ``error``; returns its handle."""

    def hook(mod, args, out):
        if seen is not None:
            seen.append(hidden(out).clone())
        raise error

    return module.register_forward_hook(hook)


def test_a_stop_in_the_first_layer_means_the_second_layer_never_runs(model):
    first, second = model.model.layers
    seen, later = [], []
    handles = [raiser(first, StopForward(), seen), counter(second, later)]
    assert run_until_stop(model, handles, input_ids=IDS) is None
    assert later == []  # layer 1 never ran
    assert len(seen) == 1 and seen[0].shape == (1, 4, 64)  # layer 0's output was read before the stop


def test_what_the_hook_read_before_stopping_equals_the_full_pass(model):
    seen = []
    run_until_stop(model, [raiser(model.model.layers[0], StopForward(), seen)], input_ids=IDS)
    full = model(input_ids=IDS, output_hidden_states=True).hidden_states[1]  # after block 0
    torch.testing.assert_close(seen[0], full, rtol=0, atol=0)


def test_a_pass_without_a_stop_runs_every_layer(model):
    calls = []
    run_until_stop(model, [counter(layer, calls) for layer in model.model.layers], input_ids=IDS)
    assert calls == [(1, 4, 64), (1, 4, 64)]


@pytest.mark.parametrize("ending", ["stop", "error", "finish"])
def test_the_hooks_are_removed_however_the_pass_ends(model, ending):
    first, second = model.model.layers
    calls = []
    handles = [counter(first, calls), counter(second, calls)]
    if ending != "finish":
        handles.append(raiser(first, StopForward() if ending == "stop" else RuntimeError("boom")))
    expect = pytest.raises(RuntimeError, match="boom") if ending == "error" else contextlib.nullcontext()
    with expect:
        run_until_stop(model, handles, input_ids=IDS)
    assert all(not layer._forward_hooks for layer in model.model.layers)
    before = len(calls)
    model(input_ids=IDS)  # the removed hooks neither count nor stop any more
    assert len(calls) == before


def test_an_exception_other_than_stop_forward_reaches_the_caller_and_stops_the_pass(model):
    later = []
    handles = [raiser(model.model.layers[0], ValueError("the hook's own bug")), counter(model.model.layers[1], later)]
    with pytest.raises(ValueError, match="the hook's own bug"):
        run_until_stop(model, handles, input_ids=IDS)
    assert later == []


def test_stop_forward_escapes_a_plain_forward_pass(model):
    handle = raiser(model.model.layers[0], StopForward())
    try:
        with pytest.raises(StopForward):
            model(input_ids=IDS)
    finally:
        handle.remove()

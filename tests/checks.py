"""Exactness checks shared by the tiny-model and embedded-model tests: the package's parity checks
(:mod:`maps_utils.heads.parity`), each asserted to find no difference."""

from __future__ import annotations

from maps_utils.heads import parity


def _assert(check, model, weights, input_ids, tol: float) -> None:
    problem = check(model, weights, input_ids, tol)
    assert problem is None, problem


def check_head_sum(model, weights, input_ids, tol: float) -> None:
    _assert(parity.head_sum, model, weights, input_ids, tol)


def check_values_and_z(model, weights, input_ids, tol: float) -> None:
    _assert(parity.values_and_z, model, weights, input_ids, tol)


def check_first_mlp(model, weights, input_ids, tol: float) -> None:
    _assert(parity.first_mlp, model, weights, input_ids, tol)


def check_embed_unembed(model, weights, input_ids, tol: float) -> None:
    _assert(parity.embed_unembed, model, weights, input_ids, tol)

"""Shared fixtures: a session-wide store of cases, their references and softrank objects.

Building a reference (per-sample Jacobians, Hessians) or a curvature representation costs a few
milliseconds; the store builds each once per session and hands the same object to every test
that asks for it. Tests never modify what they get from it.
"""
from __future__ import annotations

import pytest
import torch

from softrank import curvature

from .cases import build_case
from .reference import Reference

# The test models are tiny: one thread is faster than a pool (and far faster on a loaded machine).
torch.set_num_threads(1)


class Store:
    def __init__(self):
        self._cache = {}

    def _get(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def case(self, case_id):
        """A case kept for the session (do not use it where the model must be fresh)."""
        return self._get(("case", case_id), lambda: build_case(case_id))

    def reference(self, case_id) -> Reference:
        return self._get(("ref", case_id), lambda: Reference(self.case(case_id)))

    def model_data(self, case_id):
        return self._get(("md", case_id), lambda: self.case(case_id).model_data())

    def curvature(self, case_id, matrix="fisher", approximation="dense", centered=False):
        return self._get(("curv", case_id, matrix, approximation, centered),
                         lambda: curvature(self.model_data(case_id), matrix, approximation,
                                           centered=centered))


@pytest.fixture(scope="session")
def store():
    return Store()


@pytest.fixture(autouse=True)
def _seeded():
    """Tests that draw random vectors get the same ones on every run."""
    torch.manual_seed(0)

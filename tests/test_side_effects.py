"""The model is never changed (SPEC §6): after every computation its parameters, buffers,
train/eval flags, requires_grad flags, hooks and .grad fields are bit-identical, and the data
tensors are untouched.

The models are the BatchNorm + Dropout case (running statistics set) and the CNN case, in train
mode and in eval mode, with a frozen parameter, a user forward hook and a gradient left in
``.grad`` from a previous backward pass.
"""
from __future__ import annotations

import pytest
import torch

from softrank import ModelData, curvature
from softrank.curvature import hessian_vector_product
from softrank.measures import (
    effective_dimension, hessian_norms, soft_rank, soft_rank_gap, tic, trace_ratio,
)

from .cases import build_case

LAM = 0.1


def snapshot(model, X, y):
    return {
        "tensors": {k: (v.dtype, v.detach().clone())
                    for k, v in model.state_dict(keep_vars=True).items()},
        "parameter_objects": [id(p) for p in model.parameters()],
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else (id(p.grad), p.grad.clone())
                  for n, p in model.named_parameters()},
        "hooks": {n: [dict(getattr(m, h)) for h in ("_forward_hooks", "_forward_pre_hooks",
                                                     "_backward_hooks", "_backward_pre_hooks")]
                  for n, m in model.named_modules()},
        "data": (X.clone(), y.clone(), X.requires_grad, y.requires_grad),
    }


def assert_unchanged(before, after):
    assert before["tensors"].keys() == after["tensors"].keys()
    for k, (dtype, v) in before["tensors"].items():
        dtype2, v2 = after["tensors"][k]
        assert dtype == dtype2 and torch.equal(v, v2), f"{k} changed"
    for key in ("parameter_objects", "training", "requires_grad", "hooks"):
        assert before[key] == after[key], f"{key} changed"
    for n, g in before["grads"].items():
        g2 = after["grads"][n]
        assert (g is None) == (g2 is None), f"{n}.grad changed"
        if g is not None:
            assert g[0] == g2[0] and torch.equal(g[1], g2[1]), f"{n}.grad changed"
    X, y, xg, yg = before["data"]
    X2, y2, xg2, yg2 = after["data"]
    assert torch.equal(X, X2) and torch.equal(y, y2) and (xg, yg) == (xg2, yg2)


def kfac_trace(md, model):
    """KFAC on the user's model, restricted to its trainable Linear/Conv2d parameters."""
    names = [n for n, p in model.named_parameters() if p.requires_grad and isinstance(
        model.get_submodule(n.rsplit(".", 1)[0]), (torch.nn.Linear, torch.nn.Conv2d))]
    sub = ModelData(model, md.criterion, md.X, md.y, params=names)
    return curvature(sub, "fisher", "kfac").trace()


# name -> f(model_data, user_model)
COMPUTATIONS = {
    "model_data": lambda md, model: md.n_params,
    "dense_fisher": lambda md, model: curvature(md, "fisher", "dense").soft_rank(LAM),
    "dense_fisher_mc": lambda md, model: curvature(md, "fisher_mc", "dense",
                                                   random_state=0).trace(),
    "dense_gsm_centered": lambda md, model: curvature(md, "gsm", "dense", centered=True).trace(),
    "dense_hessian": lambda md, model: curvature(md, "hessian", "dense").trace(),
    "gram_fisher": lambda md, model: curvature(md, "fisher", "gram").leverage(LAM),
    "gram_gsm": lambda md, model: curvature(md, "gsm", "gram").soft_rank(LAM),
    "gram_fisher_mc": lambda md, model: curvature(md, "fisher_mc", "gram", random_state=0).trace(),
    "diagonal": lambda md, model: curvature(md, "fisher", "diagonal").soft_rank(LAM),
    "kfac": kfac_trace,
    "hvp": lambda md, model: hessian_vector_product(md, torch.ones(md.n_params,
                                                                   dtype=torch.float64)),
    "soft_rank_gap": lambda md, model: soft_rank_gap(md, LAM, "gram").gap,
    "soft_rank_dense": lambda md, model: soft_rank(md, LAM, "dense").value,
    "tic_fisher": lambda md, model: tic(md, LAM, "gram").value,
    "tic_fisher_centered": lambda md, model: tic(md, LAM, "dense", centered=True).value,
    "tic_hessian": lambda md, model: tic(md, 5.0, variant="hessian").value,
    "trace_ratio": lambda md, model: trace_ratio(md).value,
    "hessian_norms": lambda md, model: hessian_norms(md, "spectral").value,
    "effective_dimension": lambda md, model: effective_dimension(md, LAM, "diagonal").value,
}


class HookCalls:
    """A forward hook that counts the calls it gets from the user's own module."""

    def __init__(self, module):
        self.module, self.calls_on_user_module = module, 0

    def __call__(self, module, args, out):
        if module is self.module:
            self.calls_on_user_module += 1


def user_model(case_id, mode):
    """A model as a user leaves it after training: mode set, one frozen parameter,
    a forward hook, and .grad fields from a last backward pass."""
    case = build_case(case_id)
    model = case.model
    model.train(mode == "train")
    first_bias = next(p for n, p in model.named_parameters() if n.endswith("bias"))
    first_bias.requires_grad_(False)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    hook = HookCalls(last)
    last.register_forward_hook(hook)
    last.weight.grad = torch.full_like(last.weight, 0.25)
    return case, hook


@pytest.mark.parametrize("computation", list(COMPUTATIONS))
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("case_id", ["bn-ce", "cnn-poisson"])
def test_model_is_unchanged(case_id, mode, computation):
    case, hook = user_model(case_id, mode)
    before = snapshot(case.model, case.X, case.y)
    COMPUTATIONS[computation](case.model_data(), case.model)
    assert_unchanged(before, snapshot(case.model, case.X, case.y))
    assert hook.calls_on_user_module == 0, "softrank ran the user's module itself"


def test_frozen_parameter_is_left_out_by_default():
    case, _ = user_model("bn-ce", "train")
    md = case.model_data()
    frozen = [n for n, p in case.model.named_parameters() if not p.requires_grad]
    assert frozen and not set(frozen) & set(md.param_names)
    assert md.n_params == sum(p.numel() for p in case.model.parameters() if p.requires_grad)


def test_user_hooks_stay_registered_and_are_not_duplicated():
    """softrank's own layer hooks are removed after each pass; the user's stay."""
    case, _ = user_model("cnn-ce", "eval")
    md = case.model_data()
    counts = {n: len(m._forward_hooks) for n, m in md.net.named_modules()}
    for approximation in ("gram", "kfac", "diagonal"):
        curvature(md, "fisher", approximation).trace()
    assert {n: len(m._forward_hooks) for n, m in md.net.named_modules()} == counts


def test_precision_of_the_private_copy_does_not_touch_the_model():
    case = build_case("mlp-ce")
    before = snapshot(case.model, case.X, case.y)
    md = ModelData(case.model, case.criterion, case.X, case.y, dtype=torch.float32)
    curvature(md, "fisher", "gram").trace()
    assert md.dtype == torch.float32
    assert_unchanged(before, snapshot(case.model, case.X, case.y))

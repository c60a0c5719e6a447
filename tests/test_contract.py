"""calibops/contract.py: the op's argument list, written once (OpCall), and the signature built from it.

The reference op, the Triton ops and their torch.library schemas all take their argument list from
``contract.op_signature`` / ``contract.implements_op``; these tests pin that list to the compiled extension's
schema (when it is built) and check that functions built with it accept positional and keyword calls alike and
name a missing or unexpected argument.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from calibops import contract
from calibops.contract import GRAD_NAMES, OpCall, implements_op, op_signature
from calibops.reference import binned_stats_prepared, scheme_edges


def _args(M=4, scheme=0, mode=0, moments=True):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 17)
    t = torch.randint(0, 3, (2, 1, 17))
    return (x, t, scheme_edges(M, scheme), M, scheme, 0, contract.TARGET_LABELS, mode, moments, None, False)


def test_signature_lists_the_op_call_in_order():
    fwd, bwd = op_signature(), op_signature(backward=True)
    assert tuple(fwd.parameters) == OpCall._fields
    assert tuple(bwd.parameters) == GRAD_NAMES + OpCall._fields
    types = {n: p.annotation for n, p in fwd.parameters.items()}
    assert types["input"] is torch.Tensor and types["num_bins"] is int and types["moments"] is bool
    assert all(bwd.parameters[n].annotation is torch.Tensor for n in GRAD_NAMES)
    assert bwd.return_annotation is torch.Tensor


def test_schema_inferred_from_the_signature():
    schema = torch.library.infer_schema(binned_stats_prepared, mutates_args=())
    assert schema == (
        "(Tensor input, Tensor target, Tensor edges, SymInt num_bins, SymInt scheme, SymInt activation, "
        "SymInt target_kind, SymInt mode, bool moments, SymInt? ignore_index, bool right) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
    )


def test_extension_schema_has_the_same_arguments():
    from calibops.backends import extension

    if not extension.extension_loaded():
        pytest.skip("the compiled extension is not built here")
    for op, backward in ((torch.ops.calibops.binned_stats, False), (torch.ops.calibops.binned_stats_backward, True)):
        names = tuple(a.name for a in op.default._schema.arguments)
        assert names == tuple(op_signature(backward).parameters)


def test_positional_and_keyword_calls_agree():
    args = _args()
    a = binned_stats_prepared(*args)
    b = binned_stats_prepared(**dict(zip(OpCall._fields, args)))
    c = binned_stats_prepared(*args[:3], **dict(zip(OpCall._fields[3:], args[3:])))
    for u, v, w in zip(a, b, c):
        assert torch.equal(u, v) and torch.equal(u, w)


def test_bad_calls_name_the_argument():
    args = _args()
    with pytest.raises(TypeError, match="right"):
        binned_stats_prepared(*args[:-1])
    with pytest.raises(TypeError, match="too many"):
        binned_stats_prepared(*args, True)
    with pytest.raises(TypeError, match="bins"):
        binned_stats_prepared(*args, bins=3)


def test_implements_op_hands_over_the_call_and_the_grads():
    seen = []

    @implements_op(backward=True)
    def backward(grads, call):
        """doc"""
        seen.append((grads, call))
        return call.input

    grads = tuple(range(5))
    args = _args()
    assert backward(*grads, *args) is args[0]
    assert backward(*grads, *args[:3], **dict(zip(OpCall._fields[3:], args[3:]))) is args[0]
    assert seen[0][0] == grads and isinstance(seen[0][1], OpCall) and seen[0][1].num_bins == 4
    assert all(u is v for u, v in zip(seen[0][1], seen[1][1]))
    assert inspect.signature(backward) == op_signature(backward=True)
    assert backward.__doc__ == "doc" and backward.__wrapped__.__name__ == "backward"

"""Mixed precision and a training loop without per-step host syncs."""

import ast
import inspect
import textwrap

import pytest
import torch

from flwr_gkt.core import training
from flwr_gkt.core.models import resnet8
from flwr_gkt.core.registry import build_server_model
from flwr_gkt.core.server import GKTServer
from flwr_gkt.core.training import (
    TensorBatches,
    autocast,
    bf16_supported,
    evaluate_logits,
    fit,
    make_optimizer,
    predict,
)
from flwr_gkt.data import client_data

CPU = torch.device("cpu")


def _train(precision: str, epochs: int = 3) -> tuple[float, float]:
    data = client_data(0, 1, fraction=0.02, test_fraction=0.05, seed=0)
    torch.manual_seed(0)
    model = resnet8(10, 1)
    gen = torch.Generator().manual_seed(0)
    res = fit(
        model,
        TensorBatches(data.x_train, data.y_train, 32, True, gen),
        make_optimizer("adam", model.parameters(), 0.003),
        epochs=epochs,
        device=CPU,
        precision=precision,
    )
    logits = predict(model, TensorBatches(data.x_test, data.y_test, 128), CPU, precision)
    _, correct = evaluate_logits(logits, data.y_test)
    return res.loss, correct / len(data.y_test)


@pytest.mark.skipif(not bf16_supported(CPU), reason="this CPU has no bf16 support")
def test_bf16_learns_and_matches_fp32_on_a_tiny_run():
    loss32, acc32 = _train("fp32")
    loss16, acc16 = _train("bf16")
    assert acc16 > 0.5 and acc32 > 0.5  # chance: 0.1
    assert abs(acc16 - acc32) < 0.08
    assert loss16 == pytest.approx(loss32, rel=0.15)


def test_unsupported_precisions_fail_clearly():
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        autocast(CPU, "fp16")
    with pytest.raises(ValueError, match="unknown precision"):
        autocast(CPU, "fp8")
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        GKTServer(build_server_model("resnet10", 10), device="cpu", precision="fp16")


@pytest.mark.skipif(not bf16_supported(CPU), reason="this CPU has no bf16 support")
def test_server_trains_in_bf16():
    torch.manual_seed(0)
    from flwr_gkt.core.payload import Payload

    server = GKTServer(
        build_server_model("resnet10", 10), epochs=2, batch_size=16, device="cpu", precision="bf16"
    )
    gen = torch.Generator().manual_seed(1)
    y = torch.randint(0, 10, (64,), generator=gen)
    x = torch.randn(64, 16, 8, 8, generator=gen) + y.view(-1, 1, 1, 1).float()
    server.put(1, Payload(x, y, torch.randn(64, 10, generator=gen)))
    result = server.train_round()
    assert result.num_examples == 64 and torch.isfinite(server.server_logits(1)).all()
    assert server.server_logits(1).dtype == torch.float32


def test_the_training_loop_does_not_synchronise_with_the_device_per_step():
    """Code check: inside the batch loop of ``fit`` nothing reads a tensor back to the host."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(training.fit)))
    loops = [n for n in ast.walk(tree) if isinstance(n, ast.For)]
    batch_loop = next(n for n in loops if ast.unparse(n.target).startswith("(inputs, labels"))
    syncing = []
    for node in ast.walk(batch_loop):
        if isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            if name in ("float", "int", "bool") or name.endswith(
                (".item", ".cpu", ".tolist", ".numpy")
            ):
                syncing.append(ast.unparse(node))
    assert not syncing, f"per-step host synchronisation in fit: {syncing}"


def test_auto_precision_is_bf16_where_supported_and_the_run_default():
    from flwr_gkt.config import RunConfig
    from flwr_gkt.core.training import resolve_precision

    want = "bf16" if bf16_supported(CPU) else "fp32"
    assert resolve_precision(CPU, "auto") == want
    assert resolve_precision(CPU, "fp32") == "fp32"
    assert autocast(CPU, "auto").fast_dtype == torch.bfloat16 or want == "fp32"
    assert RunConfig().edge_precision == RunConfig().server_precision == "auto"
    server = GKTServer(torch.nn.Linear(4, 2), device="cpu", precision="auto")
    assert server.precision == want


def test_a_compiled_server_trains_like_the_eager_one_and_keeps_its_state_dict_keys():
    """``server-compile``: the model is compiled in place (the ``eager`` backend here: the
    same graph capture as ``inductor``, without building kernels)."""
    from flwr_gkt.app.task import make_gkt_server
    from flwr_gkt.config import RunConfig
    from flwr_gkt.core.payload import Payload

    gen = torch.Generator().manual_seed(1)
    y = torch.randint(0, 10, (48,), generator=gen)
    x = torch.randn(48, 16, 8, 8, generator=gen) + y.view(-1, 1, 1, 1).float()
    z = torch.randn(48, 10, generator=gen)
    servers = []
    for backend in ("", "eager"):
        torch.manual_seed(0)
        cfg = RunConfig(server_compile=backend, server_precision="fp32", server_epochs=1)
        server = make_gkt_server(cfg)
        server.put(1, Payload(x, y, z))
        servers.append((server, server.train_round()))
    (eager, r_eager), (compiled, r_compiled) = servers
    assert (
        compiled.model._compiled_call_impl is not None and eager.model._compiled_call_impl is None
    )
    assert list(compiled.model.state_dict()) == list(eager.model.state_dict())
    assert r_compiled.num_examples == r_eager.num_examples == 48
    assert r_compiled.loss == pytest.approx(r_eager.loss, rel=1e-4)
    torch.testing.assert_close(
        compiled.server_logits(1), eager.server_logits(1), rtol=1e-3, atol=1e-3
    )


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_the_fused_optimizer_makes_the_same_updates_as_the_default_one(name):
    """``make_optimizer`` uses PyTorch's fused kernels on the CPU; the updates stay the same."""
    torch.manual_seed(0)
    fused_model = build_server_model("resnet10", 10)
    plain_model = build_server_model("resnet10", 10)
    plain_model.load_state_dict(fused_model.state_dict())
    initial = [p.detach().clone() for p in fused_model.parameters()]
    fused = training.make_optimizer(name, fused_model.parameters(), 1e-2)
    assert fused.defaults["fused"] is True
    plain = training.make_optimizer(name, plain_model.parameters(), 1e-2)
    for group in plain.param_groups:
        group["fused"], group["foreach"] = None, False  # PyTorch's one-tensor-at-a-time loop
    x, y = torch.randn(16, 16, 28, 28), torch.randint(0, 10, (16,))
    for _ in range(5):
        for model, opt in ((fused_model, fused), (plain_model, plain)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    moved = 0.0
    for a, b, p0 in zip(fused_model.parameters(), plain_model.parameters(), initial, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        moved = max(moved, float((a.detach() - p0).abs().max()))
    assert moved > 1e-3  # the optimizers did move the weights


def test_the_optimizer_is_not_fused_where_a_parameter_cannot_be():
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, device="meta"))]
    assert training.fused_supported(params) is None
    assert training.fused_supported(params[:1]) is True
    assert training.fused_supported([]) is None

"""MEND editor: the gradient decomposition, identity behaviour, functional editing, checkpoints."""
from __future__ import annotations

import pytest
import torch

from datamodules.encoding import collate, encode
from editors.layers import gradient_pieces, select_layers, weight_update
from editors.losses import forward_logits, nll
from editors.base import merge_deltas_
from editors.hypernet import LowRankResidualNet
from editors.mend import MEND
from lightning_modules.models import decoder_start_id


def _batch(tokenizer, family, model):
    prompts = ["Where was Foo born?", "What is the occupation of Bar?", "Which language does Baz speak?"]
    targets = ["Arvenna", "painter", "Orvic"] if family != "classifier" else ["SUPPORTS", "REFUTES", "SUPPORTS"]
    return collate(encode(tokenizer, family, prompts, targets), tokenizer.pad_token_id, family, decoder_start_id(model))


@pytest.mark.parametrize("family", ["causal", "seq2seq", "classifier"])
def test_decomposition_equals_autograd_weight_gradient(tiny_models, tokenizer, family):
    model = tiny_models[family]
    batch = _batch(tokenizer, family, model)
    layers = select_layers(model)
    assert layers, "default edited layers"
    pieces = gradient_pieces(model, layers, lambda: nll(forward_logits(model, batch, family), batch["labels"], family))
    assert all(p.grad is None for p in model.parameters()), "no .grad on base parameters"
    # reference: autograd's full weight gradient
    model.zero_grad()
    nll(forward_logits(model, batch, family), batch["labels"], family).backward()
    params = dict(model.named_parameters())
    for l in layers:
        u, d = pieces[l.name]
        keep = (u != 0).any(-1) & (d != 0).any(-1)  # padding tokens dropped, as the editor does
        got = weight_update(l, u[keep], d[keep])
        torch.testing.assert_close(got, params[l.name].grad, rtol=1e-4, atol=1e-6)
    model.zero_grad(set_to_none=True)


def test_gpt2_uses_conv1d_and_last_three_blocks(tiny_models):
    layers = select_layers(tiny_models["causal"])
    assert [l.kind for l in layers] == ["conv1d"] * 6
    assert {l.name.split(".")[2] for l in layers} == {"0", "1", "2"}  # a 3-block model: all three


def test_unknown_architecture_lists_candidates():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match="Candidate matrices: 0.weight, 2.weight"):
        select_layers(net)


@pytest.mark.parametrize("family", ["causal", "classifier"])
def test_identity_editor_with_unit_step_is_a_gradient_step(tiny_models, tokenizer, family):
    model = tiny_models[family]
    batch = _batch(tokenizer, family, model)
    editor = MEND.for_model(model, rank=16, init_edit_lr=1.0).eval()
    deltas = editor.deltas(model, batch, family)
    model.zero_grad()
    # several edits at once: one step on the sum of the edits' losses (each edit at its own scale)
    n = batch["input_ids"].shape[0]
    (n * nll(forward_logits(model, batch, family), batch["labels"], family)).backward()
    params = dict(model.named_parameters())
    for name, d in deltas.items():
        torch.testing.assert_close(d, -params[name].grad, rtol=1e-4, atol=1e-6)
    model.zero_grad(set_to_none=True)


def test_functional_edit_leaves_base_bit_identical_and_merge_matches(tiny_models, tokenizer):
    model = tiny_models["causal"]
    batch = _batch(tokenizer, "causal", model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    editor = MEND.for_model(model, rank=16, init_edit_lr=0.5).eval()
    edited = editor.edit(model, batch, "causal")
    out_edit = forward_logits(edited, batch, "causal")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not torch.allclose(out_edit, forward_logits(model, batch, "causal"))
    merged = edited.merged()
    torch.testing.assert_close(forward_logits(merged, batch, "causal"), out_edit, rtol=1e-5, atol=1e-5)
    merge_deltas_(model, edited.deltas)
    torch.testing.assert_close(forward_logits(model, batch, "causal"), out_edit, rtol=1e-5, atol=1e-5)


def test_running_norm_matches_batch_statistics_and_ignores_padding():
    from editors.hypernet import RunningNorm

    torch.manual_seed(0)
    norm = RunningNorm(2, 3)
    x1, x2 = torch.randn(2, 5, 3), torch.randn(2, 7, 3) * 3 + 1
    m1, m2 = torch.ones(2, 5, dtype=torch.bool), torch.rand(2, 7) > 0.3
    norm.update(x1, m1)
    norm.update(x2, m2)
    for l in range(2):
        rows = torch.cat([x1[l][m1[l]], x2[l][m2[l]]]).double()
        torch.testing.assert_close(norm.mean[l], rows.mean(0))
        torch.testing.assert_close((norm.m2[l] / (norm.count[l] - 1)), rows.var(0))


def test_input_preconditioner_is_ridge_inverse_of_input_correlation_and_identity_before_statistics():
    from editors.hypernet import InputPreconditioner

    torch.manual_seed(0)
    pre = InputPreconditioner(2, 3, ridge=0.5)
    u = torch.randn(2, 4, 3)
    assert torch.equal(pre(u), u), "no statistics yet: K is the identity"
    x = torch.randn(2, 12, 3) @ torch.randn(3, 3) * torch.tensor([1.0, 5.0, 0.2]) + 3  # correlated, offset
    mask = torch.rand(2, 12) > 0.3
    pre.update(x[:, :5], mask[:, :5])
    pre.update(x[:, 5:], mask[:, 5:])
    for l in range(2):
        rows = x[l][mask[l]].double()
        corr = torch.corrcoef(rows.T)
        torch.testing.assert_close(pre.matrix()[l], 1.5 * torch.linalg.inv(corr + 0.5 * torch.eye(3, dtype=corr.dtype)))
        torch.testing.assert_close(pre(u)[l], u[l] @ pre.matrix()[l].float())
    K = pre.matrix().clone()
    pre.update(x[:, :1], torch.ones(2, 1, dtype=torch.bool))  # far fewer inputs than seen: K is kept
    assert torch.equal(pre.matrix(), K)
    fresh = InputPreconditioner(2, 3, ridge=0.5)
    fresh.load_state_dict(pre.state_dict())  # a loaded (or resumed) one uses the K last computed, not a new one
    assert torch.equal(fresh.matrix(), K)
    pre.update(x, mask)  # inputs seen doubled: meta-training would recompute K ...
    pre.eval()  # ... but an editor in use (eval mode) keeps the stored one
    assert torch.equal(pre(u), u @ K.float())
    pre.train()
    assert not torch.equal(pre(u), u @ K.float())


def test_checkpoint_roundtrip_and_refuses_other_base(tiny_models, tokenizer, tmp_path):
    model = tiny_models["causal"]
    editor = MEND.for_model(model, rank=8)
    torch.nn.init.normal_(editor.nets[0].U)
    path = tmp_path / "editor.safetensors"
    editor.save(path, model)
    loaded = MEND.load(path, model)
    for k, v in editor.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    other = type(model)(model.config)  # same architecture, different weights
    with pytest.raises(ValueError, match="was trained for base model"):
        MEND.load(path, other)
    with pytest.raises(FileNotFoundError):
        MEND.load(tmp_path / "missing.ckpt", model)


def _reference_blocks(net: LowRankResidualNet, z: torch.Tensor) -> torch.Tensor:
    """The published blocks in plain autograd: ``z + clamp(s * (U V z + b) + o, min=0)`` per layer."""
    for i in range(net.U.shape[0]):
        pre = z @ net.V[i].T @ net.U[i].T + net.b[i]
        z = z + (net.scale[:, i].unsqueeze(1) * pre + net.shift[:, i].unsqueeze(1)).clamp(min=0)
    return z


@pytest.mark.parametrize("at_init", [True, False])
def test_residual_net_backward_matches_autograd_and_leaves_the_identity(at_init):
    torch.manual_seed(0)
    net = LowRankResidualNet(n_layers=2, dim=6, rank=4)
    if not at_init:
        with torch.no_grad():
            for p in (net.U, net.b, net.scale, net.shift):
                p.add_(0.3 * torch.randn_like(p))
    z = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    net = net.double()
    w = torch.randn(2, 5, 6, dtype=torch.float64)
    grads = []
    for f in (lambda x: net(x), lambda x: _reference_blocks(net, x)):
        net.zero_grad()
        out = f(z)
        (out * w).sum().backward()
        grads.append([p.grad.clone() for p in net.parameters()] + [z.grad.clone()])
        z.grad = None
        if at_init:
            assert torch.equal(out, z)  # the identity
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    # at the identity init every pre-activation is exactly 0: the gradient must still reach U,
    # or meta-training can only ever learn the step sizes
    assert grads[0][0].abs().sum() > 0


def test_editor_files_never_unpickle_and_refuse_truncation(tiny_models, tmp_path):
    """An editor file is safetensors + a JSON header: a pickle is refused with the converter's command
    (and the converter, run knowingly, makes a loadable file), a file cut at any point is refused."""
    from editors.convert import main as convert
    from editors.io import EditorFileError
    from editors.io import CHECKPOINT_KEY

    model = tiny_models["causal"]
    editor = MEND.for_model(model, rank=4)
    good = editor.save(tmp_path / "editor.safetensors", model)
    assert not list(tmp_path.glob(".*.tmp")), "the atomic write leaves no temporary file"
    old = tmp_path / "old.ckpt"
    torch.save({CHECKPOINT_KEY: {**editor.export(model), "format": 1}}, old)
    with pytest.raises(EditorFileError, match="pickle-based.*python -m editors.convert"):
        MEND.load(old, model)
    convert([str(old), str(tmp_path / "converted.safetensors")])
    assert MEND.load(tmp_path / "converted.safetensors", model).config == editor.config
    data = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    for n in [*range(0, 300), *range(300, len(data), max(1, len(data) // 300)), len(data) - 1]:  # header byte by byte
        cut.write_bytes(data[:n])
        with pytest.raises(EditorFileError):
            MEND.load(cut, model)
    with pytest.raises(EditorFileError, match="not Selector"):
        from editors.io import load_editor_file
        load_editor_file(good, "Selector")

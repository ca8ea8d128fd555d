"""Real architectures, tiny: GPT-2, GPT-J, LLaMA (gated FFN), T5 v1.1 (gated FFN), BART and a BERT
classifier built from their Hugging Face classes with random weights, saved, and loaded through
``load_model`` as a real base would be. Per architecture: the family's default rule and the shipped
config's ``edit_params`` select exactly the intended matrices, one MEND meta-training step gives
finite gradients on every editor parameter, and one edit changes the output on its input. Also: every
shipped config parses with ``--print_config`` without loading a model, the ``base_dtype`` option, and
the base-model fingerprint (stable, discriminating, computed once per meta-training run), and
Transformer-Patcher patches widened into a plain GPT-J, GPT-NeoX or T5 (``editors.widen``)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import yaml

import train
from datamodules.encoding import collate, encode
from editors.layers import check_fingerprint, fingerprint, select_layers
from editors.losses import forward_logits, nll, scores
from editors.io import CHECKPOINT_KEY
from editors.mend import MEND
from editors.patcher import Patcher, PatchEdit, installed_patches, resolve_site
from editors.widen import widen_ffn
from lightning_modules.mend_module import MENDModule
from lightning_modules.models import decoder_start_id, load_model

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def _gpt2(v: int, ids: dict):
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(vocab_size=v, n_layer=4, n_embd=32, n_head=2, n_positions=64, **ids))


def _gptj(v: int, ids: dict):
    from transformers import GPTJConfig, GPTJForCausalLM
    return GPTJForCausalLM(GPTJConfig(vocab_size=v, n_layer=4, n_embd=32, n_head=2, rotary_dim=8, n_positions=64, **ids))


def _neox(v: int, ids: dict):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=v, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                            intermediate_size=64, max_position_embeddings=64, **ids))


def _llama(v: int, ids: dict):
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, **ids))


def _t5(v: int, ids: dict, ffn: str = "gated-gelu"):
    from transformers import T5Config, T5ForConditionalGeneration
    return T5ForConditionalGeneration(T5Config(
        vocab_size=v, d_model=32, d_ff=64, d_kv=16, num_layers=3, num_decoder_layers=3, num_heads=2,
        feed_forward_proj=ffn, tie_word_embeddings=False, decoder_start_token_id=ids["pad_token_id"],
        pad_token_id=ids["pad_token_id"], eos_token_id=ids["eos_token_id"]))


def _bart(v: int, ids: dict):
    from transformers import BartConfig, BartForConditionalGeneration
    return BartForConditionalGeneration(BartConfig(
        vocab_size=v, d_model=32, encoder_layers=3, decoder_layers=3, encoder_ffn_dim=64, decoder_ffn_dim=64,
        encoder_attention_heads=2, decoder_attention_heads=2, max_position_embeddings=64,
        decoder_start_token_id=ids["bos_token_id"], forced_eos_token_id=ids["eos_token_id"], **ids))


def _bert(v: int, ids: dict):
    from transformers import BertConfig, BertForSequenceClassification
    return BertForSequenceClassification(BertConfig(vocab_size=v, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                                    intermediate_size=64, max_position_embeddings=64, num_labels=1,
                                                    pad_token_id=ids["pad_token_id"]))


def _names(fmt: str, blocks: range, mats: tuple[str, ...]) -> set[str]:
    return {fmt.format(b=b, m=m) for b in blocks for m in mats}


# name -> (builder, family, shipped config, the matrices MEND should edit in the tiny model)
ARCHS = {
    "gpt2": (_gpt2, "causal", "mend_zsre_gpt2xl",  # last 3 of 4 blocks, as MEND on GPT-2 XL
             _names("transformer.h.{b}.mlp.{m}.weight", range(1, 4), ("c_fc", "c_proj"))),
    "gptj": (_gptj, "causal", "mend_zsre_gptj",
             _names("transformer.h.{b}.mlp.{m}.weight", range(1, 4), ("fc_in", "fc_out"))),
    "llama": (_llama, "causal", "mend_zsre_llama",  # the gated FFN: all three matrices
              _names("model.layers.{b}.mlp.{m}.weight", range(1, 4), ("gate_proj", "up_proj", "down_proj"))),
    "t5": (_t5, "seq2seq", "mend_zsre_t5",  # T5 v1.1 (t5-xl-lm-adapt): last 2 of 3 blocks, wi_0, wi_1 and wo
           _names("encoder.block.{b}.layer.1.DenseReluDense.{m}.weight", range(1, 3), ("wi_0", "wi_1", "wo"))
           | _names("decoder.block.{b}.layer.2.DenseReluDense.{m}.weight", range(1, 3), ("wi_0", "wi_1", "wo"))),
    "bart": (_bart, "seq2seq", "mend_zsre_bart_base",
             _names("model.encoder.layers.{b}.{m}.weight", range(1, 3), ("fc1", "fc2"))
             | _names("model.decoder.layers.{b}.{m}.weight", range(1, 3), ("fc1", "fc2"))),
    "bert": (_bert, "classifier", "mend_fever_bert_base",
             _names("bert.encoder.layer.{b}.{m}.dense.weight", range(1, 4), ("intermediate", "output"))),
}


def _ids(tokenizer) -> dict:
    return dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id)


@pytest.fixture(scope="module")
def saved(tokenizer, tmp_path_factory) -> dict[str, Path]:
    """Each architecture, random weights, written with ``save_pretrained`` as a real base is."""
    out = {}
    for name, (build, *_rest) in ARCHS.items():
        torch.manual_seed(0)
        out[name] = tmp_path_factory.mktemp(name)
        build(len(tokenizer), _ids(tokenizer)).save_pretrained(out[name])
    return out


def _batch(tokenizer, family: str, model, prompts: list[str], targets: list[str]) -> dict:
    return collate(encode(tokenizer, family, prompts, targets), tokenizer.pad_token_id, family, decoder_start_id(model))


def _edit_problem(tokenizer, family: str, model) -> dict:
    """One edit problem as meta-training sees it: the edit, a paraphrase, a locality input."""
    t = (lambda a, b: a) if family != "classifier" else (lambda a, b: b)
    return {"edit_inner": _batch(tokenizer, family, model, ["Where was Foo born?"], [t("Arvenna", "SUPPORTS")]),
            "edit_outer": _batch(tokenizer, family, model, ["What is the birthplace of Foo?"], [t("Arvenna", "SUPPORTS")]),
            "loc": _batch(tokenizer, family, model, ["What is the occupation of Bar?"], [t("painter", "REFUTES")]),
            "n_problems": 1}


def _shipped(config: str) -> dict:
    return yaml.safe_load(open(ROOT / "configs" / f"{config}.yaml"))["model"]["init_args"]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_default_rule_and_shipped_config_edit_the_intended_matrices(saved, arch):
    _, family, config, expected = ARCHS[arch]
    init = _shipped(config)
    assert init["family"] == family
    model = load_model(saved[arch], family)
    assert {l.name for l in select_layers(model)} == expected
    assert {l.name for l in select_layers(model, init.get("edit_params"))} == expected


def test_original_t5_ffn_edits_wi_and_wo(tokenizer):
    model = _t5(len(tokenizer), _ids(tokenizer), ffn="relu")
    assert {l.name for l in select_layers(model)} == (
        _names("encoder.block.{b}.layer.1.DenseReluDense.{m}.weight", range(1, 3), ("wi", "wo"))
        | _names("decoder.block.{b}.layer.2.DenseReluDense.{m}.weight", range(1, 3), ("wi", "wo")))


def test_a_default_rule_matching_nothing_is_refused(tokenizer):
    model = _t5(len(tokenizer), _ids(tokenizer))
    for block in model.decoder.block:  # a variant whose decoder FFN is named otherwise
        block.layer[2].renamed = block.layer[2].DenseReluDense
        del block.layer[2].DenseReluDense
    with pytest.raises(ValueError, match="matches no matrix of this model.*edit_params"):
        select_layers(model)


# ---------------------------------------------------------------- Transformer-Patcher: a wider plain model
# name -> (builder, family, the width's config field, a first FFN to patch beside the patcher's default one)
WIDEN = {"gptj": (_gptj, "causal", "n_inner", "transformer.h.0.mlp"),
         "neox": (_neox, "causal", "intermediate_size", "gpt_neox.layers.0.mlp"),
         "t5": (lambda v, ids: _t5(v, ids, ffn="relu"), "seq2seq", "d_ff", "encoder.block.0.layer.1.DenseReluDense")}


def _random_patch(model, layer: str | None, n: int, bias: bool = True) -> None:
    """``n`` patch neurons of random key, value (and bias) at ``layer`` (None: the patcher's default)."""
    site = resolve_site(model, layer)
    d, dt = site.d_model, next(model.parameters()).dtype
    b = torch.randn(n, dtype=dt) if bias else torch.zeros(n, dtype=dt)
    PatchEdit(site, torch.randn(d, n, dtype=dt), b, torch.randn(n, d, dtype=dt), torch.zeros(0, d, dtype=dt)).merge_(model)


@pytest.mark.parametrize("arch", list(WIDEN))
def test_patches_widen_into_a_plain_model_that_round_trips(tokenizer, tmp_path, arch):
    """Patches of 2 and 3 neurons on two FFNs: the widened model (every FFN of the config width padded
    to 3 extra neurons) saves and loads as a plain Hugging Face model with the patched model's logits."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    build, family, field, first = WIDEN[arch]
    torch.manual_seed(0)
    model = build(len(tokenizer), _ids(tokenizer)).double().eval()  # float64: the comparison is the widening's
    width = resolve_site(model).width
    batch = _batch(tokenizer, family, model, ["Where was Foo born?", "What is the occupation of Bar?"],
                   ["Arvenna", "painter"])
    with torch.no_grad():
        before = forward_logits(model, batch, family)
    _random_patch(model, first, 2, bias=arch != "t5")  # T5's FFN has no bias to write a patch's into
    _random_patch(model, None, 3, bias=arch != "t5")
    assert len(installed_patches(model)) == 2
    wide = widen_ffn(model)
    assert type(wide) is type(model) and not installed_patches(wide) and getattr(wide.config, field) == width + 3
    wide.save_pretrained(tmp_path)
    auto = AutoModelForSeq2SeqLM if family == "seq2seq" else AutoModelForCausalLM
    back = auto.from_pretrained(tmp_path).eval()
    assert back.dtype == torch.float64
    with torch.no_grad():
        ref = forward_logits(model, batch, family)
        assert not torch.allclose(ref, before), "the patches change the output"
        torch.testing.assert_close(forward_logits(wide, batch, family), ref)
        torch.testing.assert_close(forward_logits(back, batch, family), ref)


def test_a_patcher_edit_of_t5_is_right_in_the_widened_model(tokenizer, tmp_path):
    """The patcher patches T5's decoder FFN; with train_bias=False (bias 0; key and value trained) the patch
    widens exactly."""
    from transformers import AutoModelForSeq2SeqLM

    torch.manual_seed(0)
    model = _t5(len(tokenizer), _ids(tokenizer), ffn="relu").double().eval()
    edit = _batch(tokenizer, "seq2seq", model, ["Where was Foo born?"], ["Arvenna"])
    memory = _batch(tokenizer, "seq2seq", model, ["What is the occupation of Bar?", "Where is Baz?"], ["painter", "Qux"])
    ed = Patcher(model, memory=memory, train_bias=False)
    assert (ed.site.layer, ed.site.activation) == ("decoder.block.2.layer.2.DenseReluDense", "relu")
    patch = ed.make_edit(model, edit, "seq2seq")
    assert patch.n_neurons > 0 and not ed.last_failure and not bool(patch.bias.any())
    assert not torch.equal(patch.key, Patcher(model, memory=memory, train_key=False).make_edit(model, edit, "seq2seq").key)
    work = patch.merge_(model)
    widen_ffn(work).save_pretrained(tmp_path)
    back = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(forward_logits(back, edit, "seq2seq"), forward_logits(work, edit, "seq2seq"))
        assert bool(scores(forward_logits(back, edit, "seq2seq"), edit["labels"], "seq2seq")[0].all())


def test_t5_ffns_that_cannot_hold_a_patch_are_refused_in_one_line(tokenizer):
    relu = _t5(len(tokenizer), _ids(tokenizer), ffn="relu").eval()
    _random_patch(relu, None, 2)  # a bias where T5DenseActDense has none
    with pytest.raises(NotImplementedError, match=r"cannot widen T5DenseActDense .*no bias.*train_bias=False"):
        widen_ffn(relu)
    gated = _t5(len(tokenizer), _ids(tokenizer)).eval()  # T5 v1.1: act(wi_0 x) * wi_1 x, no biases
    _random_patch(gated, None, 2, bias=False)
    with pytest.raises(NotImplementedError, match="cannot widen T5ForConditionalGeneration: its gated FFN has no biases"):
        widen_ffn(gated)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_meta_training_step_and_edit(saved, tokenizer, arch):
    _, family, *_ = ARCHS[arch]
    module = MENDModule(base_model=str(saved[arch]), family=family, rank=8, init_edit_lr=1e-2).train()
    model, editor = module.model, module.editor
    problem = _edit_problem(tokenizer, family, model)
    # (b) one meta-training step: finite gradients on every editor parameter, and they reach g
    module._step(problem)["loss"].backward()
    for n, p in editor.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert editor.edit_lrs.grad.abs().sum() > 0 and all(net.U.grad.abs().sum() > 0 for net in editor.nets)
    assert all(p.grad is None for p in model.parameters()), "the base stays frozen"
    # (c) one edit: the output on the edit input changes, stays finite, and the edit loss goes down
    inner = problem["edit_inner"]
    edited = editor.eval().edit(model, inner, family)
    with torch.no_grad():
        before, after = forward_logits(model, inner, family), forward_logits(edited, inner, family)
    assert torch.isfinite(after).all() and not torch.allclose(before, after)
    assert nll(after, inner["labels"], family) < nll(before, inner["labels"], family)


def test_base_dtype_loads_the_base_in_bf16_and_default_is_unchanged(saved, tokenizer):
    path = saved["gpt2"]
    assert {p.dtype for p in load_model(path, "causal").parameters()} == {torch.float32}
    assert {p.dtype for p in load_model(path, "causal", "bf16").parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="base_dtype must be one of"):
        load_model(path, "causal", "int8")
    module = MENDModule(base_model=str(path), rank=8, base_dtype="bf16").train()
    assert {p.dtype for p in module.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in module.editor.parameters()} == {torch.float32}
    out = module._step(_edit_problem(tokenizer, "causal", module.model))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and all(torch.isfinite(p.grad).all() for p in module.editor.parameters())
    # an editor is tied to the dtype its base was loaded in, and the refusal says so
    fp32 = load_model(path, "causal")
    with pytest.raises(ValueError, match="bfloat16 weights and this one has float32: load the base with the same base_dtype"):
        check_fingerprint(module.base_fingerprint(), fp32, module.editor.layers, "checkpoint")


def test_fingerprint_is_stable_discriminating_and_unchanged_in_format(saved, tokenizer):
    model = load_model(saved["gptj"], "causal")
    layers = select_layers(model)
    fp = fingerprint(model, layers)
    assert fingerprint(load_model(saved["gptj"], "causal"), layers) == fp, "the same base, loaded again"
    torch.manual_seed(1)  # another random base of the same shape
    other = _gptj(len(tokenizer), _ids(tokenizer))
    assert fingerprint(other, layers)["edited_weights_sha256"] != fp["edited_weights_sha256"]
    assert fingerprint(other, layers)["config_sha256"] == fp["config_sha256"]
    # the hash is the one editor files written before hold (they still load): sha256 over each
    # edited weight's name and float32 bytes
    h = hashlib.sha256()
    params = dict(model.named_parameters())
    for l in layers:
        h.update(l.name.encode())
        h.update(params[l.name].detach().float().numpy().tobytes())
    assert fp["edited_weights_sha256"] == h.hexdigest()[:16]


def test_meta_training_fingerprints_the_base_once(saved, monkeypatch):
    import lightning_modules.editor_module as mm

    calls = []
    monkeypatch.setattr(mm, "fingerprint", lambda *a: calls.append(1) or fingerprint(*a))
    module = MENDModule(base_model=str(saved["gpt2"]), rank=8)
    ckpts = [{"state_dict": module.state_dict()} for _ in range(3)]
    for c in ckpts:
        module.on_save_checkpoint(c)
    module.on_load_checkpoint(ckpts[0])
    assert len(calls) == 1, "the frozen base is hashed once per run, not on every save"
    assert ckpts[-1][CHECKPOINT_KEY]["fingerprint"] == fingerprint(module.model, module.editor.layers)
    blob = ckpts[-1][CHECKPOINT_KEY]
    MEND.from_blob(blob, load_model(saved["gpt2"], "causal"), "checkpoint")  # a fresh load accepts it
    with pytest.raises(ValueError, match="was trained for base model"):
        MEND.from_blob(blob, load_model(saved["gptj"], "causal"), "checkpoint")


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_shipped_config_prints_without_loading_a_model(config, monkeypatch, capsys):
    from transformers import PreTrainedModel

    def refuse(*a, **k):
        raise AssertionError("--print_config built or loaded a model")
    monkeypatch.setattr(PreTrainedModel, "__init__", refuse)  # every Hugging Face model, real or tiny
    with pytest.raises(SystemExit) as e:
        train.main(["--config", str(ROOT / "configs" / config), "--print_config"])
    assert e.value.code in (0, None)
    assert "class_path:" in capsys.readouterr().out

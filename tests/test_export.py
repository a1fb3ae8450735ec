"""Export: the exported decoding step computes what `forward_kv` computes, step after step,
including after its fixed-size caches have been filled and shifted; files round-trip."""

from __future__ import annotations

import pytest
import torch

from allattn import checkpoint, export, generate
from allattn.config import ConfigError, ModelConfig
from allattn.data import Vocabulary
from allattn.export import ExportError, ExportOptions
from allattn.model import AllAttentionLM

CASES = {
    # ramp 4, z <= 0.1: every span is below 20, trimmed to L = 32 context rows of C = 96
    "all-attention, trimmed spans, adaptive cache": dict(
        n_persistent=4, attn_span=160, span_ramp=4, adapt_cache=True
    ),
    "all-attention, trimmed spans, full cache": dict(
        n_persistent=4, attn_span=96, span_ramp=4, adapt_cache=False
    ),
    "all-attention, no adaptive span": dict(n_persistent=4, adapt_span=False),
    "transformer": dict(n_persistent=0, d_inner=24),
    "attention-only": dict(n_persistent=0),
    "attn-split": dict(n_persistent=4, memory_mode="attn_split"),
    "head-split": dict(n_persistent=4, memory_mode="head_split"),
    "single-head": dict(n_persistent=4, memory_mode="single_head"),
    "FF-attn": dict(n_persistent=0, d_inner=24, ff_activation="softmax"),
    "word level, adaptive input and softmax": dict(
        n_persistent=4, adaptive_io=True, adaptive_cutoffs=(4, 8), adaptive_div=2
    ),
}


def make_model(seed: int = 0, dtype: torch.dtype = torch.float64, **overrides) -> AllAttentionLM:
    torch.manual_seed(seed)
    values = dict(vocab_size=13, d_model=16, n_heads=2, n_layers=2, attn_span=8) | overrides
    model = AllAttentionLM(ModelConfig(**values)).to(dtype).eval()
    with torch.no_grad():
        for layer in model.layers:
            if layer.attn.span is not None:
                layer.attn.span.z.uniform_(0.0, 0.1)  # different spans per head
    return model


def eager(model: AllAttentionLM, tokens: torch.Tensor, tokens_per_step: int = 1) -> torch.Tensor:
    """`forward_kv` over tokens (B, T), tokens_per_step at a time, from zero caches."""
    kv = model.init_kv_cache(tokens.size(0))
    steps = range(0, tokens.size(1), tokens_per_step)
    return torch.cat([model.forward_kv(tokens[:, t : t + tokens_per_step], kv) for t in steps], 1)


def steps_past_the_cache(model: AllAttentionLM) -> int:
    """More steps than any layer's cache holds: its first rows have been shifted out."""
    return max(model.cache_sizes()) + 5


@pytest.mark.parametrize("name", CASES)
def test_exported_steps_equal_forward_kv(name):
    model = make_model(**CASES[name])
    if "trimmed" in name:
        assert model.context_lengths() == [32, 32] and model.cache_sizes() == [96, 96]
    if "adaptive cache" in name:
        assert max(model.cache_sizes()) < model.config.attn_span
    step = export.export_program(model, batch_size=2).module()
    tokens = torch.randint(13, (2, steps_past_the_cache(model)))
    caches = export.DecodeStep(model).init(2)
    got, final = export.decode(step, tokens, caches)
    torch.testing.assert_close(got, eager(model, tokens), rtol=0, atol=1e-12)
    assert [c.shape for c in final] == [c.shape for c in caches]


def test_float32_and_several_tokens_per_step():
    model = make_model(dtype=torch.float32, **CASES["all-attention, trimmed spans, full cache"])
    step = export.export_program(model, batch_size=2, tokens_per_step=4).module()
    tokens = torch.randint(13, (2, 4 * 25))  # 100 tokens: past the 96 rows of the caches
    got, _ = export.decode(step, tokens, export.DecodeStep(model).init(2), tokens_per_step=4)
    # forward_kv runs blocks of several tokens with the chunked kernel: equal up to rounding
    torch.testing.assert_close(got, eager(model, tokens, 4), rtol=0, atol=1e-5)


def test_zero_caches_are_init_kv_caches_rows():
    model = make_model(**CASES["all-attention, trimmed spans, adaptive cache"])
    step = export.DecodeStep(model)
    kv = model.init_kv_cache(3)
    expected = [t[:, :, : layer.size] for layer in kv for t in (layer.keys, layer.values)]
    for got, want in zip(step.init(3), expected, strict=True):
        assert torch.equal(got, want) and got.dtype == want.dtype


def test_decode_continues_from_returned_caches():
    """Two calls of `decode` (a prompt, then generated tokens) equal one."""
    model = make_model()
    step = export.DecodeStep(model)
    tokens = torch.randint(13, (1, 14))
    whole, _ = export.decode(step, tokens, step.init(1))
    first, caches = export.decode(step, tokens[:, :9], step.init(1))
    second, _ = export.decode(step, tokens[:, 9:], caches)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=0, atol=0)
    with pytest.raises(ValueError, match="multiple of tokens_per_step"):
        export.decode(step, tokens, step.init(1), tokens_per_step=3)


@pytest.fixture
def checkpoint_file(tmp_path):
    vocab = Vocabulary(tuple("\nabcdefgh RMEO:"), "char")
    model = make_model(dtype=torch.float32, vocab_size=len(vocab), n_persistent=4)
    path = tmp_path / "model.safetensors"
    checkpoint.save(path, model, vocab=vocab)
    return path


def test_run_writes_a_program_that_loads_with_its_metadata(checkpoint_file, tmp_path):
    out = tmp_path / "step.pt2"
    options = ExportOptions(checkpoint=str(checkpoint_file), out=str(out), batch_size=2)
    assert export.run(options) == out
    program, meta = export.load(out)
    model, ckpt = checkpoint.load_model(checkpoint_file)
    assert meta.config == model.config and meta.vocab == ckpt.vocab
    assert (meta.batch_size, meta.tokens_per_step, meta.dtype) == (2, 1, "float32")
    assert meta.cache_shapes == tuple((2, 2, c, 8) for c in model.cache_sizes())
    assert meta.input_names == ["tokens", "past_keys_0", "past_values_0", "past_keys_1",
                                "past_values_1"]  # fmt: skip
    assert meta.output_names[0] == "logprobs" and len(meta.output_names) == 5
    assert ckpt.vocab is not None
    tokens = torch.tensor([ckpt.vocab.encode("ROMEO:ab cd"), ckpt.vocab.encode("hebe: bed\nR")])
    got, _ = export.decode(program.module(), tokens, export.zero_caches(meta))
    torch.testing.assert_close(got, eager(model, tokens), rtol=0, atol=1e-5)


def test_existing_output_is_replaced_only_with_force(checkpoint_file, tmp_path):
    out = tmp_path / "step.pt2"
    out.write_bytes(b"keep")
    options = ExportOptions(checkpoint=str(checkpoint_file), out=str(out))
    with pytest.raises(ExportError, match="exists; pass --force"):
        export.run(options)
    assert out.read_bytes() == b"keep"
    export.run(options.replace(force=True))
    assert export.load(out).metadata.batch_size == 1


def test_missing_checkpoint_is_one_line_error(tmp_path):
    missing = tmp_path / "none.safetensors"
    options = ExportOptions(checkpoint=str(missing), out=str(tmp_path / "x.pt2"))
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        export.run(options)
    with pytest.raises(ExportError, match="does not exist"):
        export.load(tmp_path / "none.pt2")


@pytest.mark.parametrize(
    "out,format,message",
    [
        ("step.txt", None, "must end in .pt2"),
        ("step", None, "must end in .pt2"),
        ("step.pt2", "onnx", "--format onnx writes a .onnx file, not step.pt2"),
    ],
)
def test_bad_suffix_or_format(out, format, message):
    with pytest.raises(ConfigError, match=message):
        ExportOptions(checkpoint="run", out=out, format=format)


def test_an_onnx_model_over_2_gib_is_refused_before_tracing(tmp_path, monkeypatch, capsys):
    from allattn.cli import main

    def no_trace(*args, **kwargs):
        raise AssertionError("traced")

    monkeypatch.setattr(export.torch.onnx, "export", no_trace)
    monkeypatch.setattr(export, "ONNX_LIMIT", 1000)  # bytes: the tiny model is over it
    model = make_model(dtype=torch.float32, n_persistent=4)
    checkpoint.save(tmp_path / "m.safetensors", model)
    out = tmp_path / "step.onnx"
    assert main(["export", str(tmp_path / "m.safetensors"), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("allattn: error: the model's weights") and "export .pt2" in err
    assert len(err.splitlines()) == 1 and not out.exists()
    assert main(["export", str(tmp_path / "m.safetensors"), str(tmp_path / "step.pt2")]) == 0
    assert "wrote" in capsys.readouterr().out


def test_training_mode_and_bad_sizes_are_refused(tmp_path):
    with pytest.raises(ExportError, match="eval"):
        export.DecodeStep(make_model().train())
    with pytest.raises(ExportError, match="must be positive"):
        export.export_program(make_model(), tokens_per_step=0)
    with pytest.raises(ConfigError, match="--batch-size"):
        ExportOptions(checkpoint="run", out="x.pt2", batch_size=0)


def test_load_refuses_what_is_not_an_allattn_program(tmp_path):
    (tmp_path / "junk.pt2").write_bytes(b"not a zip")
    with pytest.raises(ExportError, match=r"not a torch\.export program"):
        export.load(tmp_path / "junk.pt2")
    program = export.export_program(make_model())
    torch.export.save(program, tmp_path / "bare.pt2")  # no metadata
    with pytest.raises(ExportError, match="not an allattn export"):
        export.load(tmp_path / "bare.pt2")


def test_onnx_needs_its_packages(tmp_path, hide_package):
    hide_package("onnxscript")
    with pytest.raises(ExportError, match="needs the onnx and onnxscript packages"):
        export.export(make_model(), tmp_path / "step.onnx")


@pytest.mark.parametrize("adaptive", [False, True], ids=["char", "adaptive-io"])
def test_onnx_program_equals_forward_kv(tmp_path, adaptive):
    pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript")
    onnx = pytest.importorskip("onnx", reason="ONNX export needs onnx")
    onnxruntime = pytest.importorskip("onnxruntime", reason="running ONNX needs onnxruntime")
    word = dict(adaptive_io=True, adaptive_cutoffs=(4, 8), adaptive_div=2) if adaptive else {}
    model = make_model(dtype=torch.float32, n_persistent=4, **word)
    out = export.export(model, tmp_path / "step.onnx", batch_size=2, tokens_per_step=2)
    metadata_props = {p.key: p.value for p in onnx.load(out).metadata_props}
    meta = export.ExportMetadata.from_json(metadata_props["allattn"])
    assert meta.tokens_per_step == 2 and meta.cache_shapes[0] == (2, 2, 8, 8)
    session = onnxruntime.InferenceSession(str(out))
    assert [i.name for i in session.get_inputs()] == meta.input_names
    assert [o.name for o in session.get_outputs()] == meta.output_names

    def step(tokens, *caches):
        feeds = dict(zip(meta.input_names, (tokens, *caches), strict=True))
        outputs = session.run(None, {name: t.numpy() for name, t in feeds.items()})
        return [torch.from_numpy(x) for x in outputs]

    tokens = torch.randint(13, (2, 2 * 7))  # 14 tokens: past the caches' 8 rows
    got, _ = export.decode(step, tokens, export.zero_caches(meta), tokens_per_step=2)
    torch.testing.assert_close(got, eager(model, tokens, 2), rtol=0, atol=1e-5)


def test_greedy_generation_with_the_program_is_generate_tokens(checkpoint_file, tmp_path):
    """The module doc's loop: feed the prompt, then each likeliest token."""
    model, _ = checkpoint.load_model(checkpoint_file)
    export.run(ExportOptions(checkpoint=str(checkpoint_file), out=str(tmp_path / "s.pt2")))
    program, meta = export.load(tmp_path / "s.pt2")
    step = program.module()
    assert meta.vocab is not None
    prompt = torch.tensor([meta.vocab.encode("ROMEO:")])
    logprobs, caches = export.decode(step, prompt, export.zero_caches(meta))
    drawn = []
    for _ in range(30):
        token = logprobs[:, -1].argmax(-1, keepdim=True)
        drawn.append(int(token))
        logprobs, caches = export.decode(step, token, caches)
    expected = generate.tokens(model, prompt, 30, generate.Sampling(temperature=0))
    assert drawn == [int(t) for t in expected]


def test_the_onnx_graph_keeps_the_renormalisation_epsilon(tmp_path):
    """onnxscript's optimiser takes constants within 1e-8 of zero for zero: `x + renorm_eps`
    became `x`, which moved log-probabilities by up to 1.7 where a span mask leaves a head
    little mass (the demo model). The export does not optimise."""
    pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript")
    onnx = pytest.importorskip("onnx", reason="ONNX export needs onnx")
    from onnx import numpy_helper

    out = export.export(make_model(dtype=torch.float32, n_persistent=4), tmp_path / "s.onnx")
    constants = [
        numpy_helper.to_array(a.t)
        for node in onnx.load(out).graph.node
        if node.op_type == "Constant"
        for a in node.attribute
        if a.name == "value"
    ]
    assert any(c.size == 1 and c.dtype.kind == "f" and c.item() == pytest.approx(1e-8)
               for c in constants)  # fmt: skip

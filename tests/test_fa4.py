"""training.attention_backend = "fa4" on the CPU: threefold's FA4 operators and their place in the model.

FA4's kernels run only on Hopper and Blackwell GPUs (tests/test_gpu.py compares them with torch's SDPA
there). Here a stand-in module with the kernels' calling convention ((b, s, heads, d) tensors, the fp32
log-sum-exp as (b, heads, s), the backward given q, k, v, out, dout and lse) computes attention and its
gradient by the textbook formulas in float32, written independently of torch's SDPA. Against SDPA it
checks what threefold adds: the layout changes, the scale, GQA's shared heads, the autograd wiring and the
fake kernels torch.compile traces with, and where the model routes attention to FA4.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from distributed import assert_trains_like, run_ranks, train_merged
from tiny import masked_config, wide_model

import threefold.model.fa4 as fa4
from threefold.config import ModelConfig, build_config
from threefold.model.attention import DocumentMask, attend, document_ids, document_mask, document_spans
from threefold.model.fa4 import fa4_attention, fa4_document_attention, use_fa4


def _expand(t: torch.Tensor, group: int) -> torch.Tensor:
    return t.repeat_interleave(group, dim=2)  # (b, s, k, d) -> (b, s, a, d)


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    s = q.shape[1]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale  # (b, a, s, s)
    future = torch.ones(s, s, dtype=torch.bool).triu(1)
    return scores.masked_fill(future, float("-inf"))


def _forward(q, k, v, *, softmax_scale, causal, return_lse):
    assert causal and return_lse
    group = q.shape[2] // k.shape[2]
    scores = _scores(q.float(), _expand(k.float(), group), softmax_scale)
    lse = scores.logsumexp(-1)  # (b, a, s)
    p = (scores - lse[..., None]).exp()
    out = torch.einsum("bhqk,bkhd->bqhd", p, _expand(v.float(), group))
    return out.to(q.dtype), lse, None, None, None  # FA4 returns more than out and lse


def _backward(q, k, v, out, dout, lse, *, softmax_scale, causal):
    assert causal
    b, s, a, d = q.shape
    kv = k.shape[2]
    group = a // kv
    q, k, v, out, dout = (t.float() for t in (q, k, v, out, dout))
    p = (_scores(q, _expand(k, group), softmax_scale) - lse[..., None]).exp()  # (b, a, s, s)
    dv = torch.einsum("bhqk,bqhd->bkhd", p, dout)  # per query head
    dp = torch.einsum("bqhd,bkhd->bhqk", dout, _expand(v, group))
    rowdot = (dout * out).sum(-1).transpose(1, 2)  # (b, a, s)
    ds = p * (dp - rowdot[..., None]) * softmax_scale
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, _expand(k, group))
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, q)

    def shared(t: torch.Tensor) -> torch.Tensor:  # sum the query heads that read one kv head
        return t.reshape(b, s, kv, group, d).sum(3)

    return dq, shared(dk), shared(dv)


def _documents(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    bounds = cu_seqlens.tolist()
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _any_forward(q, k, v, *, softmax_scale, causal, return_lse, **varlen):
    """The kernels' forward: (b, s, heads, d) tensors, or with cu_seqlens (t, heads, d) tensors whose
    documents are attended to one by one (the lse then (heads, t))."""
    if not varlen:
        return _forward(q, k, v, softmax_scale=softmax_scale, causal=causal, return_lse=return_lse)
    cu = varlen["cu_seqlens_q"]
    assert varlen["cu_seqlens_k"] is cu and cu.dtype == torch.int32
    assert varlen["max_seqlen_q"] == varlen["max_seqlen_k"] >= max(hi - lo for lo, hi in _documents(cu))
    outs, lses = [], []
    for lo, hi in _documents(cu):
        out, lse, *_ = _forward(
            q[None, lo:hi], k[None, lo:hi], v[None, lo:hi],
            softmax_scale=softmax_scale, causal=causal, return_lse=return_lse,
        )  # fmt: skip
        outs.append(out[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=1), None, None, None


def _any_backward(q, k, v, out, dout, lse, *, softmax_scale, causal, **varlen):
    if not varlen:
        return _backward(q, k, v, out, dout, lse, softmax_scale=softmax_scale, causal=causal)
    grads = []
    for lo, hi in _documents(varlen["cu_seqlens_q"]):
        grads.append(
            _backward(
                *(t[None, lo:hi] for t in (q, k, v, out, dout)),
                lse[None, :, lo:hi],
                softmax_scale=softmax_scale,
                causal=causal,
            )  # fmt: skip
        )
    return tuple(torch.cat([g[i][0] for g in grads]) for i in range(3))


STAND_IN = types.SimpleNamespace(_flash_attn_fwd=_any_forward, _flash_attn_bwd=_any_backward)


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr(fa4, "kernels", lambda: STAND_IN)
    yield
    use_fa4(False)
    torch._dynamo.reset()


def _leaves(heads: int, kv_heads: int, s: int = 24, d: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = [(2, heads, s, d), (2, kv_heads, s, d), (2, kv_heads, s, d)]
    return [torch.randn(*shape, generator=g).requires_grad_() for shape in shapes]


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


@pytest.mark.parametrize("compiled", ["eager", "aot_eager", "inductor"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 1), (6, 2)], ids=["mha", "mqa", "gqa"])
def test_fa4_attention_is_causal_attention_with_its_gradients(stand_in, compiled, heads, kv_heads):
    q, k, v = _leaves(heads, kv_heads)
    dy = torch.randn(2, heads, 24, 16, generator=torch.Generator().manual_seed(1))
    run = (
        fa4_attention
        if compiled == "eager"
        else torch.compile(fa4_attention, backend=compiled, fullgraph=True)
    )
    out = run(q, k, v)
    out.backward(dy)
    got = [out.detach(), q.grad, k.grad, v.grad]
    ref = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    want = _sdpa(*ref)
    want.backward(dy)
    assert out.shape == want.shape
    for name, a, w in zip(
        ["out", "dq", "dk", "dv"], got, [want.detach()] + [t.grad for t in ref], strict=True
    ):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_the_operators_pass_torchs_checks(stand_in):
    """torch.library.opcheck: the fake kernels give the real ones' shapes, dtypes and strides, the schema
    says what is mutated, and the autograd registration is complete."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 24, heads, 16, generator=g) for heads in (4, 2, 2))
    torch.library.opcheck(torch.ops.threefold.fa4_forward, (q.requires_grad_(), k, v, 0.25))
    out, lse = torch.ops.threefold.fa4_forward(q.detach(), k, v, 0.25)
    assert lse.shape == (2, 4, 24) and lse.dtype == torch.float32
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.threefold.fa4_backward, (dout, q.detach(), k, v, out, lse, 0.25))


def test_attend_takes_fa4_only_for_unmasked_attention_of_equal_lengths(stand_in, monkeypatch):
    calls = []
    monkeypatch.setattr(
        STAND_IN, "_flash_attn_fwd", lambda *a, **kw: calls.append(1) or _any_forward(*a, **kw)
    )
    q, k, v = _leaves(4, 2)
    use_fa4(False)
    attend(q, k, v)
    assert calls == []
    use_fa4(True)
    torch.testing.assert_close(attend(q, k, v), _sdpa(q, k, v), rtol=1e-5, atol=1e-5)
    assert calls == [1]
    doc_ids = torch.zeros(2, 24, dtype=torch.int32)
    doc_ids[:, 10:] = 1
    masked = attend(q, k, v, mask=document_mask(doc_ids, use_flex=False))  # torch's kernels keep masks
    assert calls == [1]
    # The mask is honoured: the second document's first query sees only itself.
    torch.testing.assert_close(masked[:, :, 10], v.repeat_interleave(2, dim=1)[:, :, 10])


def _llama_loss_and_grads(rank: int, world: int, active: bool) -> tuple[torch.Tensor, dict]:
    from threefold.model.transformer import build_model
    from threefold.parallel.layers import TPContext

    cfg = ModelConfig(
        arch="llama", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, ffn_hidden_size=128,
        vocab_size=97, max_seq_len=32,
    )  # fmt: skip
    tokens = torch.randint(0, 97, (2, 33), generator=torch.Generator().manual_seed(0))
    use_fa4(active)
    model = build_model(cfg, TPContext(torch.distributed.group.WORLD), seed=3)
    loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_a_llama_trains_through_fa4_as_through_sdpa(stand_in):
    """The tiny llama's loss and every gradient, attention through the FA4 operators against SDPA (one
    forked rank each; the stand-in goes with the fork)."""
    loss, grads = run_ranks(1, _llama_loss_and_grads, False)[0]
    fa4_loss, fa4_grads = run_ranks(1, _llama_loss_and_grads, True)[0]
    assert not torch.equal(loss, torch.zeros(())) and grads
    torch.testing.assert_close(fa4_loss, loss, rtol=1e-6, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(
            fa4_grads[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_fa4_stays_off_when_its_package_is_missing(monkeypatch):
    fa4.kernels.cache_clear()
    monkeypatch.setattr(fa4, "KERNELS_MODULE", "threefold_no_such_module.interface")
    try:
        with pytest.raises(RuntimeError, match="needs FlashAttention-4"):
            use_fa4(True)
        assert not fa4.fa4_enabled()
    finally:
        fa4.kernels.cache_clear()


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"training": {"dtype": "float32", "device": "cuda"}},
         r"attention_backend = 'fa4' needs training.dtype = 'bfloat16' \(got 'float32'\)"),
        ({"training": {"dtype": "bfloat16", "device": "cpu"}}, r"and a CUDA GPU \(training.device = 'cpu'\)"),
        ({"training": {"dtype": "bfloat16", "device": "cuda"},
          "model": {"preset": "tiny", "hidden_size": 1088, "num_heads": 4, "num_kv_heads": 4}},
         r"head dim \(model.hidden_size / model.num_heads = 1088 / 4 = 272\) between 8 and 256"),
        ({"training": {"dtype": "bfloat16", "device": "cuda"}, "parallel": {"cp_size": 2}},
         r"attention_backend = 'fa4' cannot run context parallelism"),
    ],
    ids=["float32", "cpu", "head-dim", "context-parallel"],
)  # fmt: skip
def test_bad_fa4_configs_are_named(overrides, message):
    raw = {"model": {"preset": "tiny"}, "data": {"seq_len": 64}}
    for section, values in overrides.items():
        raw[section] = raw.get(section, {}) | values
    raw["training"] = raw["training"] | {"attention_backend": "fa4"}
    with pytest.raises(ValueError, match=message):
        build_config(raw, [], check_paths=False)


# Document masking through FA4's variable-length kernels.

EOS = 5


def _packed(rows: list[list[int]]) -> torch.Tensor:
    """(b, s) ids: 1 everywhere but an EOS at each listed position."""
    s = 24
    tokens = torch.ones(len(rows), s, dtype=torch.int64)
    for row, ends in enumerate(rows):
        tokens[row, ends] = EOS
    return tokens


def test_document_spans_are_the_boundaries_of_document_ids_over_the_rows_laid_end_to_end():
    # Row 0: documents [0, 4), [4, 11), [11, 24); row 1: an EOS at its last token, no other; row 2: none.
    tokens = _packed([[3, 10], [23], []])
    spans = document_spans(tokens, EOS)
    assert spans.dtype == torch.int32
    assert spans.tolist() == [0, 4, 11, 24, 48, 72]
    ids = document_ids(tokens, EOS)
    starts = [i * 24 + j for i in range(3) for j in range(24) if j == 0 or ids[i, j] != ids[i, j - 1]]
    assert spans.tolist() == starts + [72]


@pytest.mark.parametrize("compiled", ["eager", "aot_eager", "inductor"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)], ids=["mha", "gqa"])
def test_fa4_document_attention_is_the_dense_document_mask(stand_in, compiled, heads, kv_heads):
    """Output and gradients against SDPA with the exact dense mask, for two micro-batches whose document
    counts differ (under compile: one graph for both, the count a dynamic size)."""
    run = (
        fa4_document_attention
        if compiled == "eager"
        else torch.compile(fa4_document_attention, backend=compiled, fullgraph=True)
    )
    for rows in ([[3, 10], [23]], [[0, 5, 6, 17], [12]]):
        tokens = _packed(rows)
        spans = document_spans(tokens, EOS)
        torch._dynamo.maybe_mark_dynamic(spans, 0)
        q, k, v = _leaves(heads, kv_heads)
        dy = torch.randn(2, heads, 24, 16, generator=torch.Generator().manual_seed(1))
        out = run(q, k, v, spans)
        out.backward(dy)
        ref = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        want = attend(*ref, mask=document_mask(document_ids(tokens, EOS), use_flex=False))
        want.backward(dy)
        for name, a, w in zip(
            ["out", "dq", "dk", "dv"],
            [out, q.grad, k.grad, v.grad],
            [want] + [t.grad for t in ref],
            strict=True,
        ):
            torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_the_varlen_operators_pass_torchs_checks(stand_in):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(48, heads, 16, generator=g) for heads in (4, 2, 2))
    spans = document_spans(_packed([[3, 10], [23]]), EOS)
    torch.library.opcheck(torch.ops.threefold.fa4_varlen_forward, (q.requires_grad_(), k, v, spans, 24, 0.25))
    out, lse = torch.ops.threefold.fa4_varlen_forward(q.detach(), k, v, spans, 24, 0.25)
    assert out.shape == (48, 4, 16) and lse.shape == (4, 48) and lse.dtype == torch.float32
    args = (torch.randn_like(out), q.detach(), k, v, out, lse, spans, 24, 0.25)
    torch.library.opcheck(torch.ops.threefold.fa4_varlen_backward, args)


def test_attend_takes_fa4s_varlen_kernels_for_a_mask_of_spans(stand_in, monkeypatch):
    calls = []
    monkeypatch.setattr(
        STAND_IN, "_flash_attn_fwd", lambda *a, **kw: calls.append(kw) or _any_forward(*a, **kw)
    )
    tokens = _packed([[3, 10], [23]])
    q, k, v = _leaves(4, 2)
    got = attend(q, k, v, mask=DocumentMask(spans=document_spans(tokens, EOS)))
    assert len(calls) == 1 and calls[0]["cu_seqlens_q"].tolist() == [0, 4, 11, 24, 48]
    want = attend(q, k, v, mask=document_mask(document_ids(tokens, EOS), use_flex=False))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _masked_llama(rank: int, world: int, through_spans: bool) -> tuple[torch.Tensor, dict, list[bool]]:
    from threefold.model.transformer import build_model
    from threefold.parallel.layers import TPContext

    cfg = ModelConfig(
        arch="llama", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, ffn_hidden_size=128,
        vocab_size=97, max_seq_len=32,
    )  # fmt: skip
    tokens = torch.randint(0, 97, (2, 33), generator=torch.Generator().manual_seed(0))
    tokens[0, [4, 9, 20]] = EOS
    tokens[1, [31]] = EOS
    x, y = tokens[:, :-1], tokens[:, 1:]
    use_fa4(through_spans)
    calls: list[bool] = []  # in this forked rank only
    real = STAND_IN._flash_attn_fwd
    STAND_IN._flash_attn_fwd = lambda *a, **kw: calls.append("cu_seqlens_q" in kw) or real(*a, **kw)
    model = build_model(cfg, TPContext(torch.distributed.group.WORLD), seed=3)
    spans = document_spans(x, EOS) if through_spans else None
    loss = model(x, y, doc_ids=document_ids(x, EOS), doc_spans=spans, reset_positions=True)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, calls


def test_a_document_masked_llama_trains_through_fa4_as_through_the_dense_mask(stand_in):
    loss, grads, calls = run_ranks(1, _masked_llama, False)[0]
    fa4_loss, fa4_grads, fa4_calls = run_ranks(1, _masked_llama, True)[0]
    assert grads and calls == [] and fa4_calls == [True, True]  # each layer through the varlen kernels
    torch.testing.assert_close(fa4_loss, loss, rtol=1e-6, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(
            fa4_grads[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_masked_training_through_fa4s_spans_matches_the_dense_single_process_run(
    stand_in, monkeypatch, reference, documents_dataset, tmp_path_factory
):
    """tp 2 x pp 2 with document masking, attention through the varlen stand-in (the spans found by the
    training loop from its host batches, by evaluation from its own), against one process with the dense
    mask. The forked ranks inherit the switch and the stand-in, which notes each varlen call in a file."""
    run, model = tmp_path_factory.mktemp("fa4-masked"), wide_model("llama")
    ref = reference(masked_config(documents_dataset, run, model))  # dense: FA4 is off while this forks
    plain = reference(masked_config(documents_dataset, run, model, masking=False))
    assert abs(ref["losses"][-1] - plain["losses"][-1]) > 1e-3, "masking must change the loss to be tested"
    notes = run / "varlen-calls"

    def noted(*args, **kwargs):
        if "cu_seqlens_q" in kwargs:
            with notes.open("a") as f:
                f.write(f"{kwargs['cu_seqlens_q'].numel() - 1}\n")
        return _any_forward(*args, **kwargs)

    monkeypatch.setattr(STAND_IN, "_flash_attn_fwd", noted)
    use_fa4(True)
    assert_trains_like(train_merged(masked_config(documents_dataset, run, model, tp=2, pp=2)), ref)
    documents = [int(n) for n in notes.read_text().split()]
    assert documents and all(n >= 2 for n in documents)  # the samples hold several documents each

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
from distributed import run_ranks

import threefold.model.fa4 as fa4
from threefold.config import ModelConfig, build_config
from threefold.model.attention import attend, document_mask
from threefold.model.fa4 import check_fa4_device, fa4_attention, use_fa4


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


STAND_IN = types.SimpleNamespace(_flash_attn_fwd=_forward, _flash_attn_bwd=_backward)


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
    monkeypatch.setattr(STAND_IN, "_flash_attn_fwd", lambda *a, **kw: calls.append(1) or _forward(*a, **kw))
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


def test_a_missing_package_says_what_to_install(monkeypatch):
    fa4.kernels.cache_clear()
    monkeypatch.setattr(fa4, "KERNELS_MODULE", "threefold_no_such_module.interface")
    try:
        with pytest.raises(
            RuntimeError, match=r"pip install --pre flash-attn-4==4\.0\.0b40 \(importing threefold_no_such"
        ):
            use_fa4(True)
        assert not fa4.fa4_enabled()
    finally:
        fa4.kernels.cache_clear()


def test_a_package_without_the_kernels_is_named(monkeypatch):
    fa4.kernels.cache_clear()
    monkeypatch.setattr(fa4, "KERNELS_MODULE", "json")  # importable, but no FA4 kernels in it
    try:
        with pytest.raises(RuntimeError, match=r"json has no _flash_attn_fwd: .*flash-attn-4==4\.0\.0b40"):
            fa4.kernels()
    finally:
        fa4.kernels.cache_clear()


def test_fa4_needs_a_cuda_device():
    with pytest.raises(ValueError, match=r"runs on CUDA GPUs, not on 'cpu'"):
        check_fa4_device(torch.device("cpu"))


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

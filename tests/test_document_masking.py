"""Document masking: attention kept inside each document of a packed sample.

The exact statement: the loss of a packed, masked sample (positions restarting per document) equals the
token-weighted sum of the losses of its documents run one at a time. Then the layouts: TP, SP, PP and
recomputation reproduce the single-process masked run."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from distributed import assert_trains_like, run_ranks, train_merged
from tiny import TINY_LLAMA, masked_config, tiny_config, wide_model

from threefold.config import ModelConfig
from threefold.model.attention import attend, document_ids, document_mask, document_positions
from threefold.model.transformer import build_model
from threefold.parallel.layers import TPContext

EOS = 7


def test_document_ids_and_positions_split_after_each_eos():
    tokens = torch.tensor([[3, 4, EOS, 5, EOS, EOS, 6, 8], [EOS, 1, 2, 3, 4, 5, 6, 9]])
    docs = document_ids(tokens, EOS)
    assert docs.tolist() == [[0, 0, 0, 1, 1, 2, 3, 3], [0, 1, 1, 1, 1, 1, 1, 1]]
    assert document_positions(docs).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], [0, 0, 1, 2, 3, 4, 5, 6]]


def test_masked_attention_equals_attention_per_document():
    """The dense reference against causal attention on each document's slice alone (GQA: 4 q, 2 kv heads)."""
    gen = torch.Generator().manual_seed(0)
    b, s, d = 2, 12, 8
    q = torch.randn(b, 4, s, d, generator=gen)
    k, v = torch.randn(b, 2, s, d, generator=gen), torch.randn(b, 2, s, d, generator=gen)
    doc_ids = torch.tensor([[0] * 5 + [1] * 4 + [2] * 3, [0] * 2 + [1] * 10])
    got = attend(q, k, v, doc_ids=doc_ids)
    assert torch.equal(document_mask(doc_ids).dense, document_mask(doc_ids, use_flex=False).dense)
    for row in range(b):
        for doc in doc_ids[row].unique():
            at = (doc_ids[row] == doc).nonzero().flatten()
            sl = slice(int(at[0]), int(at[-1]) + 1)
            kk, vv = (t[row : row + 1, :, sl].repeat_interleave(2, dim=1) for t in (k, v))
            want = F.scaled_dot_product_attention(q[row : row + 1, :, sl], kk, vv, is_causal=True)
            torch.testing.assert_close(got[row : row + 1, :, sl], want, rtol=1e-5, atol=1e-6)
    unmasked = attend(q, k, v)
    assert not torch.allclose(unmasked, got), "the documents after the first must see a difference"


BLOCK_MASK_FIELDS = (
    "kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
    "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices",
)  # fmt: skip


@pytest.mark.parametrize(
    "case",
    ["one document", "documents inside tiles", "documents across tiles", "eos at tile edges", "many short"],
)
def test_the_flex_block_mask_from_tiles_is_create_block_masks(case):
    """FlexAttention's block mask built from each 128-token tile's first and last document id is, field for
    field, the one create_block_mask finds by evaluating the mask at every pair; and flex attention through
    it equals the dense mask's attention."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    gen = torch.Generator().manual_seed(len(case))
    b, s = 2, 640
    tokens = torch.randint(8, 64, (b, s), generator=gen)
    if case == "documents inside tiles":
        tokens[:, [40, 90, 300, 301, 500]] = EOS
    elif case == "documents across tiles":
        tokens[0, [200, 450]] = EOS
        tokens[1, [129]] = EOS
    elif case == "eos at tile edges":
        tokens[:, [127, 255, 256, 511]] = EOS
    elif case == "many short":
        tokens[torch.rand(b, s, generator=gen) < 0.05] = EOS
    doc_ids = document_ids(tokens, EOS)

    def mask_mod(batch, head, q_idx, kv_idx):  # type: ignore[no-untyped-def]
        return (q_idx >= kv_idx) & (doc_ids[batch, q_idx] == doc_ids[batch, kv_idx])

    want = create_block_mask(mask_mod, b, None, s, s, device="cpu")
    got = document_mask(doc_ids, use_flex=True).block
    for field in BLOCK_MASK_FIELDS:
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    q, k, v = (torch.randn(b, 2, s, 16, generator=gen) for _ in range(3))
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(doc_ids, use_flex=False).dense)
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=got), dense, rtol=1e-5, atol=1e-5)


def test_a_length_off_the_flex_tile_still_gets_create_block_masks_mask():
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(8, 64, (1, 200), generator=gen)
    tokens[0, [50, 150]] = EOS
    doc_ids = document_ids(tokens, EOS)
    from torch.nn.attention.flex_attention import flex_attention

    block = document_mask(doc_ids, use_flex=True).block
    dense = document_mask(doc_ids, use_flex=False).dense
    assert torch.equal(dense[0, 0, 199, :].nonzero().flatten(), torch.arange(151, 200))
    q, k, v = (torch.randn(1, 2, 200, 16, generator=gen) for _ in range(3))
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=block), want, rtol=1e-5, atol=1e-5)


def _packed_vs_documents(rank: int, world: int, arch: str) -> dict:
    model_kw = dict(TINY_LLAMA, vocab_size=64)
    if arch == "gpt2":
        model_kw.update(arch="gpt2", num_kv_heads=4, tie_embeddings=True)
    cfg = ModelConfig(**model_kw)
    model = build_model(cfg, TPContext(dist.group.WORLD), seed=3)
    gen = torch.Generator().manual_seed(5)
    window = torch.randint(8, 64, (1, 25), generator=gen)  # no EOS by chance: ids 8..63
    window[0, [4, 11, 12, 20]] = EOS  # documents of 5, 7, 1, 8 and 4 tokens (the last one cut)
    inputs, targets = window[:, :-1], window[:, 1:]
    docs = document_ids(inputs, EOS)
    with torch.no_grad():
        packed = model(inputs, targets, doc_ids=docs, reset_positions=True) * inputs.shape[1]
        unmasked = model(inputs, targets) * inputs.shape[1]
        alone = torch.zeros(())
        for doc in docs[0].unique():
            at = (docs[0] == doc).nonzero().flatten()
            sl = slice(int(at[0]), int(at[-1]) + 1)
            alone += model(inputs[:, sl], targets[:, sl]) * (sl.stop - sl.start)
    return {"packed": packed, "alone": alone, "unmasked": unmasked, "num_docs": len(docs[0].unique())}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packed_masked_loss_equals_the_sum_over_documents_run_alone(arch):
    got = run_ranks(1, _packed_vs_documents, arch)[0]
    assert got["num_docs"] == 5
    torch.testing.assert_close(got["packed"], got["alone"], rtol=1e-5, atol=1e-5)
    assert abs(float(got["unmasked"] - got["alone"])) > 1e-3, "without the mask documents see each other"


MASKED_LAYOUTS = [
    # tp, pp, sequence_parallel, recompute
    (2, 1, True, "selective"),
    (1, 2, False, "full"),
    (2, 2, False, "none"),
]


def _check_masked(reference, config, ref_config, plain_config) -> None:
    ref = reference(ref_config)
    plain = reference(plain_config)
    # At initialization attention is near uniform; after a few steps the mask shows in the loss.
    assert abs(ref["losses"][-1] - plain["losses"][-1]) > 1e-3, "masking must change the loss to be tested"
    assert_trains_like(train_merged(config), ref)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize(
    "tp,pp,sp,recompute",
    MASKED_LAYOUTS,
    ids=[f"tp{t}-pp{p}{'-sp' if s else ''}-{r}" for t, p, s, r in MASKED_LAYOUTS],
)
def test_masked_training_matches_single_process(
    documents_dataset, reference, tmp_path_factory, arch, tp, pp, sp, recompute
):
    run, model = tmp_path_factory.mktemp("masked"), wide_model(arch)
    layout = masked_config(documents_dataset, run, model, tp=tp, pp=pp, parallel=dict(sequence_parallel=sp),
                            recompute=recompute)  # fmt: skip
    one = masked_config(documents_dataset, run, model)
    _check_masked(reference, layout, one, masked_config(documents_dataset, run, model, masking=False))


def test_reset_position_ids_needs_document_masking(sonnets_dataset, tmp_path):
    with pytest.raises(ValueError, match=r"data.reset_position_ids \(true\) needs data.document_masking"):
        tiny_config(sonnets_dataset, tmp_path, data=dict(reset_position_ids=True))


CP_MASKED_LAYOUTS = {
    # name: (arch, tp, pp, cp, v, parallel, recompute); each against one process, masked the same way.
    "cp2-ring": ("llama", 1, 1, 2, 1, {}, "none"),
    "cp4-ring": ("llama", 1, 1, 4, 1, {}, "none"),
    "cp4-all_to_all": ("llama", 1, 1, 4, 1, {"cp_attention": "all_to_all"}, "none"),
    "cp2-gpt2-selective": ("gpt2", 1, 1, 2, 1, {}, "selective"),
    "cp2-tp2-sp-full": ("llama", 2, 1, 2, 1, {"sequence_parallel": True}, "full"),
    "cp2-pp2-interleaved": ("llama", 1, 2, 2, 2, {}, "none"),
}


@pytest.mark.parametrize("name", list(CP_MASKED_LAYOUTS))
def test_masked_training_with_cp_matches_single_process(documents_dataset, reference, tmp_path_factory, name):
    """Document masks across context-parallel shards: a document's tokens on other cp ranks are read,
    other documents' are not, and positions restart per document, as in one process."""
    arch, tp, pp, cp, v, parallel, recompute = CP_MASKED_LAYOUTS[name]
    run = tmp_path_factory.mktemp("cp-masked")
    model = wide_model(arch) | ({"num_layers": 4} if v > 1 else {})
    layout = masked_config(documents_dataset, run, model, tp=tp, pp=pp, v=v,
                            parallel=parallel | {"cp_size": cp}, recompute=recompute)  # fmt: skip
    one = masked_config(documents_dataset, run, model)
    _check_masked(reference, layout, one, masked_config(documents_dataset, run, model, masking=False))

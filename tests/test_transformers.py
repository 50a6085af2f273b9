"""Hugging Face transformers integration: tiny randomly initialised models (no hub download) with
attn_implementation="tileattn" give the logits of attn_implementation="sdpa" (GQA, causal, padding
masks as transformers builds them, a sliding-window model, cached greedy decoding)."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import tileattn.integrations.transformers as tt  # noqa: E402
from helpers import DEVICE, assert_close  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _register():
    tt.register()


def pair(cfg):
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="sdpa")
    ours = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="tileattn")
    ours.load_state_dict(ref.state_dict())
    assert ours.config._attn_implementation == "tileattn" and ref.config._attn_implementation == "sdpa"
    return ref.to(DEVICE).eval(), ours.to(DEVICE).eval()


def llama_cfg():
    return transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                    max_position_embeddings=64)


def compare(ref, ours, ids, mask):
    with torch.no_grad():
        a = ref(ids, attention_mask=mask).logits
        b = ours(ids, attention_mask=mask).logits
    valid = torch.ones(ids.shape, dtype=torch.bool, device=DEVICE) if mask is None else mask.bool()
    assert not b[valid].isnan().any()
    # the sdpa model in float64 is the reference, the float32 sdpa model the same-dtype baseline
    ref64 = copy.deepcopy(ref).double()
    with torch.no_grad():
        a64 = ref64(ids, attention_mask=mask).logits
    assert_close("logits", b[valid], a64[valid], a[valid], dtype=torch.float32, floor=1e-5)


@pytest.mark.parametrize("padding", [False, True])
def test_llama_logits_match_sdpa(padding):
    ref, ours = pair(llama_cfg())
    ids = torch.randint(0, 128, (2, 13), device=DEVICE)
    mask = None
    if padding:
        mask = torch.ones(2, 13, dtype=torch.long, device=DEVICE)
        mask[1, :4] = 0  # left padding
        mask[0, 11:] = 0  # right padding
    compare(ref, ours, ids, mask)


def test_llama_generate_with_cache_matches_sdpa():
    ref, ours = pair(llama_cfg())
    ids = torch.randint(0, 128, (1, 9), device=DEVICE)
    with torch.no_grad():
        g1 = ref.generate(ids, max_new_tokens=4, do_sample=False)
        g2 = ours.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(g1, g2)


def test_sliding_window_model_matches_sdpa():
    cfg = transformers.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                     sliding_window=4, max_position_embeddings=64)
    ref, ours = pair(cfg)
    ids = torch.randint(0, 128, (2, 12), device=DEVICE)
    mask = torch.ones(2, 12, dtype=torch.long, device=DEVICE)
    mask[0, :3] = 0
    compare(ref, ours, ids, mask)
    compare(ref, ours, ids, None)


def test_register_returns_name_and_function_contract():
    assert tt.register() == "tileattn"
    q = torch.randn(1, 4, 5, 16, device=DEVICE)
    k = torch.randn(1, 2, 5, 16, device=DEVICE)
    module = torch.nn.Module()
    out, w = tt.tileattn_attention_forward(module, q, k, k, None, scaling=0.25)
    assert out.shape == (1, 5, 4, 16) and out.is_contiguous() and w is None


@pytest.mark.parametrize("how", ["position_ids", "flash_kwargs"])
def test_llama_packed_batch_equals_unpacked(how):
    """Padding-free training: three sequences packed into one row (position_ids restart, or the flash
    kwargs DataCollatorWithFlattening gives) run as separate sequences on attention_varlen and give the
    logits and parameter gradients of the unpacked, one-at-a-time batch."""
    cfg = llama_cfg()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="tileattn").to(DEVICE).float()
    lens = [5, 11, 1]
    seqs = [torch.randint(0, 128, (n,), device=DEVICE) for n in lens]

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    unpacked = [model(s[None]).logits[0] for s in seqs]
    g_ref = grads(sum((x.float() ** 2).mean() * n for x, n in zip(unpacked, lens)))
    ids = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(n, device=DEVICE) for n in lens])[None]
    kw = dict(position_ids=pos)
    if how == "flash_kwargs":
        cu = torch.tensor([0, 5, 16, 17], dtype=torch.int32, device=DEVICE)
        kw.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=11, max_length_k=11)
    logits = model(ids, **kw).logits[0]
    parts = logits.split(lens)
    for a, b in zip(parts, unpacked):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    g = grads(sum((x.float() ** 2).mean() * n for x, n in zip(parts, lens)))
    assert g.keys() == g_ref.keys()
    for n in g:
        torch.testing.assert_close(g[n], g_ref[n], rtol=1e-4, atol=1e-6, msg=n)

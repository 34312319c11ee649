"""A row-by-row gated prompt attention: the test oracle for where non-finite values may go.

reference.gated_prompt_attention computes the word branch as one product P @ V over all keys, so a masked key j still
enters row i as 0 * v[j]: a NaN or inf in a row that query i may not see still makes row i NaN (torch's SDPA does the
same). This oracle gathers, for each query, only the keys it may see, so its outputs depend on exactly the inputs
they depend on mathematically, forward and (through autograd) backward. Small shapes only: one Python step per query
row and head. Computed in fp64.
"""
import torch

from lladapter_ext.reference import allowed_word_keys


def gated_prompt_attention_rows(q, k, v, pk, pv, gate, causal=True, gate_act="tanh", scale=None, kv_start=None):
    """Same arguments and result as reference.gated_prompt_attention (fp64, on the CPU), differentiable."""
    B, Tq, H, d = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    rep = H // Hkv
    scale = d ** -0.5 if scale is None else scale
    q64, k64, v64 = (t.cpu().double() for t in (q, k, v))
    allowed = allowed_word_keys(B, Tq, Tk, causal, kv_start)
    with_prompt = pk is not None and pk.shape[1] > 0
    if with_prompt:
        pk64, pv64 = pk.cpu().double(), pv.cpu().double()
        phi = gate.cpu().double()
        phi = phi.tanh() if gate_act == "tanh" else phi
    rows = []
    for b in range(B):
        for i in range(Tq):
            heads = []
            for h in range(H):
                g = h // rep
                keys = allowed[b, i].nonzero().flatten()
                qi = q64[b, i, h]
                if keys.numel():
                    a = torch.softmax((k64[b, keys, g] @ qi) * scale, dim=0)
                    o = a @ v64[b, keys, g]
                else:
                    o = qi.new_zeros(d)
                if with_prompt:
                    bp = b if pk64.shape[0] == B else 0
                    p = torch.softmax((pk64[bp, :, g] @ qi) * scale, dim=0)
                    o = o + phi[h] * (p @ pv64[bp, :, g])
                heads.append(o)
            rows.append(torch.stack(heads) if heads else q64.new_zeros(0, d))
    return torch.stack(rows).view(B, Tq, H, d) if rows else q64.new_zeros(B, Tq, H, d)

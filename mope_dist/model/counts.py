"""Analytic parameter and FLOP counts for any CLIPSpec (so plans can hit targets before slicing).

FLOPs follow torch.utils.flop_counter's convention: 2 * multiply-accumulates of every matmul/conv
(linear layers, patch embedding, attention scores and weighted sum; attention is counted dense,
causal or not); norms, activations, softmax and embedding lookups are not counted.
"""

from __future__ import annotations

from .spec import CLIPSpec, TowerSpec


def _spec(model_or_spec) -> CLIPSpec:
    return model_or_spec if isinstance(model_or_spec, CLIPSpec) else model_or_spec.spec


def _block_params(t: TowerSpec) -> int:
    w, d = t.width, t.head_dim
    n = 0
    for h, m in zip(t.heads, t.mlp_dims, strict=True):
        n += 4 * w  # ln_1, ln_2
        n += (w + 1) * 3 * h * d + h * d * w + w  # qkv, out_proj (its bias stays even with 0 heads)
        n += (w + 1) * m + m * w + w  # c_fc, c_proj
        n += 2 * w if t.layer_scale else 0
    return n


def _block_flops(t: TowerSpec, tokens: int) -> int:
    w, d = t.width, t.head_dim
    n = 0
    for h, m in zip(t.heads, t.mlp_dims, strict=True):
        n += 2 * tokens * w * 3 * h * d + 2 * tokens * h * d * w  # qkv, out_proj
        n += 2 * 2 * h * tokens * tokens * d  # q @ k^T, attn @ v
        n += 2 * 2 * tokens * w * m  # c_fc, c_proj
    return n


def count_params(model_or_spec) -> dict:
    """{'vision', 'text', 'other' (logit scale/bias), 'total'} parameter counts."""
    s = _spec(model_or_spec)
    v, t, e = s.vision, s.text, s.embed_dim
    vision = 3 * v.width * v.patch_size[0] * v.patch_size[1] + v.width + v.num_tokens * v.width
    vision += 2 * v.width * v.ln_pre + _block_params(v) + 2 * v.width + v.width * e
    text = (t.vocab_size + t.num_tokens + t.embed_cls) * t.width + _block_params(t) + 2 * t.width
    text += {"param": t.width * e, "linear": t.width * e + e, "none": 0}[t.proj_type]
    other = 1 + (s.init_logit_bias is not None)
    return {"vision": vision, "text": text, "other": other, "total": vision + text + other}


def count_flops(model_or_spec) -> dict:
    """{'image': FLOPs per image, 'text': FLOPs per text (full context)}."""
    s = _spec(model_or_spec)
    v, t, e = s.vision, s.text, s.embed_dim
    patches = v.num_tokens - 1
    image = 2 * patches * v.width * 3 * v.patch_size[0] * v.patch_size[1] + _block_flops(v, v.num_tokens)
    image += 2 * v.width * e
    text = _block_flops(t, t.num_tokens) + (2 * t.width * e if t.proj_type != "none" else 0)
    return {"image": image, "text": text}


def train_flops_per_sample(student, teacher=None) -> int:
    """FLOPs one image-text pair costs a distillation step: the student's forward and backward (3x its
    forward: the backward computes gradients for inputs and weights) plus the teacher's forward.

    The numerator of MFU (model FLOPs utilisation): recomputation under gradient checkpointing and the
    losses' small matmuls are not counted, as in the usual 6N-per-token convention."""
    s = count_flops(student)
    n = 3 * (s["image"] + s["text"])
    if teacher is not None:
        t = count_flops(teacher)
        n += t["image"] + t["text"]
    return n


def format_counts_table(before, after=None, names: tuple[str, str] = ("before", "after")) -> str:
    """A plain-text table of params and GFLOPs for one model/spec, or two side by side with ratios."""
    cols = [_spec(before)] + ([_spec(after)] if after is not None else [])
    rows = []
    for label, fn, key, unit in [
        ("vision params (M)", count_params, "vision", 1e6),
        ("text params (M)", count_params, "text", 1e6),
        ("total params (M)", count_params, "total", 1e6),
        ("GFLOPs / image", count_flops, "image", 1e9),
        ("GFLOPs / text", count_flops, "text", 1e9),
    ]:
        vals = [fn(c)[key] for c in cols]
        row = [label] + [f"{x / unit:.3f}" for x in vals]
        if len(vals) == 2:
            row.append(f"{vals[1] / vals[0]:.3f}" if vals[0] else "-")
        rows.append(row)
    for tower in ("vision", "text"):
        rows.append(
            [f"{tower} layers"] + [str(getattr(c, tower).num_layers) for c in cols] + [""] * (len(cols) - 1)
        )
        rows.append(
            [f"{tower} heads"] + [str(sum(getattr(c, tower).heads)) for c in cols] + [""] * (len(cols) - 1)
        )
    header = [""] + list(names[: len(cols)]) + (["ratio"] if len(cols) == 2 else [])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )

    return "\n".join([fmt(header), *(fmt(r) for r in rows)])

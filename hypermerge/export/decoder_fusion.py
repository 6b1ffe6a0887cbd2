"""Each layer's attention of an exported Llama-family decoder as one ``com.microsoft.GroupQueryAttention``.

The dynamo export spells a Llama attention as ~45 nodes per layer (rotary embedding as
Slice/Neg/Concat/Mul/Add, repeat-KV as Unsqueeze/Expand/Reshape, the scores, the mask, softmax
and the KV Concat); decoding one token launches each of them on a 1-token tensor. onnxruntime's
GroupQueryAttention does the cache append, grouped heads, mask and softmax in one kernel, as in
onnxruntime-genai's builder; rotary is one ``RotaryEmbedding`` node each for q and k.

The export's contract is kept (``hm.OnnxModel`` and serve need no change): the same inputs
(``attention_mask``, ``position_ids``, ``past_key_i`` / ``past_value_i`` in BNSH) and outputs
(``present_key_i`` / ``present_value_i``, past + new). Left padding: every row is given the full
length (``seqlens_k = total - 1``, ``query_seqlens = seq``: the kernel then takes a batch of
multi-token chunks on a non-empty cache too) and the export's own additive mask (causal + padding,
computed once from ``attention_mask``) goes in as ``attention_bias``; rotary reads ``position_ids``.
Only valid positions match the unfused graph: padded rows of the cache hold other values, as the
export's parity check allows (it compares where ``attention_mask`` is 1).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

GQA_DOMAIN = "com.microsoft"
# rope types whose scaling is all in ``inv_freq`` (yarn, longrope also scale cos / sin; dynamic
# changes with the length)
BAKED_ROPE_TYPES = {"default", "linear", "llama3"}


class _Graph:
    """Producer / consumer lookups over a graph's nodes, built once before the rewrite."""

    def __init__(self, graph):
        self.graph = graph
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list] = defaultdict(list)
        for node in graph.node:
            for name in node.input:
                self.consumers[name].append(node)
        self.initializers = {tensor.name: tensor for tensor in graph.initializer}

    def forward_to(self, name: str, op_type: str, depth: int = 6):
        """The first ``op_type`` node reached from tensor ``name`` going forward (breadth-first)."""
        frontier = [name]
        for _ in range(depth):
            nodes = [node for tensor in frontier for node in self.consumers.get(tensor, [])]
            for node in nodes:
                if node.op_type == op_type:
                    return node
            frontier = [out for node in nodes for out in node.output]
        return None

    def projection(self, name: str, depth: int = 6) -> str | None:
        """The (batch, seq, heads * head_dim) tensor behind a BNSH one: the input of the first
        Reshape -> Transpose found going backward from ``name``."""
        frontier = [name]
        for _ in range(depth):
            nodes = [self.producer[t] for t in frontier if t in self.producer]
            for node in nodes:
                source = self.producer.get(node.input[0]) if node.op_type == "Transpose" else None
                if source is not None and source.op_type == "Reshape":
                    return source.input[0]
            frontier = [t for node in nodes for t in node.input if t not in self.initializers]
        return None

    def rotary_upstream(self, name: str, depth: int = 6) -> bool:
        """Whether a rotary embedding (rotate_half's Neg) lies between ``name`` and its projection."""
        frontier = [name]
        for _ in range(depth):
            nodes = [self.producer[t] for t in frontier if t in self.producer]
            if any(node.op_type == "Neg" for node in nodes):
                return True
            frontier = [t for node in nodes if node.op_type != "Reshape" for t in node.input]
        return False


def _scores_to_softmax(g: _Graph, scores, softmax) -> tuple[str | None, float | None]:
    """The additive mask and the scale between the scores MatMul and the softmax: (None, None)
    unless the path is exactly one constant scale (Mul or Div), an optional Add, then softmax."""
    from onnx import numpy_helper

    bias, scale, tensor = None, None, scores.output[0]
    while True:
        following = g.consumers.get(tensor, [])
        if len(following) != 1:
            return None, None
        node = following[0]
        if node is softmax:
            return bias, scale
        other = node.input[1] if node.input[0] == tensor else node.input[0]
        if node.op_type == "Add" and bias is None:
            bias = other
        elif node.op_type in ("Mul", "Div") and scale is None and other in g.initializers:
            value = numpy_helper.to_array(g.initializers[other])
            if value.size != 1:
                return None, None
            scale = float(value.reshape(())) if node.op_type == "Mul" else 1.0 / float(value.reshape(()))
        else:
            return None, None
        tensor = node.output[0]


def _layer(g: _Graph, index: int) -> dict | None:
    """The tensors one layer's GroupQueryAttention needs, or None when the layer is not the expected shape."""
    k_cat, v_cat = g.producer.get(f"present_key_{index}"), g.producer.get(f"present_value_{index}")
    if k_cat is None or v_cat is None or k_cat.op_type != "Concat" or v_cat.op_type != "Concat":
        return None
    if list(k_cat.input[:1]) != [f"past_key_{index}"] or list(v_cat.input[:1]) != [f"past_value_{index}"]:
        return None
    scores = g.forward_to(k_cat.output[0], "MatMul")
    softmax = g.forward_to(scores.output[0], "Softmax", depth=4) if scores is not None else None
    context = g.forward_to(softmax.output[0], "MatMul", depth=2) if softmax is not None else None
    if context is None:
        return None
    # context (B, H, S, D) -> Transpose -> Reshape (B, S, H * D): o_proj's input
    transpose = g.consumers.get(context.output[0], [])
    reshape = g.consumers.get(transpose[0].output[0], []) if len(transpose) == 1 else []
    if len(reshape) != 1 or transpose[0].op_type != "Transpose" or reshape[0].op_type != "Reshape":
        return None
    bias, scale = _scores_to_softmax(g, scores, softmax)
    if scale is None:
        return None
    q, k, v = g.projection(scores.input[0]), g.projection(k_cat.input[1]), g.projection(v_cat.input[1])
    if None in (q, k, v):
        return None
    return {"q": q, "k": k, "v": v, "bias": bias, "scale": scale, "out": reshape[0].output[0], "concats": (k_cat, v_cat),
            "rotary": g.rotary_upstream(scores.input[0]) and g.rotary_upstream(k_cat.input[1])}


def _rotary_caches(g: _Graph, config: dict, head_dim: int) -> tuple[np.ndarray, np.ndarray] | None:
    """cos / sin caches (max positions, head_dim / 2) from the export's own ``inv_freq`` (rope
    scaling is already in it); None when the graph has none."""
    from onnx import numpy_helper

    name = next((n for n in g.initializers if n.endswith("rotary_emb.inv_freq")), None)
    if name is None:
        return None
    inv_freq = numpy_helper.to_array(g.initializers[name]).astype(np.float64).reshape(-1)
    if inv_freq.size != head_dim // 2:
        return None
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in BAKED_ROPE_TYPES:
        return None
    positions = int(config.get("max_position_embeddings") or 4096)
    angles = np.arange(positions, dtype=np.float64)[:, None] * inv_freq[None]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _shared_inputs(graph) -> list:
    """seqlens_k (every row the full length: padding is in the bias) and total_sequence_length, int32."""
    from onnx import helper, numpy_helper

    def const(name, value):
        graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=np.int64), name))
        return name

    one, zero, axis1 = const("gqa.one", 1), const("gqa.zero", [0]), const("gqa.one_1d", [1])
    return [
        helper.make_node("Shape", ["attention_mask"], ["gqa.mask_shape"], name="gqa.mask_shape"),
        helper.make_node("Gather", ["gqa.mask_shape", one], ["gqa.total64"], name="gqa.total64", axis=0),
        helper.make_node("Slice", ["gqa.mask_shape", zero, axis1], ["gqa.batch"], name="gqa.batch"),
        helper.make_node("Sub", ["gqa.total64", one], ["gqa.last64"], name="gqa.last64"),
        helper.make_node("Expand", ["gqa.last64", "gqa.batch"], ["gqa.seqlens64"], name="gqa.seqlens64"),
        helper.make_node("Cast", ["gqa.seqlens64"], ["gqa.seqlens_k"], name="gqa.seqlens_k", to=6),
        helper.make_node("Cast", ["gqa.total64"], ["gqa.total"], name="gqa.total", to=6),
        # every row's new tokens are all valid (padding is in the bias): without this the kernel
        # refuses a batch of multi-token chunks on a non-empty cache
        helper.make_node("Shape", ["input_ids"], ["gqa.new64"], name="gqa.new64", start=1, end=2),
        helper.make_node("Expand", ["gqa.new64", "gqa.batch"], ["gqa.query_seqlens64"], name="gqa.query_seqlens64"),
        helper.make_node("Cast", ["gqa.query_seqlens64"], ["gqa.query_seqlens"], name="gqa.query_seqlens", to=6),
    ]


def _prune(graph) -> None:
    """Drop nodes nothing reads (the unfused attention), then order the rest topologically."""
    outputs = {o.name for o in graph.output}
    while True:
        read = {name for node in graph.node for name in node.input} | outputs
        dead = [node for node in graph.node if not any(o in read for o in node.output if o)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    ordered, pending = [], list(graph.node)
    while pending:
        left = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                left.append(node)
        if len(left) == len(pending):
            raise ValueError("the fused graph has a cycle")
        pending = left
    del graph.node[:]
    graph.node.extend(ordered)


def fuse_attention(model, config: dict) -> int:
    """Rewrite every layer's attention of ``model`` (an exported Llama-family decoder, in place) into
    GroupQueryAttention.

    Returns:
        How many layers were fused: all of them, or 0 (the graph is left as it was) when any layer,
        the rotary caches or the mask is not what the export writes.
    """
    from onnx import helper, numpy_helper

    text = config.get("text_config") or config
    heads = int(text["num_attention_heads"])
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or int(text["hidden_size"]) // heads)
    layers = int(text["num_hidden_layers"])
    g = _Graph(model.graph)
    found = [_layer(g, i) for i in range(layers)]
    caches = _rotary_caches(g, text, head_dim)
    if any(f is None or not f["rotary"] or f["bias"] is None for f in found) or caches is None:
        return 0
    graph = model.graph
    graph.initializer.extend([numpy_helper.from_array(caches[0], "gqa.cos_cache"),
                              numpy_helper.from_array(caches[1], "gqa.sin_cache")])
    graph.node.extend(_shared_inputs(graph))
    for index, layer in enumerate(found):
        for concat in layer["concats"]:
            graph.node.remove(concat)
        # rotary outside the attention kernel: GroupQueryAttention's own rotary takes a first prompt's
        # positions as position_ids[:, 0] + s, which left padding breaks (the cache then holds keys
        # rotated by the wrong angles); RotaryEmbedding reads every position
        q, k = f"gqa.{index}.q_rot", f"gqa.{index}.k_rot"
        for src, dst, n in ((layer["q"], q, heads), (layer["k"], k, kv_heads)):
            graph.node.append(helper.make_node(
                "RotaryEmbedding", [src, "position_ids", "gqa.cos_cache", "gqa.sin_cache"], [dst], name=dst,
                domain=GQA_DOMAIN, interleaved=0, num_heads=n, rotary_embedding_dim=head_dim))
        graph.node.append(helper.make_node(
            "GroupQueryAttention",
            [q, k, layer["v"], f"past_key_{index}", f"past_value_{index}", "gqa.seqlens_k", "gqa.total", "", "",
             "", layer["bias"], "", "", "", "", "", "gqa.query_seqlens"],
            [layer["out"], f"present_key_{index}", f"present_value_{index}"], name=f"GroupQueryAttention_{index}",
            domain=GQA_DOMAIN, num_heads=heads, kv_num_heads=kv_heads, do_rotary=0,
            scale=layer["scale"]))
    # the old Reshape that produced each layer's output is now a second producer of the same name
    outs = {layer["out"] for layer in found}
    for node in [n for n in graph.node if n.op_type == "Reshape" and n.output[0] in outs]:
        graph.node.remove(node)
    _prune(graph)
    return layers

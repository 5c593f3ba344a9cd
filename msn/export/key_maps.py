"""Key maps between our tensor names and each foreign layout: transformers ViTMSN, timm, the
authors' files, our own prefixed files (docs/formats.md Secs. 3 and 6).

Every layout is described by ONE table of rules, and the same table converts in both
directions (:meth:`NameTable.export` and :meth:`NameTable.import_`), so round-trips cannot
drift. "Ours" is always timm's ``VisionTransformer`` naming for the backbone (what
``MSNViT.vit`` holds) and :class:`msn.models.ProjectionHead` naming for the head.

A rule maps one of our names to one foreign name, or to three (a fused timm ``qkv``
tensor split by rows ``[0:D]`` query, ``[D:2D]`` key, ``[2D:3D]`` value). Templates use
``{i}`` for a block index and ``{p}`` for a parameter name (``weight`` / ``bias``).
Imports no other module of :mod:`msn.export`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class Rule:
    """``ours`` (a template) <-> ``theirs`` (one template, or three for a split qkv)."""

    ours: str
    theirs: tuple[str, ...]


def _rule(ours: str, *theirs: str) -> Rule:
    return Rule(ours, tuple(theirs))


def _compile(template: str) -> re.Pattern[str]:
    pattern = re.escape(template)
    pattern = pattern.replace(re.escape("{i}"), r"(?P<i>\d+)").replace(re.escape("{p}"), r"(?P<p>weight|bias)")
    pattern = pattern.replace(re.escape("{rest}"), r"(?P<rest>.+)")
    return re.compile(f"^{pattern}$")


def _fill(template: str, fields: dict[str, str]) -> str:
    for name, value in fields.items():
        template = template.replace("{" + name + "}", value)
    return template


class NameTable:
    """A bidirectional name mapping between our names and one foreign layout.

    Args:
        name: layout name used in error messages.
        rules: the table.
    """

    def __init__(self, name: str, rules: list[Rule]):
        self.name = name
        self.rules = rules
        self._ours = [(_compile(rule.ours), rule) for rule in rules]
        self._theirs = [
            (_compile(template), rule, part) for rule in rules for part, template in enumerate(rule.theirs)
        ]

    # ours -> theirs -------------------------------------------------------------------------
    def export(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Rename (and split) a state dict in our names into this layout; every key must map."""
        out: dict[str, Tensor] = {}
        for key, tensor in state.items():
            for pattern, rule in self._ours:
                match = pattern.match(key)
                if match is None:
                    continue
                fields = {field: value for field, value in match.groupdict().items() if value is not None}
                theirs = [_fill(template, fields) for template in rule.theirs]
                if len(theirs) == 1:
                    out[theirs[0]] = tensor
                else:
                    for name, chunk in zip(theirs, split_rows(tensor, len(theirs))):
                        out[name] = chunk
                break
            else:
                raise KeyError(f"{key}: no {self.name} name for this key")
        return out

    # theirs -> ours -------------------------------------------------------------------------
    def import_(self, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str], dict[str, Tensor]]:
        """Rename (and merge) a state dict in this layout into our names.

        Returns:
            (converted state, origin: our key -> the foreign key(s) it came from,
            leftover: the foreign keys no rule matched, unchanged).
        """
        out: dict[str, Tensor] = {}
        origin: dict[str, str] = {}
        leftover: dict[str, Tensor] = {}
        parts: dict[str, dict[int, tuple[str, Tensor]]] = {}
        arity: dict[str, int] = {}
        for key, tensor in state.items():
            for pattern, rule, part in self._theirs:
                match = pattern.match(key)
                if match is None:
                    continue
                fields = {field: value for field, value in match.groupdict().items() if value is not None}
                ours = _fill(rule.ours, fields)
                if len(rule.theirs) == 1:
                    out[ours] = tensor
                    origin[ours] = key
                else:
                    parts.setdefault(ours, {})[part] = (key, tensor)
                    arity[ours] = len(rule.theirs)
                break
            else:
                leftover[key] = tensor
        for ours, pieces in parts.items():
            if len(pieces) != arity[ours]:
                present = sorted(name for name, _ in pieces.values())
                raise KeyError(f"{present[0]}: only {len(pieces)} of the {arity[ours]} tensors that form {ours} are present")
            ordered = [pieces[index] for index in range(arity[ours])]
            shapes = {tuple(tensor.shape) for _, tensor in ordered}
            if len(shapes) != 1:
                raise ValueError(
                    f"{ordered[1][0]}: shape {tuple(ordered[1][1].shape)} differs from {ordered[0][0]} "
                    f"shape {tuple(ordered[0][1].shape)}; cannot form {ours}"
                )
            out[ours] = torch.cat([tensor for _, tensor in ordered], dim=0)
            origin[ours] = " + ".join(name for name, _ in ordered)
        return out, origin, leftover


def split_rows(tensor: Tensor, parts: int) -> list[Tensor]:
    """Split a fused tensor into ``parts`` equal row blocks (contiguous copies)."""
    if tensor.shape[0] % parts:
        raise ValueError(f"cannot split a tensor of shape {tuple(tensor.shape)} into {parts} row blocks")
    return [chunk.contiguous() for chunk in torch.chunk(tensor, parts, dim=0)]


def prefix_table(name: str, prefix: str) -> NameTable:
    """A layout that is ours with a fixed prefix (``module.``, ``backbone.vit.``, ...)."""
    return NameTable(name, [_rule("{rest}", prefix + "{rest}")])


# --- transformers ViTMSN -------------------------------------------------------------------------
#: The on-disk names that transformers 4.x reads and 5.x reads and writes (docs/formats.md Sec. 3).
HF_VIT_MSN = NameTable(
    "transformers ViTMSN",
    [
        _rule("cls_token", "embeddings.cls_token"),
        _rule("pos_embed", "embeddings.position_embeddings"),
        _rule("patch_embed.proj.{p}", "embeddings.patch_embeddings.projection.{p}"),
        _rule("blocks.{i}.norm1.{p}", "encoder.layer.{i}.layernorm_before.{p}"),
        _rule(
            "blocks.{i}.attn.qkv.{p}",
            "encoder.layer.{i}.attention.attention.query.{p}",
            "encoder.layer.{i}.attention.attention.key.{p}",
            "encoder.layer.{i}.attention.attention.value.{p}",
        ),
        _rule("blocks.{i}.attn.proj.{p}", "encoder.layer.{i}.attention.output.dense.{p}"),
        _rule("blocks.{i}.norm2.{p}", "encoder.layer.{i}.layernorm_after.{p}"),
        _rule("blocks.{i}.mlp.fc1.{p}", "encoder.layer.{i}.intermediate.dense.{p}"),
        _rule("blocks.{i}.mlp.fc2.{p}", "encoder.layer.{i}.output.dense.{p}"),
        _rule("norm.{p}", "layernorm.{p}"),
    ],
)

#: transformers 5.x in-memory names (``model.state_dict()``); they reach disk only when a
#: user saves the state dict by hand. Read, never written.
HF_VIT_MSN_V5_MEMORY = NameTable(
    "transformers 5.x ViTMSN (in-memory)",
    [
        _rule("cls_token", "embeddings.cls_token"),
        _rule("pos_embed", "embeddings.position_embeddings"),
        _rule("patch_embed.proj.{p}", "embeddings.patch_embeddings.projection.{p}"),
        _rule("blocks.{i}.norm1.{p}", "layers.{i}.layernorm_before.{p}"),
        _rule(
            "blocks.{i}.attn.qkv.{p}",
            "layers.{i}.attention.q_proj.{p}",
            "layers.{i}.attention.k_proj.{p}",
            "layers.{i}.attention.v_proj.{p}",
        ),
        _rule("blocks.{i}.attn.proj.{p}", "layers.{i}.attention.o_proj.{p}"),
        _rule("blocks.{i}.norm2.{p}", "layers.{i}.layernorm_after.{p}"),
        _rule("blocks.{i}.mlp.fc1.{p}", "layers.{i}.mlp.fc1.{p}"),
        _rule("blocks.{i}.mlp.fc2.{p}", "layers.{i}.mlp.fc2.{p}"),
        _rule("norm.{p}", "layernorm.{p}"),
    ],
)

#: Prefix of the backbone inside ``ViTMSNForImageClassification`` (its ``base_model_prefix``).
HF_BASE_PREFIX = "vit."
#: The linear classifier of ``ViTMSNForImageClassification``.
HF_CLASSIFIER = ("classifier.weight", "classifier.bias")

# --- timm -----------------------------------------------------------------------------------------
#: timm names ARE our backbone names: the identity table.
TIMM = prefix_table("timm", "")

# --- ours -----------------------------------------------------------------------------------------
#: ``--format msn`` export file (``weights.safetensors``).
MSN_EXPORT_BACKBONE = prefix_table("msn export backbone", "backbone.")
MSN_EXPORT_HEAD = prefix_table("msn export head", "head.")
MSN_EXPORT_PROTOTYPES = "prototypes"


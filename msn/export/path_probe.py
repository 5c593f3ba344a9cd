""":class:`PathProbe`, the :class:`~msn.export.weight_types.Probe` of a path on disk: what the
format sniffers and readers ask of it, each file read at most once (docs/formats.md Sec. 7).

Torch files are read as tensors and plain containers only unless ``trust_pickle``
(docs/security.md).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from msn.export.state_dicts import is_tensor_dict, unwrap_state
from msn.export.weight_files import read_json, read_tensors, torch_load

_UNREAD = object()


class PathProbe:
    """A path whose format is being identified; each part of it is read at most once."""

    def __init__(self, path: str | os.PathLike, trust_pickle: bool = False):
        self.path = os.fspath(path)
        self.trust_pickle = trust_pickle  #: unpickle in full (docs/security.md); off: tensors and plain data only
        self.location = Path(self.path)
        self.is_folder = self.location.is_dir()
        self._json: dict[str, dict[str, Any] | None] = {}
        self._contents: Any = _UNREAD
        self._keys: set[str] | None = None

    def json(self, name: str) -> dict[str, Any] | None:
        """The JSON file ``name`` of the folder, or None when there is none."""
        if name not in self._json:
            file = self.location / name
            self._json[name] = read_json(file) if self.is_folder and file.is_file() else None
        return self._json[name]

    def contents(self) -> Any:
        """The file's object: a tensor dict (``.safetensors``) or what ``torch.load`` returns."""
        if self._contents is _UNREAD:
            self._contents = (read_tensors(self.path) if self.path.endswith(".safetensors")
                              else torch_load(self.path, self.trust_pickle))
        return self._contents

    def tensors(self) -> dict[str, Any] | None:
        """The file as one flat tensor dict (a ``state_dict`` / ``model`` wrapper removed), or None."""
        contents = self.contents()
        if not isinstance(contents, dict):
            return None
        for wrapper in ("state_dict", "model"):
            if is_tensor_dict(contents.get(wrapper)):
                return contents[wrapper]
        return contents if is_tensor_dict(contents) else None

    def has_tensor(self, *keys: str) -> bool:
        """Whether :meth:`tensors`, ``module.`` / ``_orig_mod.`` prefixes removed, holds one of ``keys``."""
        if self._keys is None:
            state = self.tensors()
            self._keys = set(unwrap_state(state)[0]) if state is not None else set()
        return any(key in self._keys for key in keys)

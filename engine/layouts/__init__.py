"""The encoder layouts this engine runs, one module each; :data:`LAYOUTS` maps ``ModelConfig.layout`` to one.

A new layout is a new module here defining its embeddings, attention and layer classes and a
:class:`engine.layers.Layout`, registered below; nothing else in the engine names a layout.
"""

from __future__ import annotations

from engine.layers import Layout
from engine.layouts import bert, crammed

LAYOUTS: dict[str, Layout] = {module.LAYOUT.name: module.LAYOUT for module in (bert, crammed)}


def get_layout(name: str) -> Layout:
    try:
        return LAYOUTS[name]
    except KeyError:
        raise ValueError(f"layout must be one of {tuple(LAYOUTS)}, got {name!r}") from None

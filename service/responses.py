"""The JSON response every route and error handler of the service returns.

Why not Starlette's ``JSONResponse`` as it is: it renders with the standard ``json`` module on the event loop,
where float vectors are slow, and no other request is parsed, admitted or answered meanwhile. pydantic's
serializer (Rust, pydantic-core) renders the same values several times faster; only some numbers are spelled
differently (0.000015 where ``json`` writes 1.5e-05), each parsing back to the same double. ``json`` would refuse
NaN and infinity; model outputs never get here with them (the batcher fails such a row's request), and anything
else non-finite is rendered as ``null``, so a response is always valid JSON.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from pydantic import ConfigDict, TypeAdapter

_ANY = TypeAdapter(Any, config=ConfigDict(ser_json_inf_nan="null"))


def render_json(content: Any) -> bytes:
    """The bytes :class:`JSON` sends; routes with very large bodies call it off the event loop."""
    return _ANY.dump_json(content)


class JSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        return render_json(content)

"""Names and element sizes of every tensor dtype a snapshot can hold.

The daemon validates manifests without importing torch, so the table lives here as
plain data; the client maps ``torch.dtype`` objects to these names
(``snapshotd_client.tensors``). A name is the torch attribute name (``"bfloat16"``
for ``torch.bfloat16``).
"""

from __future__ import annotations

# name -> bytes per element. Sub-byte packed types (float4_e2m1fn_x2) count one
# element as the packed byte, as torch does.
DTYPE_ITEMSIZE: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2": 1,
    "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
    "float4_e2m1fn_x2": 1,
    "complex32": 4,
    "complex64": 8,
    "complex128": 16,
    "int8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "uint8": 1,
    "uint16": 2,
    "uint32": 4,
    "uint64": 8,
    "bool": 1,
}


def itemsize(name: str) -> int:
    """Bytes per element of dtype ``name``; raises KeyError for an unknown name."""
    return DTYPE_ITEMSIZE[name]

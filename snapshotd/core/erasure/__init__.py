"""Erasure coding for snapshotd: a systematic MDS Reed-Solomon code over GF(2^8).

k data shards + m parity shards (shard indices 0..k-1 data, k..k+m-1 parity); any k
rebuild the rest. Parity matrix: ISA-L's Cauchy convention (inv((k+i) ^ j)), columns
scaled so that parity 0 is the plain XOR of the data. Field polynomial 0x11d.

    code = ErasureCode(4, 2)              # numpy backend; snapshotd.node.erasure.erasure_code
                                          # (4, 2) gives ISA-L when it can be loaded
    code.encode(data_blocks, parity_bufs) # or: zeroed parity + code.update(parity, j, block)
    code.reconstruct({0: d0, 2: d2, 4: p0, 5: p1}, want=[1, 3], out={1: b1, 3: b3})

Buffers are 1-D C-contiguous uint8 numpy arrays of equal length (``allocate_blocks``
makes ones laid out for speed). See ``code`` for the contract, ``gf`` for the field,
``backend_isal`` for the binding of a loaded ISA-L (``snapshotd.node.erasure`` finds it).
"""

from .backend_isal import IsalBackend, IsalLibrary
from .backend_numpy import NumpyBackend
from .code import ErasureCode, allocate_blocks
from .gf import cauchy_parity_matrix, generator_matrix

__all__ = [
    "ErasureCode",
    "IsalBackend",
    "IsalLibrary",
    "NumpyBackend",
    "allocate_blocks",
    "cauchy_parity_matrix",
    "generator_matrix",
]

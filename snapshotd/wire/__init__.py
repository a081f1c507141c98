"""wire: what the daemon and the client share, importing neither.

Generated protobuf (``_proto``), every error class with its one code table
(``errors``), limits and metadata keys (``limits``), environment variable names and
defaults (``config``), dtypes, manifest validation and checksums (``manifest``), and
shared-memory naming and mapping (``shm``). See docs/ARCHITECTURE.md.
"""

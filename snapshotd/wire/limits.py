"""Limits and metadata keys of the client <-> daemon API, shared by both sides."""

# gRPC metadata: the daemon token, the job token, and the error code that travels
# beside a status (see snapshotd.wire.errors).
TOKEN_METADATA_KEY = "x-snapshotd-token"
JOB_TOKEN_METADATA_KEY = "x-snapshotd-job-token"
ERROR_METADATA_KEY = "x-snapshotd-error"

STREAM_CHUNK_BYTES = 4 << 20
# Bounds on what a (token-holding) client can make the daemon allocate besides the
# budgeted segments: one gRPC message (a manifest, a pushed chunk) and the job table.
MAX_MESSAGE_BYTES = 64 << 20
MAX_JOBS = 4096
MAX_TOTAL_RANKS = 1 << 21  # the ledgers keep a small entry per rank of every job
MAX_JOB_TOKEN_BYTES = 1024

"""The block store service: kvstore's shared cold tier (T2) over gRPC, backed by Redis.

Modules: ``server`` (BlockStoreServer, BlockStoreThread and the command line ``main``),
``service`` (the gRPC servicer), ``store`` (Redis access), ``resp`` (the lean Redis reader of
restores) and ``metrics``. Run with ``python -m services.blockstore``.
"""

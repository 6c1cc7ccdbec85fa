"""The block store service: kvstore's shared cold tier (T2) over gRPC, backed by Redis.

Modules: ``server`` (BlockStoreServer, BlockStoreThread and the command line ``main``),
``service`` (the gRPC servicer), ``store`` (Redis access), ``auth`` (tokens and namespaces),
``metrics`` and ``errors``. Run with ``python -m services.blockstore``.
"""

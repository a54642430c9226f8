"""Pruning: exact-count masks and patterns (:mod:`.masks`), per-layer input statistics
(:mod:`.stats`), the engine that prunes over the block loop (:mod:`.engine`) and GBLM's gradient
statistics (:mod:`.gradients`)."""

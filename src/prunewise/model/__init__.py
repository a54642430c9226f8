"""The model layer: loading (:mod:`.loading`), where the blocks and prunable layers are
(:mod:`.layers`, :mod:`.experts`), the one block loop and its sources (:mod:`.blocks`,
:mod:`.streaming`, :mod:`.sources`), and memory (:mod:`.memory`, :mod:`.malloc`)."""

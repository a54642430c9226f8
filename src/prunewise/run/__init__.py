"""Runs: the job's set-up (:mod:`.job`), the pipeline that plans, prunes, evaluates and saves
(:mod:`.pipeline`), allocator trials (:mod:`.trials`), ``prunewise eval`` (:mod:`.evaluate`), the
run record (:mod:`.record`), sweep result lines (:mod:`.results`), saving (:mod:`.saving`) and
exporters (:mod:`.export`)."""

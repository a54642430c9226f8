"""Storage: all-or-nothing writes (:mod:`.atomic`), the content-keyed statistic cache
(:mod:`.cache`) and safetensors files read and written a tensor at a time (:mod:`.shards`).
Nothing here knows about models."""

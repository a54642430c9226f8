"""Reports: ``report.md`` (:mod:`.markdown`) with the tables (:mod:`.tables`, also the CLI's) and
PNG plots (:mod:`.plots`) of a sweep or a folder of runs."""

from .markdown import write_report  # noqa: F401  (the report API)

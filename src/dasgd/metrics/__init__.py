"""Event logs to summaries, staleness statistics, plots and reports.

The public names live in the modules; import them from there."""

__all__: list[str] = []

"""The snapshot export engine (seed ``qlib_daily_qfq_design.md`` §3–5): mapping, reader, meta repo,
snapshot writer, exporter. Plain Python: nothing here knows about Dagster."""

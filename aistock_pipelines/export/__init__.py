"""The snapshot export engine: mapping, reader, fingerprints, meta repo, snapshot writer, exporter.
Plain Python: nothing here knows about Dagster."""

"""RD-Agent side of the pipelines: a conformant read-only results API server (demo/tests) and the
client that the sync assets use to fetch catalogs, Alpha158 metadata and loop artifacts."""

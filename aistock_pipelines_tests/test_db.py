"""URL forms: the SQLAlchemy dialect, the libpq form, and the redacted form logs may show."""

import pytest

from aistock_pipelines.db import libpq_url, redact, sqlalchemy_url


def test_url_forms_and_redaction():
    url = "postgresql://alice:s3cret@db.internal:5432/aistock"
    assert sqlalchemy_url(url) == "postgresql+psycopg://alice:s3cret@db.internal:5432/aistock"
    assert libpq_url("postgresql+psycopg://alice:s3cret@db/x") == "postgresql://alice:s3cret@db/x"
    assert "s3cret" not in redact(url) and "***" in redact(url)
    with pytest.raises(ValueError, match="PostgreSQL"):
        sqlalchemy_url("mysql://a@b/c")

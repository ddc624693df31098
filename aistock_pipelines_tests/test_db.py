"""URL forms: the SQLAlchemy dialect, the libpq form, and the redacted form logs may show."""

import pytest

from aistock_pipelines.db import libpq_url, passwords, redact, scrub, sqlalchemy_url


def test_url_forms_and_redaction():
    url = "postgresql://alice:s3cret@db.internal:5432/aistock"
    assert sqlalchemy_url(url) == "postgresql+psycopg://alice:s3cret@db.internal:5432/aistock"
    assert libpq_url("postgresql+psycopg://alice:s3cret@db/x") == "postgresql://alice:s3cret@db/x"
    assert "s3cret" not in redact(url) and "***" in redact(url)
    with pytest.raises(ValueError, match="PostgreSQL"):
        sqlalchemy_url("mysql://a@b/c")


def test_every_password_of_a_url_is_masked_even_when_unparsable():
    masked = redact("postgresql://u@db/x?sslmode=require&password=qq9")
    assert "password=***" in masked and "sslmode=require" in masked and "qq9" not in masked
    assert redact("postgresql://u:s3cret@db:notaport/x") == "postgresql://u:***@db:notaport/x"  # SQLAlchemy refuses it
    assert passwords("postgresql://u:s%40cret@db/x") == ["s%40cret", "s@cret"]
    assert scrub("login s@cret failed for s%40cret", "postgresql://u:s%40cret@db/x") == "login *** failed for ***"
    assert scrub("nothing to hide", "postgresql://db/x") == "nothing to hide"

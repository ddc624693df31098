"""The row spool: the last record of a key wins across batches, and batches stay within their bounds."""

from aistock_pipelines.rdagent.row_spool import RowSpool


def test_last_record_of_a_key_wins_and_batches_are_bounded():
    with RowSpool(batch_bytes=2000, batch_rows=7) as spool:
        for i in range(100):
            spool.add((f"k{i % 40}",), {"value": i, "pad": "x" * 50})
        batches = list(spool.batches())
    rows = {key: row for batch in batches for key, row in batch.items()}
    assert spool.received == 100 and spool.duplicates == 60
    assert rows == {(f"k{k}",): {"value": k + 80 if k < 20 else k + 40, "pad": "x" * 50} for k in range(40)}
    assert sum(len(b) for b in batches) == 40  # every key once
    assert max(len(b) for b in batches) <= 7 and len(batches) >= 40 // 7

"""Reading inputs into records: JSON lines, JSON, Parquet and HF datasets, with a mapping.

`read_records` returns the whole input as one validated frame; `iter_record_batches` yields
it in frames of a given number of rows, reading a block at a time. Both build records a
column at a time and fall back to the per-row checker only where it must build a block or
name a bad row, so ids, values and error messages are the same either way.

Modules: `blocks` (raw rows, block by block), `plan` (the mapping), `columnar` (records a
column at a time), `rowcheck` (records a row at a time; errors), `stream` (the two above).
"""

from gristmill.reader.blocks import MISSING, BlockSize, RowBlock, load_rows
from gristmill.reader.plan import MAPPABLE_FIELDS
from gristmill.reader.stream import SchemaDrift, iter_record_batches, read_records

__all__ = [
    "MAPPABLE_FIELDS",
    "MISSING",
    "BlockSize",
    "RowBlock",
    "SchemaDrift",
    "iter_record_batches",
    "load_rows",
    "read_records",
]

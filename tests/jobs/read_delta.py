"""A Ray job for the tests: read a Delta table with ray.data.read_delta and save what it read as one Parquet file.

    python tests/jobs/read_delta.py TABLE_URI OUT.parquet [ENDPOINT_URL]

Credentials come from the environment (the job's), never from the command line.
"""

import sys

import pyarrow as pa
import pyarrow.parquet as pq
import ray


def main() -> int:
    uri, out = sys.argv[1], sys.argv[2]
    options = None
    if len(sys.argv) > 3 and sys.argv[3]:
        options = {"AWS_ENDPOINT_URL": sys.argv[3], "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1"}
    ray.init()
    ds = ray.data.read_delta(uri, storage_options=options)
    tables = [ray.get(ref) for ref in ds.to_arrow_refs()]
    table = pa.concat_tables([t for t in tables if t.num_rows]) if any(t.num_rows for t in tables) else \
        (tables[0] if tables else pa.table({}))
    pq.write_table(table, out)
    print(f"read_delta: {table.num_rows} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())

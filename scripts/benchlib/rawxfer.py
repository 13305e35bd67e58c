"""rawxfer: boto3 upload_file / download_file of one file, as a child process -- the baseline
`cssfs put` / `cssfs get` are compared with, paying the same interpreter start-up.

    python rawxfer.py put|get BUCKET KEY FILE     # endpoint and keys from AWS_* variables

Prints one JSON line: the seconds spent in the transfer itself (the parent clocks the whole
process). Imports nothing from cssfs or benchlib.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main(argv: list[str]) -> int:
    op, bucket, key, path = argv
    import boto3
    from botocore.config import Config

    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"],
                      config=Config(s3={"addressing_style": "path"}))
    t0 = time.perf_counter()
    if op == "put":
        s3.upload_file(path, bucket, key)
    elif op == "get":
        s3.download_file(bucket, key, path)
    else:
        raise SystemExit(f"unknown op {op!r}")
    print(json.dumps({"transfer_s": time.perf_counter() - t0}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

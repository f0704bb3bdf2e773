"""Writes one gRPC request, framed as it travels on the wire (a 0 compression flag, a 4-byte
big-endian length, the protobuf message), for load generators that replay a request body such as
h2load:

    bash examples/python/generate.sh
    python scripts/grpc_frame.py AppendRequest '{"streamId": "s", "events": [...]}' > append.bin
    h2load -n 100000 -c 64 -m 1 -d append.bin -H 'content-type: application/grpc' \
        -H 'te: trailers' http://127.0.0.1:50051/pgstore.v1.EventStore/Append

The message is given as protobuf JSON (as grpcurl takes it) and named by its type in
pgstore.v1.
"""

import os
import struct
import sys

from google.protobuf import json_format

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples",
                                "python", "generated"))
from pgstore.v1 import eventstore_pb2 as pb  # noqa: E402


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    message = json_format.Parse(sys.argv[2], getattr(pb, sys.argv[1])())
    body = message.SerializeToString()
    sys.stdout.buffer.write(struct.pack(">BI", 0, len(body)) + body)


if __name__ == "__main__":
    main()

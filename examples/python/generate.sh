#!/usr/bin/env bash
# Generates the Python stubs from the repository's proto/ into ./generated (not committed).
set -euo pipefail
cd "$(dirname "$0")"
rm -rf generated
mkdir -p generated
python -m grpc_tools.protoc \
  --proto_path=../../proto \
  --python_out=generated --grpc_python_out=generated --pyi_out=generated \
  ../../proto/pgstore/v1/eventstore.proto
echo "stubs in examples/python/generated"

#!/usr/bin/env bash
# Regenerate gateway/proto/*_pb2*.py from the .proto files beside them: Triton's own
# grpc_service.proto and model_config.proto (triton-inference-server/common, protobuf/), which
# define inference.GRPCInferenceService as tritonclient.grpc and KServe's InferenceGRPCClient call it.
# Needs grpcio-tools (pip install grpcio-tools); the generated code needs the protobuf runtime
# named in pyproject.toml's [grpc] extra or later. Run from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
"$PYTHON" -m grpc_tools.protoc -I gateway/proto --python_out=gateway/proto --grpc_python_out=gateway/proto \
    gateway/proto/grpc_service.proto gateway/proto/model_config.proto
# protoc writes top-level imports between the generated modules; make them package imports.
sed -i 's/^import model_config_pb2 as /from gateway.proto import model_config_pb2 as /' gateway/proto/grpc_service_pb2.py
sed -i 's/^import grpc_service_pb2 as /from gateway.proto import grpc_service_pb2 as /' gateway/proto/grpc_service_pb2_grpc.py
rm -f gateway/proto/model_config_pb2_grpc.py  # model_config.proto has no service
# Their own descriptor pool, not protobuf's default one, which tritonclient's copies of the same
# files fill too (gateway/proto/__init__.py says why).
for generated in gateway/proto/grpc_service_pb2.py gateway/proto/model_config_pb2.py; do
  sed -i -e 's/^DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile(/DESCRIPTOR = POOL.AddSerializedFile(/' \
         -e 's/^from google.protobuf.internal import builder as _builder$/&\nfrom gateway.proto import POOL/' "$generated"
done
"$PYTHON" -m grpc_tools.protoc --version

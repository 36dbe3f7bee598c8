"""Triton's KServe v2 gRPC service (grpc_service.proto, model_config.proto) and its generated code.

The generated modules add their files to POOL, a descriptor pool of their own, not protobuf's
default one. tritonclient ships the same .proto files under the same names and symbols
(inference.*), and the default pool takes a second copy only if it is identical: with any other
tritonclient version in the same process (a test, a user's script), importing both would fail
with "duplicate file name model_config.proto". scripts/gen_grpc_proto.sh writes them this way.
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()

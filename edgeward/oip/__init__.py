"""Open Inference Protocol (KServe v2 gRPC predict protocol) wire schema.

``grpc_predict_v2_pb2`` and ``grpc_predict_v2_pb2_grpc`` are generated from the .proto file beside
this module by the build step; the proto package is ``inference`` as upstream, so stock KServe and
Triton clients work against edgeward nodes.
"""

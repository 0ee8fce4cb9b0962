"""Generated gRPC stubs for kvrecall.kvstore.v1 (from proto/kvrecall/kvstore/v1/kvstore.proto); do not edit by hand."""

"""gRPC transport: servicers translate protobuf <-> domain objects and errors <-> status codes."""

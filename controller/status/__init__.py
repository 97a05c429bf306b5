"""The gRPC status service a running controller serves (`tandem status` queries it).

    board.py        StatusBoard: the job's state, written by the loop, read by the service
    server.py       the gRPC servicer, health and reflection; started by `Job`
    status.proto    the service's messages; status_pb2*.py are generated from it (gen_stubs.py)
"""
